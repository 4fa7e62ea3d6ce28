"""SIGINT and SIGTERM during a run: finish the current batch or step, write what finished, say so.

``graceful()`` installs handlers that only record the first signal; the streamed runs (``stream``)
and optimizations (their ``fit``) look at ``received()`` between batches or steps and stop there,
the results are written with ``"status": "interrupted"``, and the command exits with 128 + the
signal's number (130 for Ctrl-C, 143 for SIGTERM), as shells, ``timeout``, SLURM and
``docker stop`` expect. A second signal ends the process at once with the same code.

Lightning registers its own SIGTERM handler around ``fit`` and ``predict`` and keeps ours in the
chain, so both run.
"""
from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

_received: int | None = None


class RunInterrupted(Exception):
    """Raised between batches to leave ``Trainer.predict`` once a signal was received."""


def received() -> int | None:
    """The signal received during the run, if any."""
    return _received


def name(signum: int) -> str:
    return signal.Signals(signum).name


def _handle(signum, frame) -> None:
    global _received
    if _received is not None:  # the second one: no more waiting
        print(f"\nvizkit: {name(signum)} again: stopping now, without writing results", file=sys.stderr, flush=True)  # user-facing
        os._exit(128 + signum)
    _received = signum
    message = f"stopping after the current batch or step, then writing what finished ({name(signum)} again to stop at once)"
    print(f"\nvizkit: {name(signum)} received: {message}", file=sys.stderr, flush=True)  # user-facing


@contextmanager
def graceful() -> Iterator[None]:
    """Record SIGINT and SIGTERM instead of dying, for the duration (main thread only)."""
    global _received
    _received = None
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {signum: signal.signal(signum, _handle) for signum in signals}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check() -> None:
    """Between batches of a streamed run: leave the loop if a signal was received."""
    if _received is not None:
        raise RunInterrupted(name(_received))
