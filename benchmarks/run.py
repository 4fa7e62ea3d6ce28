#!/usr/bin/env python
"""vizkit benchmarks: each method against its floor (the bare passes it needs) and a peer (captum).

    python benchmarks/run.py [--quick] [--rows saliency,occlusion,...] [--stages method,runner] [--out FILE]

Prints one JSON line per row (the first line is the machine canary and the versions); see
benchmarks/README.md for the columns. Everything runs on 1 torch thread (PITFALLS.md: with 2 threads
this VM's timings swing several-fold), method, floor and peer runs alternate, and each row reports the
median (and min) over its repeats. Nothing here asserts on a time.
"""
from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported; Lightning then leaves threads alone too

import argparse
import copy
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

THREADS = 1
METHODS = ("occlusion", "saliency", "guided_backprop", "deconvnet")
MODEL = "resnet18"


def set_threads() -> None:
    """Again after anything that may change it (the first Lightning Trainer does)."""
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


def time_alternating(fns: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True) -> dict[str, Timing]:
    """Time each fn, calling them in turn (a, b, c, a, b, c, ...) so machine drift hits all alike."""
    set_threads()
    gc.collect()
    if warmup:
        for fn in fns.values():
            fn()
    times = {name: Timing() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].cpu.append(time.process_time() - cpu)
            times[name].wall.append(time.perf_counter() - wall)
    return times


@dataclass
class Row:
    method: str
    batch: int
    size: int
    stage: str  # "method": the Python API alone; "runner": a whole `vizkit` run, start-up excluded
    seconds: float  # median wall seconds
    floor_seconds: float
    peer: str | None = None
    peer_seconds: float | None = None
    repeats: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # mins, CPU-time figures, passes, settings, note
    model: str = MODEL
    threads: int = THREADS

    @classmethod
    def timed(cls, method: str, x: torch.Tensor, times: dict[str, Timing], peer: str, **extra: Any) -> "Row":
        """A method-stage row from `time_alternating` over "method", "floor" and "peer"."""
        cpu = {k: statistics.median(times[k].cpu) for k in ("method", "floor", "peer")}
        paired = statistics.median(m / f for m, f in zip(times["method"].wall, times["floor"].wall))
        extra = {"seconds_min": min(times["method"].wall), "floor_min": min(times["floor"].wall),
                 "peer_min": min(times["peer"].wall), "paired_ratio": paired, **extra,
                 "cpu": {"seconds": cpu["method"], "floor_seconds": cpu["floor"], "ratio": cpu["method"] / cpu["floor"],
                         "peer_seconds": cpu["peer"], "peer_ratio": cpu["method"] / cpu["peer"]}}
        return cls(method, x.shape[0], x.shape[-1], "method", times["method"].median, times["floor"].median,
                   peer, times["peer"].median, len(times["method"].wall), extra)

    def to_json(self) -> str:
        peer_ratio = self.seconds / self.peer_seconds if self.peer_seconds else None
        row = {"method": self.method, "model": self.model, "batch": self.batch, "size": self.size,
               "threads": self.threads, "stage": self.stage, "seconds": self.seconds,
               "floor_seconds": self.floor_seconds, "ratio": self.seconds / self.floor_seconds, "peer": self.peer,
               "peer_seconds": self.peer_seconds, "peer_ratio": peer_ratio, "repeats": self.repeats, **self.extra}
        return json.dumps(_rounded(row))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def canary(calls: int = 10, repeats: int = 5) -> Timing:
    """Seconds of `calls` forwards of one fixed 3x3 conv (resnet18's layer1 shape)."""
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


def make_model() -> nn.Module:
    """timm resnet18, random weights, eval; BatchNorm gammas re-initialized to non-zero (timm zeroes
    each block's last one, which would leave every residual branch at 0)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    return model


def make_input(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 1000 + size)
    return torch.randn(batch, 3, size, size, generator=generator), torch.randint(1000, (batch,), generator=generator)


def without_inplace_relus(model: nn.Module) -> nn.Module:
    """A copy whose ReLU modules are not in-place: captum's ReLU hooks need that."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return copied


# ------------------------------------------------------------------ gradient methods


