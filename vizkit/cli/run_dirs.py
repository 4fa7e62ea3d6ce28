"""Run directories: each run claims a directory of its own, and the directory says how the run ended.

Hydra makes a run's directory and writes ``.hydra/`` into it before any code of the task runs, so an
earlier run's directory would be overwritten before vizkit could object. ``RunDirectories`` is a
Hydra callback (``conf/config.yaml``, ``hydra.callbacks.vizkit_run_dir``) whose ``on_run_start`` and
``on_multirun_start`` run before that. It reads the directory from the composed config (Hydra's
parsed value, however the command line quoted it) and claims it:

* the default, time-stamped directory is made with ``os.mkdir``, which fails if another process made
  it first; then ``-2``, ``-3``, ... is appended until one is made. Two runs started in the same
  microsecond get two directories.
* a directory the user pinned (``hydra.run.dir=...``, ``hydra.sweep.dir=...``) must not exist yet, or
  be empty; anything else (an earlier run, finished or not, or files of the user's) is refused before
  Hydra writes a byte.

The claim ends by creating the marker ``.vizkit-run`` exclusively (``open(..., "x")``): of two runs
pinned to one empty directory at once, one gets it and the other is refused. The marker holds
``{"status": "running" | "finished" | "interrupted" | "failed", "pid", "started", "ended", "error"}``,
rewritten atomically as the run ends; ``results.json`` carries the same ``status``.

A run that fails before it has written anything of its own (``produced``: pictures, maps,
results, an event that is more than a file header) leaves no directory behind (``settle_failed``):
TensorBoard would list an empty run. A sweep's job records its failure in the sweep's
``failures.jsonl`` instead, which the sweep's summary reads. A run that fails later keeps what it
wrote, and a ``results.json`` whose ``status`` is ``failed`` says why.

The ranks a multi-device run starts (``LOCAL_RANK`` > 0 in their environment) join rank 0's
directory instead of claiming one.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

MARKER = ".vizkit-run"
STATUSES = ("running", "finished", "interrupted", "failed")
FAILURES = "failures.jsonl"  # in a sweep's directory: one line per job that failed before writing anything


class RunDirError(Exception):
    """A run directory that cannot be claimed; the message says why and what to do."""


def is_secondary_rank() -> bool:
    """A process that a multi-device run started for rank > 0 (it joins rank 0's directory)."""
    return any(int(os.environ.get(name, "0") or 0) > 0 for name in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def describe(run_dir: Path) -> str:
    """What an existing, non-empty directory holds, for the refusal."""
    marker = read_marker(run_dir)
    if marker is not None:
        status = marker.get("status", "unknown")
        pid = f", pid {marker['pid']}" if status == "running" and "pid" in marker else ""
        return f"an earlier vizkit run ({status}{pid})"
    if (run_dir / ".hydra").is_dir() or (run_dir / "results.json").exists() or (run_dir / "multirun.yaml").exists():
        return "an earlier run"
    return "files that are not a vizkit run"


def _write_marker(run_dir: Path, marker: dict[str, Any], exclusive: bool) -> None:
    text = json.dumps(marker, indent=2)
    if exclusive:
        with open(run_dir / MARKER, "x") as file:  # the claim itself: one process gets it
            file.write(text)
        return
    temporary = run_dir / f"{MARKER}.{os.getpid()}.tmp"
    temporary.write_text(text)
    os.replace(temporary, run_dir / MARKER)  # the run's own marker: replaced whole, never half-written


def claim(path: str | Path, pinned: bool, what: str = "hydra.run.dir") -> Path:
    """Make `path` (or, unless pinned, the first free ``path-N``) this run's, marked ``running``."""
    if not str(path).strip():
        raise RunDirError(f"{what} is empty; give a directory, or leave it out for a new time-stamped one under outputs/")
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirError(f"cannot create the parent of {what} {path}: {error.strerror or error}") from None
    candidate, number, made = path, 1, True
    while True:
        try:
            candidate.mkdir()
            break
        except FileExistsError:
            if not candidate.is_dir():
                raise RunDirError(f"{what} {candidate} is a file, not a directory; choose another {what}") from None
            if pinned:
                if any(candidate.iterdir()):
                    raise RunDirError(f"{what} {candidate} already holds {describe(candidate)}; nothing was changed in it. "
                                      f"Choose another {what}, or leave it out for a new time-stamped one") from None
                made = False
                break  # an empty directory the user made for this run
            number += 1
            candidate = path.with_name(f"{path.name}-{number}")
        except OSError as error:  # read-only file system, no permission, ...
            raise RunDirError(f"cannot create {what} {candidate}: {error.strerror or error}") from None
    try:
        _write_marker(candidate, {"status": "running", "pid": os.getpid(), "started": time.time(), "made": made}, exclusive=True)
    except FileExistsError:
        raise RunDirError(f"{what} {candidate} was claimed by another run that started at the same moment; choose another {what}") from None
    except OSError as error:
        raise RunDirError(f"cannot write into {what} {candidate}: {error.strerror or error}") from None
    return candidate


def mark(run_dir: Path, status: str, error: str | None = None) -> None:
    """Record how the run ended (``finished``, ``interrupted`` or ``failed``) in its marker."""
    assert status in STATUSES
    if is_secondary_rank() or not (run_dir / MARKER).exists():
        return
    marker = read_marker(run_dir) or {}
    marker.update(status=status, ended=time.time(), **({"error": error} if error else {}))
    try:
        _write_marker(run_dir, marker, exclusive=False)
    except OSError:  # a full disk must not hide the run's own error
        pass


def claim_job_dir(run_dir: Path) -> None:
    """A multirun job's directory (inside its claimed sweep directory): marked as this job's."""
    if is_secondary_rank() or (read_marker(run_dir) or {}).get("pid") == os.getpid():  # a single run: claimed at its start
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_marker(run_dir, {"status": "running", "pid": os.getpid(), "started": time.time(), "made": True}, exclusive=True)


def _event_count(path: Path) -> int:
    """How many records a TFRecord file holds (the first is the file's header)."""
    count = 0
    with open(path, "rb") as file:
        while len(head := file.read(8)) == 8:
            (length,) = struct.unpack("<Q", head)
            file.seek(length + 8, os.SEEK_CUR)  # the length's CRC, the data, the data's CRC
            count += 1
    return count


def produced(run_dir: Path) -> bool:
    """Whether a run wrote anything of its own: not Hydra's config and log, the marker, an event
    file's header or the hparams of a run that ended before logging any."""
    for path in run_dir.rglob("*"):
        relative = path.relative_to(run_dir)
        if not path.is_file() or relative.parts[0] == ".hydra" or relative.name.startswith(MARKER) or path.suffix == ".log":
            continue
        if relative.name == "hparams.yaml" or (relative.name.startswith("events.out.tfevents.") and _event_count(path) <= 1):
            continue
        return True
    return False


def settle_failed(run_dir: Path, error: str, sweep_dir: Path | None = None) -> str:
    """A failed run's directory: kept with a ``results.json`` that says why when the run wrote
    something; otherwise removed (emptied, if the user made it for this run), the failure then
    recorded in ``sweep_dir``'s ``failures.jsonl`` for a sweep's job. Returns what was done, for the
    user: '' when the directory is kept."""
    from vizkit.output.writer import RESULTS, write_json_once

    if is_secondary_rank():
        return ""
    if (run_dir / RESULTS).exists() or produced(run_dir):
        if not (run_dir / RESULTS).exists():
            write_json_once(run_dir / RESULTS, {"status": "failed", "error": error,
                                                                "written": sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()
                                                                  and p.relative_to(run_dir).parts[0] != ".hydra" and not p.name.startswith(MARKER))})
        mark(run_dir, "failed", error)
        return ""
    made = (read_marker(run_dir) or {}).get("made", True)
    if sweep_dir is not None:
        record = {"job": run_dir.name, "method": job_method(run_dir), "error": error, "overrides": _overrides(run_dir), "time": time.time()}
        with open(sweep_dir / FAILURES, "a") as file:  # one short line per job: appends do not interleave
            file.write(json.dumps(record) + "\n")
    if made:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:  # the user's own empty directory: left as it was given
        for child in run_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    return f"nothing was written; {run_dir} was removed" if made else f"nothing was written; {run_dir} was emptied"


def job_method(run_dir: Path) -> str:
    """The method a run's composed config (``.hydra/config.yaml``) chose, or ''."""
    from omegaconf import OmegaConf

    try:
        return str(OmegaConf.select(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), "method._name_", default="") or "")
    except (OSError, ValueError):
        return ""


