"""Runner rows (a whole ``vizkit`` run of a method, in a subprocess, against the method's own time
inside it) and scan rows (a pass over a data set, in process or as a whole run, against plain
inference over the same data: images per second)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from floors import layer_gradient_floor
from harness import MODEL, THREADS, Row, Timing, time_alternating


def run_env() -> dict[str, str]:
    """A subprocess's environment: 1 thread (Lightning then leaves the count alone), no hub lookups."""
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"}


# ------------------------------------------------------------------ whole runs of a method


# the runner rows' overrides: bound the many-pass methods' time (the row measures what a run adds to the method)
RUNNER_OVERRIDES = {
    "occlusion": ["method.window=56", "method.stride=28"],
    "integrated_gradients": ["method.steps=8"],
    "smoothgrad": ["method.samples=4"],
}


def write_images(folder: Path, count: int = 8, size: int = 224) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"random{i}.png")


def runner_method(name: str) -> tuple[str, list[str]]:
    """The method a row runs and the overrides that make it that row: ``lrp_epsilon_plus`` is
    ``method=lrp method.composite=epsilon_plus``; any other row is the method of its name."""
    if name.startswith("lrp_"):
        return "lrp", [f"method.composite={name.removeprefix('lrp_')}"]
    return name, RUNNER_OVERRIDES.get(name, [])


def runner_row(name: str, images: Path, workdir: Path, repeats: int = 3) -> Row:
    """``repeats`` whole runs, one after another, each in a fresh subprocess; seconds and floor are the
    medians (a run's fixed costs are a few tenths of a second, where one busy moment shows)."""
    method, overrides = runner_method(name)
    runs = []
    for repeat in range(repeats):
        run_dir = workdir / f"run-{name}-{repeat}"
        command = [sys.executable, "-m", "vizkit.cli.app", f"model={MODEL}", "data=images", f"data.paths=[{images}]",
                   "data.batch_size=8", "trainer.accelerator=cpu", f"method={method}", *overrides, f"hydra.run.dir={run_dir}"]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=workdir, env=run_env(), capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"vizkit {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        timings = json.loads((run_dir / "results.json").read_text())["timings"]
        runs.append({"seconds": timings["run_seconds"] - timings["model_load_seconds"], "wall_seconds": wall, "timings": timings})
    seconds = statistics.median(r["seconds"] for r in runs)
    floor = statistics.median(r["timings"]["method_seconds"] for r in runs)
    typical = min(runs, key=lambda r: abs(r["seconds"] - seconds))
    note = ("seconds = run_seconds - model_load_seconds (data, Trainer, predict incl. its clean forward, "
            "PNG/TensorBoard writing = write_seconds); floor = method_seconds; medians of `repeats` runs, each in a "
            "subprocess with OMP_NUM_THREADS=1; the runner's resnet18 keeps timm's zero BatchNorm gammas")
    extra = {"settings": {"overrides": overrides}, "timings": typical["timings"],
             "run_ratios": [r["seconds"] / r["timings"]["method_seconds"] for r in runs],
             "write_seconds": [r["timings"]["write_seconds"] for r in runs],
             "wall_seconds": typical["wall_seconds"], "row_seconds": sum(r["wall_seconds"] for r in runs),
             "overhead_seconds": seconds - floor, "note": note}
    return Row(name, 8, 224, "runner", seconds, floor, repeats=repeats, extra=extra)


# ------------------------------------------------------------------ data-set scans


SCANS = ("top_patches", "gradcam_scan", "top_patches_run", "gradcam_run")


@dataclass
class ScanPlan:
    """A scan's data set: `images` random pixel images of side `size`, loaded `batch` at a time."""

    size: int
    images: int
    batch: int
    repeats: int

    @classmethod
    def make(cls, quick: bool) -> "ScanPlan":
        return cls(64, 32, 8, 1) if quick else cls(224, 128, 32, 3)


def scan_loader(plan: ScanPlan) -> Any:
    """`plan.images` pixels in [0, 1] with their indices in a TensorDataset, batched by a DataLoader:
    the one loader that method and floor both iterate."""
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(plan.images * 1000 + plan.size)
    pixels = torch.rand(plan.images, 3, plan.size, plan.size, generator=generator)
    return DataLoader(TensorDataset(pixels, torch.arange(plan.images)), batch_size=plan.batch)


def inference_floor(model: nn.Module, loader: Any, space: Any) -> None:
    """The model's plain batched inference over the loader: `model(space.from_pixels(pixels))`, no_grad."""
    with torch.no_grad():
        for pixels, _ in loader:
            model(space.from_pixels(pixels))


