"""The benchmark's rows: which exist, the plan of sizes and repeats (full or --quick), and the stages
that make them, in order. The row functions themselves: ``rows_methods`` (method and metric rows),
``rows_cams`` and ``rows_catalogue`` (more method rows), ``rows_robustness`` (issue 18's attack and
metric rows), ``rows_optimization`` (optimization rows), ``rows_runs`` (runner rows: whole runs; scan rows)."""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from floors import make_input, make_model, make_vit_model
from harness import Row, set_threads
from rows_methods import (attack_row, attention_rollout_vit_row, gradcam_row, gradcam_vit_row, gradient_row,
                          gradient_weighted_attention_vit_row, guided_gradcam_row, integrated_gradients_row, mask_row, occlusion_row,
                          perturbation_row, randomization_row, smoothgrad_row)
from rows_cams import CAMS, MANY_FORWARDS, cam_row
from rows_catalogue import CATALOGUE, catalogue_row
from rows_optimization import OPTIMIZATION_METHODS, Skipped, optimization_row
from rows_incremental import INCREMENTAL_ROWS, TARGET_SET_ROWS, incremental_row, target_set_row
from rows_robustness import ATTACKS as ROBUSTNESS_ATTACKS, METRICS as ROBUSTNESS_METRICS, robustness_method_row, robustness_metric_row
from rows_runs import (SCAN_RUNS, SCANS, ScanPlan, gradcam_scan_row, runner_row, scan_run_row, top_patches_row,
                       write_image_folder, write_images)

GRADIENT_METHODS = ("saliency", "guided_backprop", "deconvnet", "input_x_gradient")
ADVERSARIAL_METHODS = ("fgsm", "pgd")
METHODS = ("occlusion", *GRADIENT_METHODS, "gradcam", "guided_gradcam", "integrated_gradients", "smoothgrad", *ADVERSARIAL_METHODS, *CAMS,
           *CATALOGUE, *ROBUSTNESS_ATTACKS)  # issue 18's attacks: method stage only (apgd_ce, apgd_t, ... are rows, not methods to run)
VIT_ROWS = {"gradcam_vit": gradcam_vit_row, "attention_rollout_vit": attention_rollout_vit_row,  # method rows on vit_small_patch16_224
            "gradient_weighted_attention_vit": gradient_weighted_attention_vit_row}
METRICS = ("deletion", "insertion", "pointing_game", "mask_energy", "randomization", *ROBUSTNESS_METRICS)
ROWS = METHODS + tuple(VIT_ROWS) + METRICS + OPTIMIZATION_METHODS + SCANS  # the default run
ALL_ROWS = ROWS + INCREMENTAL_ROWS + TARGET_SET_ROWS  # issue 19's rows (minutes of naive occlusion each) run when named
STAGES = ("method", "metric", "runner", "optimization", "scan")


@dataclass
class Plan:
    """Sizes and repeats of one mode: full (224 px, batch 1 and 8) or --quick (64 px, batch 1)."""

    size: int
    batches: tuple[int, ...]
    repeats: dict[int, int]  # one-pass methods (saliency, gradcam, ...) and cheap metrics
    occlusion: dict[str, int]
    occlusion_repeats: dict[int, int]
    ig_steps: dict[int, int]
    ig_repeats: dict[int, int]
    smoothgrad_samples: dict[int, int]
    smoothgrad_repeats: dict[int, int]
    perturbation_repeats: dict[int, int]
    randomization_repeats: dict[int, int]
    # Score-CAM and Ablation-CAM: one forward per channel (512 at layer4); at batch 8 one timed call, no
    # warm-up (the floor and pytorch-grad-cam make 4,096 forwards a call, ~4 min each)
    many_forward_repeats: dict[int, int] = field(default_factory=lambda: {1: 2, 8: 1})
    randomization_steps: int = 3
    # optimization rows: image side, optimizer steps per run, timed runs, and batch -> rows with a lucent peer
    optimization_size: int = 128
    optimization_steps: int = 32
    optimization_repeats: int = 3
    optimization_batches: dict[int, bool] = field(default_factory=lambda: {1: True})
    # ViT method rows: one batch, at the size the ViT is created for (--quick: img_size=64, a 4x4 patch grid)
    vit_batch: int = 8
    vit_size: int = 224

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if quick:
            return cls(64, (1,), {1: 9}, {"window": 16, "stride": 8}, {1: 5}, ig_steps={1: 32}, ig_repeats={1: 3},
                       smoothgrad_samples={1: 16}, smoothgrad_repeats={1: 5}, perturbation_repeats={1: 5}, randomization_repeats={1: 7},
                       optimization_size=64, optimization_steps=8, optimization_repeats=1, vit_batch=1, vit_size=64)
        # full: ~13 min on a quiet 1-thread CPU; the many-pass rows get fewer repeats and smaller sizes at batch 8
        return cls(224, (1, 8), {1: 7, 8: 5}, {"window": 56, "stride": 28}, {1: 5, 8: 2},
                   ig_steps={1: 64, 8: 16}, ig_repeats={1: 3, 8: 2}, smoothgrad_samples={1: 16, 8: 8}, smoothgrad_repeats={1: 3, 8: 2},
                   perturbation_repeats={1: 5, 8: 2}, randomization_repeats={1: 7, 8: 3})  # optimization: the defaults


