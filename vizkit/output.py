"""What a run leaves behind, inside Hydra's run directory:

    .hydra/            the composed config (written by Hydra)
    tensorboard/       event files: images tagged METHOD/INPUT/{input,map,overlay}, scalars, hparams
    images/INPUT.png   input | map | overlay, side by side
    maps.npz           the raw maps, by input name
    results.json       predictions, targets, metrics, timings

Nothing is ever overwritten: a directory that already holds results is refused.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vizkit import render
from vizkit.errors import VizkitError

RESULTS = "results.json"
TENSORBOARD_DIR = "tensorboard"


def check_fresh(run_dir: Path) -> None:
    if (run_dir / RESULTS).exists():
        raise VizkitError(f"{run_dir} already holds the results of an earlier run; choose another hydra.run.dir")


class RunWriter:
    """Writes one run's pictures, maps and results; `writer` is a TensorBoard SummaryWriter."""

    def __init__(self, run_dir: Path, method_name: str, writer: Any) -> None:
        self.run_dir = run_dir
        self.method_name = method_name
        self.writer = writer
        self.maps: dict[str, np.ndarray] = {}
        (run_dir / "images").mkdir(parents=True, exist_ok=True)

    def add_attribution(self, name: str, pixels: torch.Tensor, attribution: torch.Tensor) -> str:
        """Log one input's map; returns the PNG's path relative to the run directory."""
        heat = render.colorize(attribution)
        pictures = {
            "input": render.to_uint8(pixels),
            "map": heat,
            "overlay": render.overlay(pixels, attribution, heat=heat),
        }
        for part, picture in pictures.items():
            self.writer.add_image(f"{self.method_name}/{name}/{part}", picture, dataformats="HWC")
        relative = f"images/{name}.png"
        # fast zlib level: the panel is for looking at, and encoding dominated small runs
        Image.fromarray(render.panel(list(pictures.values()))).save(self.run_dir / relative, compress_level=1)
        self.maps[name] = attribution.float().cpu().numpy()
        return relative

    def add_attributions(self, items: list[tuple[str, torch.Tensor, torch.Tensor]]) -> list[str]:
        """``add_attribution`` for many inputs at once, rendered in parallel: PNG encoding (PIL
        releases the GIL there) dominated small runs, and the cores sit idle after prediction."""
        workers = max(1, min(len(items), os.cpu_count() or 1, 8))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda item: self.add_attribution(*item), items))

    def add_scalars(self, values: dict[str, float], step: int = 0) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def finish(self, results: dict[str, Any]) -> Path:
        if self.maps:
            np.savez(self.run_dir / "maps.npz", **self.maps)
        path = self.run_dir / RESULTS
        with open(path, "x") as file:  # "x": never replace an earlier run's results
            json.dump(results, file, indent=2)
        self.writer.flush()
        return path
