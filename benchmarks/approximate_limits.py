"""How good can adaptive drill-down be on these models? (issue 19, approximate occlusion)

Krypton's drill-down evaluates a coarse grid of windows, estimates the rest from it, and then evaluates
the share it judges most important. Its speed is set by the share of windows evaluated; its quality by
how well a window's drop can be told from its evaluated neighbours'. This script measures both limits on
exact occlusion maps (window 16, stride 8, the probability drop of the predicted class):

* ``autocorrelation``: the correlation of the drops of windows 1, 2 and 4 strides apart (rows and columns
  pooled), per model. A coarse grid at ``coarse_factor`` 2 sees only windows 2 strides apart, so where that
  correlation is near 0 the skipped windows' drops cannot be estimated from it;
* ``drill_down``: for coarse factors 2 and 3 and drill-down shares 0-0.2, the share of windows evaluated,
  and the maps' mean and lowest Pearson correlation with the exact map and how often their most important
  pixel is the same, for two rules choosing the drilled windows: ``shipped`` (vizkit's: the highest
  estimates, run through ``occlusion_passes.drill_down`` itself) and ``oracle`` (the windows whose
  estimate is furthest from the exact drop: no rule that sees only the coarse pass can do better).

Models: the embedded model on 50 held-out shapes (128 px) and resnet18 with random weights on 6 shapes
upscaled to 224 px. Writes ``approximate-limits.json`` beside this file.

    ../.venv/bin/python approximate_limits.py
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from floors import make_model

WINDOW, STRIDE = 16, 8
FACTORS, SHARES, LAGS = (2, 3), (0.0, 0.05, 0.1, 0.15, 0.2), (1, 2, 4)


def exact_drops(model, x: torch.Tensor) -> list[tuple[list, torch.Tensor]]:
    """Per image, its windows (y0, y1, x0, x1) and their exact drops, from vizkit's own occlusion."""
    import vizkit
    from vizkit.methods.attribution.occlusion import Occlusion

    class Recording(Occlusion):
        def _passes(self, *args):
            passes = super()._passes(*args)
            drops = passes.drops

            def recorded(b, boxes):
                values = drops(b, boxes)
                self.recorded.append((boxes, values.clone()))
                return values

            passes.drops = recorded
            return passes

    method = Recording(vizkit.create_method("occlusion", window=WINDOW, stride=STRIDE, batch_size=16).config)
    method.recorded = []
    method.attribute(model, x)
    return method.recorded


class KnownDrops:
    """``Passes`` for ``drill_down``: it answers from drops already computed."""

    def __init__(self, boxes: list, drops: torch.Tensor) -> None:
        self.index = {box: i for i, box in enumerate(boxes)}
        self.values = drops
        self.evaluated = 0

    def drops(self, b: int, boxes: list) -> torch.Tensor:
        self.evaluated += len(boxes)
        return self.values[[self.index[box] for box in boxes]]


def mean_map(boxes: list, drops: torch.Tensor, height: int, width: int) -> torch.Tensor:
    masks = torch.zeros(len(boxes), height, width, dtype=torch.float64)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = 1
    masks = masks.flatten(1)
    return (drops.double() @ masks) / masks.sum(0)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double() - a.double().mean(), b.flatten().double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def oracle(boxes: list, drops: torch.Tensor, height: int, width: int, factor: int, share: float) -> tuple[torch.Tensor, int]:
    """The coarse pass and its bilinear estimate as shipped; then the windows with the largest error drilled."""
    from vizkit.methods.attribution.occlusion_passes import _bilinear, window_starts

    step = factor * STRIDE
    rows, cols = window_starts(height, WINDOW, step), window_starts(width, WINDOW, step)
    position = {(box[0], box[2]): i for i, box in enumerate(boxes)}
    coarse = [position[(y, x)] for y in rows for x in cols]
    estimate = _bilinear(drops[coarse].view(len(rows), len(cols)), rows, cols, [b[0] for b in boxes], [b[2] for b in boxes])
    estimate[coarse] = drops[coarse]
    rest = torch.ones(len(boxes), dtype=torch.bool)
    rest[coarse] = False
    candidates = torch.nonzero(rest).flatten()
    error = (estimate - drops).abs()
    chosen = candidates[error[candidates].argsort(descending=True)[: math.ceil(share * len(boxes))]]
    estimate[chosen] = drops[chosen]
    return estimate, len(coarse) + len(chosen)