def throughput(images: int, seconds: float, floor_seconds: float) -> dict[str, Any]:
    """A scan's figures: images per second of the method and of the floor, and the floor's time over the
    method's (``throughput_ratio``: the method's share of plain inference's throughput, the ratio's inverse)."""
    return {"images": images, "images_per_second": images / seconds, "floor_images_per_second": images / floor_seconds,
            "throughput_ratio": floor_seconds / seconds}


def warm_scan(fns: dict[str, Callable[[Any], Any]], loader: Any) -> None:
    """One batch through each fn (the full warm-up would double the row's cost)."""
    first = [next(iter(loader))]
    for fn in fns.values():
        fn(first)


def top_patches_row(model: nn.Module, plan: ScanPlan) -> Row:
    """start → update over the loader → merge([state]); finish (the crops) timed apart."""
    import vizkit
    from vizkit.core.pixels import PixelSpace

    method = vizkit.create_method("top_patches", layer="layer4", channels="all", k=9)
    loader = scan_loader(plan)
    space = PixelSpace.for_model(model)

    def scan(batches: Any = loader) -> Any:
        with torch.no_grad():
            state = method.start(model, space)
            for pixels, indices in batches:
                state = method.update(state, model, pixels, indices, space)
            return method.merge([state])

    def floor(batches: Any = loader) -> None:
        inference_floor(model, batches, space)

    warm_scan({"method": scan, "floor": floor}, loader)
    times = time_alternating({"method": scan, "floor": floor}, plan.repeats, warmup=False)
    state = scan()
    chosen = vizkit.create_method("top_patches", layer="layer4", channels="top:6", k=9)
    dataset = loader.dataset.tensors[0]
    finish = time_alternating({"finish": lambda: chosen.conclude(state, model, space, lambda i: dataset[i])}, 1)["finish"]
    extra = throughput(plan.images, times["method"].median, times["floor"].median)
    extra.update(finish_seconds=finish.median, finish_settings={"channels": "top:6", "k": 9},
                 settings={"layer": "layer4", "channels": "all", "k": 9, "loader_batch": plan.batch})
    note = ("seconds: start, update per loader batch, merge([state]) (finish not included: finish_seconds); floor: the same "
            "loader's batches through model(space.from_pixels(pixels)) under no_grad, the whole model (the method stops "
            "after layer4 and skips the head); throughput_ratio = floor / seconds (goal >= 0.9)")
    return Row.timed("top_patches", torch.empty(plan.batch, 3, plan.size, plan.size), times, None, stage="scan",
                     **extra, note=note)


def gradcam_scan_row(model: nn.Module, plan: ScanPlan) -> Row:
    """Data-set attribution: `create_method("gradcam").attribute(model, x)` (predicted class) per batch."""
    import vizkit
    from vizkit.core.pixels import PixelSpace

    method = vizkit.create_method("gradcam")
    loader = scan_loader(plan)
    space = PixelSpace.for_model(model)

    def scan(batches: Any = loader) -> None:
        for pixels, _ in batches:
            method.attribute(model, space.from_pixels(pixels))

    def floor(batches: Any = loader) -> None:
        inference_floor(model, batches, space)

    def gradient_floor(batches: Any = loader) -> None:  # each input's predicted class: one forward, backward to layer4
        for pixels, _ in batches:
            layer_gradient_floor(model, model.layer4, space.from_pixels(pixels), None)

    fns = {"method": scan, "floor": floor, "gradient_floor": gradient_floor}
    warm_scan(fns, loader)
    times = time_alternating(fns, plan.repeats, warmup=False)
    gradient = times["gradient_floor"]
    extra = throughput(plan.images, times["method"].median, times["floor"].median)
    extra.update(gradient_floor_seconds=gradient.median, gradient_floor_min=min(gradient.wall),
                 gradient_floor_images_per_second=plan.images / gradient.median,
                 ratio_vs_gradient_floor=times["method"].median / gradient.median,
                 settings={"layer": "layer4", "target": "predicted (None)", "loader_batch": plan.batch})
    note = ("seconds: gradcam attribute(model, space.from_pixels(pixels)) per loader batch, target None (predicted class); "
            "floor: plain no_grad inference over the same batches; gradient_floor: per batch one forward with a hook on "
            "layer4, autograd.grad of the predicted logits' sum w.r.t. layer4's output")
    return Row.timed("gradcam_scan", torch.empty(plan.batch, 3, plan.size, plan.size),
                     {k: v for k, v in times.items() if k != "gradient_floor"}, None, stage="scan", **extra, note=note)