def method_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, plan: Plan) -> Row:
    batch = x.shape[0]
    if name == "occlusion":
        return occlusion_row(model, x, target, repeats=plan.occlusion_repeats[batch], warmup=batch == 1, **plan.occlusion)
    if name == "gradcam":
        return gradcam_row(model, x, target, plan.repeats[batch])
    if name == "guided_gradcam":
        return guided_gradcam_row(model, x, target, plan.repeats[batch])
    if name in ROBUSTNESS_ATTACKS:
        return robustness_method_row(name, model, x, plan)
    if name in CATALOGUE:
        return catalogue_row(name, model, x, target, plan.smoothgrad_repeats[batch] if name == "gradient_shap" else plan.repeats[batch],
                             plan.smoothgrad_samples[batch])
    if name in CAMS:
        many = name in MANY_FORWARDS
        return cam_row(name, model, x, target, plan.many_forward_repeats[batch] if many else plan.repeats[batch],
                       warmup=not many or batch == 1)
    if name == "integrated_gradients":
        return integrated_gradients_row(model, x, target, plan.ig_steps[batch], plan.ig_repeats[batch])
    if name == "smoothgrad":
        return smoothgrad_row(model, x, target, plan.smoothgrad_samples[batch], plan.smoothgrad_repeats[batch])
    if name in ADVERSARIAL_METHODS:
        return attack_row(name, model, x, target, plan.repeats[batch] if name == "fgsm" else max(3, plan.repeats[batch] - 2))
    return gradient_row(name, model, x, target, plan.repeats[batch])


def metric_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, plan: Plan) -> Row:
    batch = x.shape[0]
    if name in ROBUSTNESS_METRICS:
        return robustness_metric_row(name, model, x, target, plan)
    if name in ("deletion", "insertion"):
        return perturbation_row(name, model, x, target, plan.perturbation_repeats[batch], warmup=batch == 1)
    if name == "randomization":
        return randomization_row(model, x, target, plan.randomization_steps, plan.randomization_repeats[batch])
    return mask_row(name, model, x, target, plan.repeats[batch], inner=20)


def run_rows(names: list[str], stages: set[str], quick: bool, progress: Callable[[Row], None],
             batches: tuple[int, ...] | None = None) -> tuple[list[Row], dict[str, str]]:
    """The rows ``names`` asks for, stage by stage (method and metric rows per batch, then runner,
    optimization and scan rows), each handed to ``progress`` when done; and the optimization rows
    skipped, with why (``NAME/batchB``: reason). ``batches``: only these of the plan's method and
    metric batches (default: all)."""
    plan = Plan.make(quick)
    if batches is not None:
        plan.batches = tuple(b for b in plan.batches if b in batches)
    methods = [name for name in names if name in METHODS]
    vits = [name for name in names if name in VIT_ROWS]
    metrics = [name for name in names if name in METRICS]
    optimizations = [name for name in names if name in OPTIMIZATION_METHODS]
    scans = [name for name in names if name in SCANS]
    rows: list[Row] = []
    model = make_model()

    def timed_row(make: Callable[[], Row]) -> Row:
        set_threads()
        started = time.perf_counter()
        row = make()
        row.extra["row_seconds"] = time.perf_counter() - started  # tuning and warm-up included
        rows.append(row)
        progress(row)
        return row

    for batch in plan.batches:
        x, target = make_input(batch, plan.size)
        todo = [(name, method_row) for name in methods if "method" in stages]
        todo += [(name, metric_row) for name in metrics if "metric" in stages]
        for name, make_row in todo:
            timed_row(lambda: make_row(name, model, x, target, plan))
    if "method" in stages and vits:  # vit_small_patch16_224 (random weights), one batch
        vit = make_vit_model(plan.vit_size)
        x, target = make_input(plan.vit_batch, plan.vit_size)
        for name in vits:
            timed_row(lambda: VIT_ROWS[name](vit, x, target, plan.repeats[plan.vit_batch]))
    if "method" in stages:  # issue 19's rows: batch 1, 224 px, their own models (rows_incremental.py)
        for name in [name for name in names if name in INCREMENTAL_ROWS]:
            timed_row(lambda: incremental_row(name))
        for name in [name for name in names if name in TARGET_SET_ROWS]:
            timed_row(lambda: target_set_row(name))
    if "runner" in stages and methods:
        with tempfile.TemporaryDirectory(prefix="vizkit-bench-") as tmp:
            workdir = Path(tmp)
            write_images(workdir / "images")
            for name in [name for name in methods if name not in ROBUSTNESS_ATTACKS]:  # rows named for their settings, and long runs
                rows.append(runner_row(name, workdir / "images", workdir))  # row_seconds: its runs'
                progress(rows[-1])
                set_threads()
    skipped: dict[str, str] = {}
    if "optimization" in stages and optimizations:
        with tempfile.TemporaryDirectory(prefix="vizkit-bench-opt-") as tmp:
            for batch, with_peer in plan.optimization_batches.items():
                for name in optimizations:
                    try:
                        timed_row(lambda: optimization_row(name, model, batch, plan.optimization_size, plan.optimization_steps,
                                                           plan.optimization_repeats, Path(tmp), with_peer))
                    except Skipped as why:
                        skipped[f"{name}/batch{batch}"] = str(why)
                        print(f"  skipped {name} batch {batch}: {why}", file=sys.stderr, flush=True)
    if "scan" in stages and scans:
        scan_plan = ScanPlan.make(quick)
        with tempfile.TemporaryDirectory(prefix="vizkit-bench-scan-") as tmp:
            if any(name in SCAN_RUNS for name in scans):
                write_image_folder(Path(tmp) / "folder", scan_plan.images)
            for name in scans:
                if name in SCAN_RUNS:
                    timed_row(lambda: scan_run_row(name, scan_plan, Path(tmp) / "folder", Path(tmp), workers=1))
                else:
                    timed_row(lambda: (top_patches_row if name == "top_patches" else gradcam_scan_row)(model, scan_plan))
    return rows, skipped