def drill_down_quality(recorded: list, height: int, width: int) -> list[dict]:
    from types import SimpleNamespace

    from vizkit.methods.attribution.occlusion_passes import drill_down

    rows = []
    for factor in FACTORS:
        for share in SHARES:
            for rule in ("shipped", "oracle"):
                scores, same, evaluated, total = [], [], 0, 0
                for boxes, drops in recorded:
                    if rule == "shipped":
                        passes = KnownDrops(boxes, drops)
                        config = SimpleNamespace(window=WINDOW, stride=STRIDE, coarse_factor=factor, drill_down=share)
                        approximate, count = drill_down(passes, 0, boxes, height, width, config), passes.evaluated
                    else:
                        approximate, count = oracle(boxes, drops, height, width, factor, share)
                    exact_map, approximate_map = mean_map(boxes, drops, height, width), mean_map(boxes, approximate, height, width)
                    scores.append(pearson(approximate_map, exact_map))
                    same.append(bool(approximate_map.argmax() == exact_map.argmax()))
                    evaluated, total = evaluated + count, total + len(boxes)
                rows.append({"coarse_factor": factor, "drill_down": share, "rule": rule, "evaluated_share": round(evaluated / total, 3),
                             "pearson_mean": round(sum(scores) / len(scores), 4), "pearson_lowest": round(min(scores), 4),
                             "same_top1_share": round(sum(same) / len(same), 3)})
    return rows


def autocorrelation(recorded: list, height: int, width: int) -> dict:
    from vizkit.methods.attribution.occlusion_passes import window_starts

    n_rows, n_cols = len(window_starts(height, WINDOW, STRIDE)), len(window_starts(width, WINDOW, STRIDE))
    out = {}
    for lag in LAGS:
        values = []
        for _, drops in recorded:
            grid = drops.double().view(n_rows, n_cols)
            first = torch.cat([grid[:, :-lag].flatten(), grid[:-lag].flatten()])
            second = torch.cat([grid[:, lag:].flatten(), grid[lag:].flatten()])
            values.append(pearson(first, second))
        out[f"lag_{lag}"] = round(sum(values) / len(values), 3)
    return out


def measure(name: str, model, x: torch.Tensor) -> dict:
    recorded = exact_drops(model, x)
    height, width = x.shape[-2:]
    return {"model": name, "images": x.shape[0], "size": [height, width], "windows_per_image": len(recorded[0][0]),
            "autocorrelation": autocorrelation(recorded, height, width), "drill_down": drill_down_quality(recorded, height, width)}


def main() -> None:
    from vizkit.core.data import load_shapes
    from vizkit.core.models import data_config, load_model
    from vizkit.core.pixels import PixelSpace

    embedded = load_model("embedded").eval()
    samples = load_shapes(50, "test", 0, data_config(embedded))
    pixels = torch.stack([sample.pixels for sample in samples])
    results = [measure("embedded", embedded, PixelSpace.for_model(embedded).from_pixels(pixels))]
    resnet = make_model("resnet18")
    upscaled = F.interpolate(pixels[:6], size=224, mode="bilinear", align_corners=False)
    results.append(measure("resnet18 (random weights)", resnet, PixelSpace.for_model(resnet).from_pixels(upscaled)))
    out = Path(__file__).with_name("approximate-limits.json")
    out.write_text(json.dumps({"window": WINDOW, "stride": STRIDE, "score": "probability", "results": results}, indent=1) + "\n")
    for result in results:
        print(result["model"], result["autocorrelation"])
        for row in result["drill_down"]:
            print(" ", row)


if __name__ == "__main__":
    main()