def gradient_floor(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One forward and one backward to the input: what saliency, guided backprop and deconvnet need."""
    x = x.detach().requires_grad_()
    score = model(x)[torch.arange(x.shape[0]), target].sum()
    (gradient,) = torch.autograd.grad(score, x)
    return gradient


def gradient_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    import vizkit
    from captum.attr import Deconvolution, GuidedBackprop, Saliency

    method = vizkit.create_method(name)
    if name == "saliency":
        peer, peer_name, peer_kwargs = Saliency(model), "captum.Saliency(abs=True)", {"abs": True}
    else:
        captum_cls = GuidedBackprop if name == "guided_backprop" else Deconvolution
        peer, peer_name, peer_kwargs = captum_cls(without_inplace_relus(model)), f"captum.{captum_cls.__name__}", {}
    times = time_alternating({
        "method": lambda: method.attribute(model, x, target),
        "floor": lambda: gradient_floor(model, x, target),
        "peer": lambda: peer.attribute(x, target=target, **peer_kwargs),
    }, repeats)
    note = "floor: model(x)[range(B), target].sum() then autograd.grad w.r.t. x"
    if name != "saliency":
        note += "; captum gets a copy with inplace=False ReLUs"
    return Row.timed(name, x, times, peer_name, note=note)


# ------------------------------------------------------------------ occlusion


def occlusion_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, window: int, stride: int,
                  repeats: int, warmup: bool) -> Row:
    import vizkit
    from captum.attr import Occlusion
    from vizkit.methods.attribution.occlusion import window_starts
    from vizkit.pixels import PixelSpace

    method = vizkit.create_method("occlusion", window=window, stride=stride)
    chunk = method.config.batch_size
    batch, channels, height, width = x.shape
    fill = PixelSpace.for_model(model).fill(method.config.fill, x)  # [1,C,1,1], normalized space
    ys, xs = window_starts(height, window, stride), window_starts(width, window, stride)
    assert ys == list(range(0, height - window + 1, stride)), "choose a window/stride whose grid fits (captum's)"
    masks = torch.zeros(len(ys) * len(xs), 1, height, width, dtype=torch.bool)
    for i, (top, left) in enumerate((top, left) for top in ys for left in xs):
        masks[i, :, top:top + window, left:left + window] = True

    # the floor's inputs, built outside the timing, in the method's order (image-major), then chunked
    pairs = torch.tensor([(b, w) for b in range(batch) for w in range(len(masks))])
    perturbed = torch.where(masks[pairs[:, 1]], fill, x[pairs[:, 0]])

    def floor(images_per_forward: int = chunk):
        with torch.no_grad():
            model(x)
            for inputs in perturbed.split(images_per_forward):
                model(inputs)

    forward = lambda t: model(t).softmax(1)
    peer = Occlusion(forward)
    baseline = fill.expand(1, channels, height, width).contiguous()

    def run_peer(per_eval: int):
        return peer.attribute(x, target=target, sliding_window_shapes=(channels, window, window),
                              strides=(channels, stride, stride), baselines=baseline, perturbations_per_eval=per_eval)

    # captum's best setting: perturbations_per_eval giving 8, 16 or 32 images per forward, timed once each
    candidates = sorted({max(1, images // batch) for images in (8, 16, 32)})
    tried = {str(n): time_alternating({"peer": lambda n=n: run_peer(n)}, 1, warmup=False)["peer"].cpu[0] for n in candidates}
    best = int(min(tried, key=tried.get))  # by CPU time: least disturbed by other processes

    times = time_alternating({
        "method": lambda: method.attribute(model, x, target),
        "floor": floor,
        "peer": lambda: run_peer(best),
        "floor_chunk8": lambda: floor(8),  # not the floor: what the same passes cost in chunks of 8 images
    }, repeats, warmup)
    settings = {"window": window, "stride": stride, "windows": len(masks), "batch_size": chunk, "fill": method.config.fill,
                "peer_perturbations_per_eval": best, "peer_tried": tried}
    chunk8 = times["floor_chunk8"].median
    return Row.timed("occlusion", x, times, "captum.Occlusion(softmax)", passes=batch * (1 + len(masks)), settings=settings,
                     floor_chunk8_seconds=chunk8, ratio_vs_floor_chunk8=times["method"].median / chunk8,
                     note=f"floor: clean forward + pre-built perturbed inputs forwarded in chunks of {chunk}, no_grad")


# ------------------------------------------------------------------ whole runs


def write_images(folder: Path, count: int = 8, size: int = 224) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"random{i}.png")


def runner_row(name: str, images: Path, workdir: Path, overrides: list[str]) -> Row:
    run_dir = workdir / f"run-{name}"
    command = [sys.executable, "-m", "vizkit.app", f"model={MODEL}", "data=images", f"data.paths=[{images}]",
               "data.batch_size=8", "trainer.accelerator=cpu", f"method={name}", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"vizkit {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    timings = json.loads((run_dir / "results.json").read_text())["timings"]
    seconds = timings["run_seconds"] - timings["model_load_seconds"]
    note = ("seconds = run_seconds - model_load_seconds (data, Trainer, predict incl. its clean forward, "
            "PNG/TensorBoard writing = write_seconds where the runner reports it); floor = method_seconds; one run in a subprocess with "
            "OMP_NUM_THREADS=1; the runner's resnet18 keeps timm's zero BatchNorm gammas")
    extra = {"settings": {"overrides": overrides}, "timings": timings, "wall_seconds": wall, "note": note}
    return Row(name, 8, 224, "runner", seconds, timings["method_seconds"], extra=extra)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1, 64 px, few repeats, method stage only (< 60 s)")
    parser.add_argument("--rows", default=",".join(METHODS), help="comma-separated methods (default: all four)")
    parser.add_argument("--stages", default="method,runner", help="method (the Python API), runner (whole runs); --quick: method")
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.rows.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(METHODS)}")

    set_threads()
    warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")  # "required_grads has been set", hooks notice
    if args.quick:
        size, batches, repeats, occlusion = 64, (1,), {1: 9}, {"window": 16, "stride": 8}
    else:
        size, batches, repeats, occlusion = 224, (1, 8), {1: 7, 8: 5}, {"window": 56, "stride": 28}
    occlusion_repeats = {1: 5, 8: 3} if not args.quick else {1: 5}

    def progress(row: Row) -> None:
        print(f"  {row.stage:6} {row.method:16} batch {row.batch}: {row.seconds:.3f} s, floor {row.floor_seconds:.3f} s, "
              f"ratio {row.seconds / row.floor_seconds:.3f}" + (f", peer {row.peer_seconds:.3f} s" if row.peer_seconds else ""),
              file=sys.stderr, flush=True)

    canary_start = canary()
    started = time.perf_counter()
    rows: list[Row] = []
    model = make_model()
    stages = {"method"} if args.quick else {s.strip() for s in args.stages.split(",")}
    for batch in batches if "method" in stages else ():
        x, target = make_input(batch, size)
        for name in methods:
            set_threads()
            if name == "occlusion":
                row = occlusion_row(model, x, target, repeats=occlusion_repeats[batch], warmup=batch == 1, **occlusion)
            else:
                row = gradient_row(name, model, x, target, repeats[batch])
            rows.append(row)
            progress(row)
    if "runner" in stages:
        with tempfile.TemporaryDirectory(prefix="vizkit-bench-") as tmp:
            workdir = Path(tmp)
            write_images(workdir / "images")
            for name in methods:
                overrides = [f"method.window={occlusion['window']}", f"method.stride={occlusion['stride']}"] if name == "occlusion" else []
                rows.append(runner_row(name, workdir / "images", workdir, overrides))
                progress(rows[-1])
                set_threads()
    canary_end = canary()

    import captum
    import timm

    head = {"canary_start": canary_start.median, "canary_end": canary_end.median,
            "canary_cpu_start": statistics.median(canary_start.cpu), "canary_cpu_end": statistics.median(canary_end.cpu),
            "canary": "median of 5 x (10 forwards of Conv2d(64,64,3) on [1,64,56,56]), wall and process CPU seconds",
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": THREADS,
            "cpus": os.cpu_count(), "machine": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "captum": captum.__version__,
            "quick": args.quick, "total_seconds": time.perf_counter() - started}
    lines = [json.dumps(_rounded(head))] + [row.to_json() for row in rows]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
