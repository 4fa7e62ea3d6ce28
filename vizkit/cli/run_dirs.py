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

The ranks a multi-device run starts (``LOCAL_RANK`` > 0 in their environment) join rank 0's
directory instead of claiming one.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

MARKER = ".vizkit-run"
STATUSES = ("running", "finished", "interrupted", "failed")


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
    candidate, number = path, 1
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
                break  # an empty directory the user made for this run
            number += 1
            candidate = path.with_name(f"{path.name}-{number}")
        except OSError as error:  # read-only file system, no permission, ...
            raise RunDirError(f"cannot create {what} {candidate}: {error.strerror or error}") from None
    try:
        _write_marker(candidate, {"status": "running", "pid": os.getpid(), "started": time.time()}, exclusive=True)
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
    _write_marker(run_dir, {"status": "running", "pid": os.getpid(), "started": time.time()}, exclusive=True)


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