def _overrides(run_dir: Path) -> list[str]:
    from omegaconf import OmegaConf

    try:
        return [str(item) for item in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
    except (OSError, ValueError):
        return []


def _pinned(config: DictConfig, key: str) -> bool:
    """Whether the command line set `key` (Hydra's parsed overrides, however they were quoted)."""
    return any(str(item).split("=", 1)[0].lstrip("+~") == key for item in config.hydra.overrides.hydra)


def _refuse(error: RunDirError) -> None:
    print(f"vizkit: error: {error}", file=sys.stderr)  # user-facing; before Hydra has written anything
    sys.exit(2)


class RunDirectories(Callback):
    """Claims the run's (or the sweep's) directory before Hydra writes into it (see the module docstring)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_secondary_rank():
            return
        try:
            claimed = claim(str(config.hydra.run.dir), _pinned(config, "hydra.run.dir"))
        except RunDirError as error:
            _refuse(error)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = str(claimed)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_secondary_rank():
            return
        try:
            claimed = claim(str(config.hydra.sweep.dir), _pinned(config, "hydra.sweep.dir"), what="hydra.sweep.dir")
        except RunDirError as error:
            _refuse(error)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = str(claimed)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_secondary_rank():
            mark(Path(str(config.hydra.sweep.dir)), "finished")