SCAN_RUNS = {  # whole `vizkit` runs over an ImageFolder of JPEG files: the method's overrides
    "top_patches_run": ["method=top_patches", "method.layer=layer4", "method.channels=top:8", "method.k=9"],
    "gradcam_run": ["method=gradcam"],
}


def write_image_folder(root: Path, images: int, classes: int = 4, size: int = 256) -> None:
    """`images` JPEG files (quality 90) in `classes` class folders: smooth random pictures (noise
    upsampled from 16 px), which compress like photographs rather than like noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for index in range(images):
        folder = root / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        small.resize((size, size), Image.BICUBIC).save(folder / f"img{index:04d}.jpg", quality=90)


# The floor of a whole-run scan row, in a fresh process like the run: the model the run loads (seed 0,
# `load_model`), the same files through the same loader, plain batched inference; prints the pass's seconds.
SCAN_RUN_FLOOR = """
import sys, time, torch
from vizkit.core.data import input_loader, open_inputs
from vizkit.core.models import data_config, load_model
from vizkit.core.pixels import PixelSpace
folder, batch, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = load_model(sys.argv[4])
inputs = open_inputs({"kind": "imagefolder", "root": folder}, data_config(model))
space = PixelSpace.for_model(model)
started, cpu = time.perf_counter(), time.process_time()
with torch.no_grad():
    for batch_ in input_loader({"batch_size": batch, "workers": workers, "pin_memory": False}, inputs, "cpu"):
        model(space.from_pixels(batch_["pixels"]))
print(time.perf_counter() - started, time.process_time() - cpu)
"""


def scan_run_row(name: str, plan: ScanPlan, folder: Path, workdir: Path, workers: int) -> Row:
    """A whole `vizkit` run over the folder (a subprocess: Hydra, Trainer, decoding in `workers` loader
    processes, the method, the writing) against the floor: the model's plain batched inference over
    the same files through the same loader (`open_inputs` + `input_loader`, same batch and workers),
    also in a fresh subprocess, so that both pay the same first-pass costs. In turn, `plan.repeats`
    times each."""
    runs, floors = [], Timing()
    for repeat in range(plan.repeats):
        run_dir = workdir / f"run-{name}-{repeat}"
        command = [sys.executable, "-m", "vizkit.cli.app", f"model={MODEL}", "data=imagefolder", f"data.root={folder}",
                   f"data.batch_size={plan.batch}", f"data.workers={workers}", "trainer.accelerator=cpu",
                   "trainer.progress_bar=false", *SCAN_RUNS[name], f"hydra.run.dir={run_dir}"]
        done = subprocess.run(command, cwd=workdir, env=run_env(), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"vizkit {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        runs.append(json.loads((run_dir / "results.json").read_text())["timings"])
        floor = subprocess.run([sys.executable, "-c", SCAN_RUN_FLOOR, str(folder), str(plan.batch), str(workers), MODEL],
                               cwd=workdir, env=run_env(), capture_output=True, text=True, check=True)
        wall, cpu = map(float, floor.stdout.split()[-2:])
        floors.wall.append(wall)
        floors.cpu.append(cpu)
    key = "scan_seconds" if "scan_seconds" in runs[0] else "predict_seconds"
    seconds = statistics.median(r[key] for r in runs)
    typical = min(runs, key=lambda r: abs(r[key] - seconds))
    images = sum(1 for path in folder.rglob("*.jpg"))
    extra = {**throughput(images, seconds, floors.median), "run_seconds": [r[key] for r in runs], "floor_runs": floors.wall,
             "floor_cpu": floors.cpu, "timings": typical,
             "settings": {"overrides": SCAN_RUNS[name], "workers": workers, "loader_batch": plan.batch,
                          "files": "JPEG q90, 256 px, resized and center-cropped to 224 by timm's eval transform"},
             "note": f"seconds: the run's {key} (Trainer, decoding in the loader's workers, the method, per-batch writing; "
                     "not the model load, not top_patches' crops: finish_seconds in timings); floor: a fresh process with the "
                     "run's model (seed 0), the same files through the same loader, model(space.from_pixels(pixels)) under "
                     "no_grad, the pass alone timed; both cold (first-pass costs in both); throughput_ratio = floor / seconds (goal >= 0.9)"}
    return Row(name, plan.batch, 224, "scan", seconds, floors.median, repeats=plan.repeats, extra=extra)  # 224: timm's eval size for resnet18
