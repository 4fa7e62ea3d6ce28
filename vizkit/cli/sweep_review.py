"""What every sweep adds to its runs: job directories named by what they vary, a progress line with
an estimate of the time left after each job, and one HParams experiment over all the jobs.

``SweepReview`` is a Hydra callback (``conf/config.yaml``, ``hydra.callbacks.vizkit_sweep``):

* ``on_multirun_start`` (the launching process) counts the sweep's jobs, as the basic sweeper
  expands them (``hydra.sweeper.params`` and the command line's sweeps), and tells the jobs which
  keys vary (for their directories' names);
* ``on_job_end`` (wherever the job ran) prints ``sweep: 3/10 jobs done in 2m05s, about 4m52s left``;
* ``on_multirun_end`` writes the HParams experiment into the sweep directory
  (``vizkit.output.hparams``): the union of every job's hparams and metrics, ``differs`` marked.

``run_name`` is the ``vizkit_run_name`` resolver of ``hydra.sweep.subdir``: ``3_pgd_eps=2⁄255``.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

NAME_LENGTH = 80  # a job directory's name past its number: long override lists are cut (the job's .hydra/ has them all)
SKIPPED_KEYS = ("method",)  # the method leads the name


SWEPT_KEYS = "VIZKIT_SWEPT_KEYS"  # environment: the keys the sweep varies, set at its start for its jobs (joblib's workers inherit it)


def run_name(method: str, overrides: Any) -> str:
    """A job's directory name past its number: the method, then the values of the other keys the
    sweep varies, ``method.`` dropped, ``/`` written ``⁄`` (a value such as 2/255 must not make a
    subdirectory): ``pgd_eps=2⁄255``. What every job shares stays in its .hydra/."""
    swept = set(filter(None, os.environ.get(SWEPT_KEYS, "").split(",")))
    parts = []
    for item in overrides or []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if key in SKIPPED_KEYS or key not in swept:
            continue
        parts.append(f"{key.removeprefix('method.')}={value}".replace("/", "\u2044"))
    name = "_".join([str(method)] + ([",".join(parts)] if parts else []))
    return name if len(name) <= NAME_LENGTH else name[: NAME_LENGTH - 1] + "\u2026"


def sweep_plan(config: Any) -> tuple[int | None, list[str]]:
    """How many jobs the basic sweeper makes of ``config``, and the keys it varies (None and [] when
    it cannot be told: another sweeper's syntax)."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        overrides = [f"{key}={value}" for key, value in params.items()] + [str(item) for item in OmegaConf.select(config, "hydra.overrides.task") or []]
        by_key = {override.get_key_element().lstrip("+~"): override for override in OverridesParser.create().parse_overrides(overrides)}
        swept = {key: len(list(override.sweep_string_iterator())) for key, override in by_key.items() if override.is_sweep_override()}
        return math.prod(swept.values()), list(swept)
    except Exception:  # the progress line then says no total, the job directories name the method only
        return None, []


def jobs_ended(sweep_dir: Path) -> int:
    """The sweep's jobs that have ended: their marker says so, or their failure was recorded."""
    from vizkit.cli.run_dirs import FAILURES, read_marker

    ended = sum(1 for job_dir in sweep_dir.iterdir() if job_dir.is_dir() and (read_marker(job_dir) or {}).get("status") not in (None, "running"))
    failures = sweep_dir / FAILURES
    return ended + (len(failures.read_text().splitlines()) if failures.is_file() else 0)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def write_experiment(sweep_dir: Path) -> Path | None:
    """The HParams experiment over every job of the sweep that wrote a session; None if none did."""
    from vizkit.output.hparams import read_session, write_experiment as write
    from vizkit.output.writer import RESULTS, TENSORBOARD_DIR

    sessions, metric_tags = [], {}
    for job_dir in sorted(path for path in sweep_dir.iterdir() if path.is_dir()):
        session = read_session(job_dir / TENSORBOARD_DIR)
        if session is None:
            continue
        sessions.append(session)
        try:
            results = json.loads((job_dir / RESULTS).read_text())
        except (OSError, ValueError):
            continue
        metric_tags.update({f"metrics/{name}": None for name, value in (results.get("metrics") or {}).items()
                            if isinstance(value, (int, float)) and math.isfinite(value)})
        if (results.get("timings") or {}).get("seconds_per_input") is not None and results["method"]["kind"] == "attribution":
            metric_tags["timing/seconds_per_input"] = None
    return write(sweep_dir, sessions, metric_tags) if sessions else None


class SweepReview(Callback):
    """Hydra callback (see the module docstring)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.total: int | None = None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.started = time.time()
        self.total, swept = sweep_plan(config)
        os.environ[SWEPT_KEYS] = ",".join(swept)

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if self.started is None or not sweep_dir.is_dir():
            return
        done, elapsed = jobs_ended(sweep_dir), time.time() - self.started
        left = ""
        if self.total and 0 < done < self.total:
            left = f", about {duration(elapsed / done * (self.total - done))} left"
        print(f"vizkit: sweep: {done}/{self.total or '?'} job(s) done in {duration(elapsed)}{left}", flush=True)  # user-facing

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir():
            write_experiment(sweep_dir)
