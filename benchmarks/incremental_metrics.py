"""Would deletion, insertion and ROAD gain from occlusion's incremental engine? (issue 19, "shared machinery")

Each of their curves is a series of images that differ from one reference image (deletion and ROAD: the
input; insertion: its blurred substrate) in the pixels switched so far. The incremental engine
(``vizkit.probes.incremental``) recomputes only the projection of a changed box through the layers, so
it pays off only while that box is small. This script measures, on real maps:

* the changed box's share of the image at each step (the bounding box of the switched pixels);
* the time of the whole curve through the engine (steps batched 16 at a time, as the metrics do, each
  batch's box the union of its steps' boxes) against plain batched forwards, alternating, one thread,
  and that both give the same logits.

Models: the embedded model (128 px shapes) and resnet18 with random weights (shapes upscaled to 224);
maps: Grad-CAM (compact blobs, the engine's best case) and saliency (scattered pixels). Writes
``incremental-metrics.json`` beside this file.

    ../.venv/bin/python incremental_metrics.py
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from floors import make_model

STEPS, BATCH = 32, 16


def changed_boxes(ranks: torch.Tensor, counts: list[int]) -> list[tuple[int, int, int, int] | None]:
    """Per step, the bounding box (y0, y1, x0, x1) of the pixels whose rank is below the step's count."""
    boxes = []
    for n in counts:
        if n == 0:
            boxes.append(None)
            continue
        where = torch.nonzero(ranks < n)
        ys, xs = where[:, 0], where[:, 1]
        boxes.append((int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1))
    return boxes


def union(boxes):
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes)


def curve_images(reference: torch.Tensor, other: torch.Tensor, ranks: torch.Tensor, counts: list[int]) -> torch.Tensor:
    switched = torch.stack([ranks < n for n in counts])[:, None]  # [K+1,1,H,W]
    return torch.where(switched, other, reference)


def measure(model_name: str, method_name: str, images: torch.Tensor, model) -> dict:
    import vizkit
    from vizkit.metrics.perturbation import importance_ranks, substrate_pixels, switch_counts
    from vizkit.core.pixels import PixelSpace
    from vizkit.probes.incremental import IncrementalModel

    space = PixelSpace.for_model(model)
    x = space.from_pixels(images)
    maps = vizkit.create_method(method_name).attribute(model, x)
    engine, why = IncrementalModel.prepare(model)
    assert engine is not None, why
    height, width = x.shape[-2:]
    counts = switch_counts(height * width, STEPS)
    blurred = space.from_pixels(substrate_pixels(images, "blur")).to(x.dtype)
    black = space.from_pixels(substrate_pixels(images, "black")).to(x.dtype)
    result = {"model": model_name, "maps": method_name, "images": int(x.shape[0]), "size": int(height)}
    for metric in ("deletion", "insertion"):
        shares, naive_s, incremental_s, worst = [], 0.0, 0.0, 0.0
        dense_from = {}
        for b in range(x.shape[0]):
            ranks = importance_ranks(maps[b : b + 1])[0].view(height, width)
            reference, other = (x[b : b + 1], black[b : b + 1]) if metric == "deletion" else (blurred[b : b + 1], x[b : b + 1])
            steps = curve_images(reference, other, ranks, counts)  # [K+1, C, H, W]
            boxes = changed_boxes(ranks, counts)
            shares += [0.0 if box is None else (box[1] - box[0]) * (box[3] - box[2]) / (height * width) for box in boxes]
            with torch.no_grad():
                started = time.perf_counter()
                naive = torch.cat([model(steps[i : i + BATCH]) for i in range(0, len(steps), BATCH)])
                naive_s += time.perf_counter() - started
                started = time.perf_counter()
                run = engine.clean(reference)
                outputs = []
                for i in range(0, len(steps), BATCH):
                    box = union(boxes[i : i + BATCH])
                    chunk = steps[i : i + BATCH]
                    if box is None:
                        outputs.append(run.output.expand(len(chunk), -1))
                        continue
                    y0, y1, x0, x1 = box
                    outputs.append(run.occluded([y0] * len(chunk), [x0] * len(chunk), chunk[:, :, y0:y1, x0:x1].clone()))
                incremental = torch.cat(outputs)
                incremental_s += time.perf_counter() - started
                dense_from[run.report.dense_from] = dense_from.get(run.report.dense_from, 0) + 1
            worst = max(worst, float((incremental - naive).abs().max() / naive.abs().max()))
        shares_t = torch.tensor(shares)
        result[metric] = {
            "box_share_median": float(shares_t.median()), "steps_under_60_percent": float((shares_t < 0.6).float().mean()),
            "naive_seconds": naive_s, "incremental_seconds": incremental_s, "speedup": naive_s / incremental_s,
            "max_relative_logit_difference": worst, "dense_from": dense_from,
        }
        print(model_name, method_name, metric, json.dumps(result[metric]), flush=True)
    return result


def main() -> None:
    from vizkit.core.data import load_shapes
    from vizkit.core.models import data_config, load_model

    torch.set_num_threads(1)
    embedded = load_model("embedded").eval()
    samples = load_shapes(8, "test", 0, data_config(embedded))
    pixels = torch.stack([s.pixels for s in samples])
    rows = []
    for method_name in ("gradcam", "saliency"):
        rows.append(measure("embedded", method_name, pixels, embedded))
    resnet = make_model("resnet18")
    large = F.interpolate(pixels[:4], size=224, mode="bilinear", align_corners=False).clamp(0, 1)
    for method_name in ("gradcam", "saliency"):
        rows.append(measure("resnet18", method_name, large, resnet))
    out = Path(__file__).with_name("incremental-metrics.json")
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": STEPS, "batch": BATCH, "threads": 1, "rows": rows}, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
