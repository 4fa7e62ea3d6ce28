"""The benchmarks' timing harness: thread settings, alternating timers, medians, ``Row`` and its derived
figures, the canary, and the results' JSON lines.

Nothing here knows a method or a peer. PITFALLS.md ("Benchmarking on these machines"): with torch's
default 2 threads this VM's timings swing several-fold, so everything runs on 1 thread, the functions
of a row alternate (machine drift hits all alike), and a row reports the median (and min) of its repeats.
Nothing here asserts on a time.
"""
from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

THREADS = 1
MODEL = "resnet18"
VIT_MODEL = "vit_small_patch16_224"  # the ViT method rows' model (gradcam_vit, attention_rollout_vit, gradient_weighted_attention_vit)
# the clocks every timer reads (module attributes, so a test can give the harness a clock it controls)
WALL_CLOCK: Callable[[], float] = time.perf_counter
CPU_CLOCK: Callable[[], float] = time.process_time


def set_threads() -> None:
    """Again after anything that may change it (the first Lightning Trainer does). The command line also
    sets OMP_NUM_THREADS=1 before torch is imported, so subprocesses and Lightning leave threads alone."""
    torch.set_num_threads(THREADS)


@dataclass
class Timing:
    """Per-call seconds of one function: wall clock and this process's CPU time (with 1 thread the two
    agree unless another process took the core; a busy neighbour still slows both through shared caches)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)


def time_alternating(fns: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True, inner: int = 1) -> dict[str, Timing]:
    """Time each fn, calling them in turn (a, b, c, a, b, c, ...) so machine drift hits all alike.
    ``warmup``: one untimed call of each first. ``inner``: calls per timed sample (for sub-millisecond
    fns); the figures are per call."""
    set_threads()
    gc.collect()
    if warmup:
        for fn in fns.values():
            fn()
    times = {name: Timing() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = WALL_CLOCK(), CPU_CLOCK()
            for _ in range(inner):
                fn()
            times[name].cpu.append((CPU_CLOCK() - cpu) / inner)
            times[name].wall.append((WALL_CLOCK() - wall) / inner)
    return times


def time_once(fn: Callable[[], Any]) -> float:
    """CPU seconds of one call (choosing a peer's setting: CPU time is least disturbed by other processes)."""
    return time_alternating({"fn": fn}, 1, warmup=False)["fn"].cpu[0]


def fastest_setting(run: Callable[[int], Any], candidates: Iterable[int]) -> tuple[int, dict[str, float]]:
    """The candidate whose ``run(candidate)`` took the least CPU time, each timed once, and all the
    candidates' CPU seconds (keyed by the candidate as a string, as the rows record them)."""
    tried = {str(n): time_once(lambda n=n: run(n)) for n in candidates}
    return int(min(tried, key=tried.get)), tried


class Inner:
    """Seconds of the measured part of a call (a fit without building its Trainer), one sample per
    ``with`` block: ``with inner: ...``."""

    def __init__(self) -> None:
        self.timing = Timing()

    def __enter__(self) -> "Inner":
        set_threads()
        self._wall, self._cpu = WALL_CLOCK(), CPU_CLOCK()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timing.cpu.append(CPU_CLOCK() - self._cpu)
        self.timing.wall.append(WALL_CLOCK() - self._wall)


def per_step(timing: Timing, steps: float) -> Timing:
    """The same samples divided by ``steps`` (seconds per optimizer step, per pass, ...)."""
    return Timing([w / steps for w in timing.wall], [c / steps for c in timing.cpu])


@dataclass
class Row:
    method: str  # the row's name: a method, or a metric for stage "metric"
    batch: int
    size: int
    stage: str  # "method": the Python API alone; "metric": one metric's evaluate; "runner": a whole `vizkit` run;
    # "optimization": an optimization method's Lightning fit, per optimizer step; "scan": a pass over a data set
    seconds: float  # median wall seconds
    floor_seconds: float
    peer: str | None = None
    peer_seconds: float | None = None
    repeats: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # mins, CPU-time figures, passes, settings, note
    model: str = MODEL
    threads: int = THREADS
    has_ratio: bool = True  # False where the floor is no pass at all (pointing_game, mask_energy): ratio null

    @classmethod
    def timed(cls, method: str, x: torch.Tensor, times: dict[str, Timing], peer: str | None, stage: str = "method",
              has_ratio: bool = True, model: str = MODEL, **extra: Any) -> "Row":
        """A row from `time_alternating` over "method", "floor" and (where there is one) "peer": the
        medians of their wall seconds, their mins, the median of the per-repeat method/floor ratios
        (``paired_ratio``) and the same figures from CPU time (``cpu``); batch and size from ``x``'s shape;
        ``model``: the timm model's name (resnet18 unless a row says otherwise)."""
        keys = [k for k in ("method", "floor", "peer") if k in times]
        cpu = {k: statistics.median(times[k].cpu) for k in keys}
        paired = statistics.median(m / f for m, f in zip(times["method"].wall, times["floor"].wall))
        cpu_figures = {"seconds": cpu["method"], "floor_seconds": cpu["floor"], "ratio": cpu["method"] / cpu["floor"]}
        mins = {"seconds_min": min(times["method"].wall), "floor_min": min(times["floor"].wall)}
        if "peer" in times:
            mins["peer_min"] = min(times["peer"].wall)
            cpu_figures.update(peer_seconds=cpu["peer"], peer_ratio=cpu["method"] / cpu["peer"])
        if not has_ratio:
            cpu_figures.pop("ratio")
        extra = {**mins, **({"paired_ratio": paired} if has_ratio else {}), **extra, "cpu": cpu_figures}
        return cls(method, x.shape[0], x.shape[-1], stage, times["method"].median, times["floor"].median,
                   peer, times["peer"].median if "peer" in times else None, len(times["method"].wall), extra,
                   model=model, has_ratio=has_ratio)

    @property
    def ratio(self) -> float | None:
        """Seconds over the floor's (> 1: slower than the bare passes); None where the floor is no pass."""
        return self.seconds / self.floor_seconds if self.has_ratio else None

    @property
    def peer_ratio(self) -> float | None:
        """Seconds over the peer's (< 1: faster than the peer); None without a peer."""
        return self.seconds / self.peer_seconds if self.peer_seconds else None

    def to_dict(self) -> dict[str, Any]:
        """The row's JSON object, unrounded: its figures, then ``extra``."""
        return {"method": self.method, "model": self.model, "batch": self.batch, "size": self.size,
                "threads": self.threads, "stage": self.stage, "seconds": self.seconds,
                "floor_seconds": self.floor_seconds, "ratio": self.ratio, "peer": self.peer,
                "peer_seconds": self.peer_seconds, "peer_ratio": self.peer_ratio, "repeats": self.repeats, **self.extra}

    def to_json(self) -> str:
        return json.dumps(rounded(self.to_dict()))


def rounded(value: Any) -> Any:
    """Floats to 6 significant digits (metric rows take microseconds), inside dicts too."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def second_peer(times: dict[str, Timing], name: str, seconds: float) -> dict[str, Any]:
    """Extra keys for a second peer timed as "peer2"; ``seconds``: the method's."""
    peer2 = times["peer2"]
    return {"peer2": name, "peer2_seconds": peer2.median, "peer2_ratio": seconds / peer2.median, "peer2_min": min(peer2.wall),
            "peer2_cpu_seconds": statistics.median(peer2.cpu)}


def canary(calls: int = 10, repeats: int = 5) -> Timing:
    """Seconds of `calls` forwards of one fixed 3x3 conv (resnet18's layer1 shape): timed at the start and
    the end of a benchmark, it says whether the machine was busy."""
    set_threads()
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
    x = torch.randn(1, 64, 56, 56, generator=generator)

    def run():
        with torch.no_grad():
            for _ in range(calls):
                conv(x)

    return time_alternating({"canary": run}, repeats)["canary"]


def result_lines(head: dict[str, Any], rows: Iterable[Row]) -> list[str]:
    """The results' JSON lines: the head (canary, versions, what was skipped), then one line per row."""
    return [json.dumps(rounded(head))] + [row.to_json() for row in rows]


def write_results(path: Path, lines: list[str]) -> None:
    Path(path).write_text("\n".join(lines) + "\n")


def read_results(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A results file's head and its rows (the lines with a "method")."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return lines[0], [line for line in lines[1:] if "method" in line]


def distribution_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
