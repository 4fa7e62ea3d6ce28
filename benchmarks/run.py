#!/usr/bin/env python
"""vizkit benchmarks: each method and metric against its floor (the bare passes it needs) and a peer.

    python benchmarks/run.py [--quick] [--rows saliency,deletion,...] [--stages method,metric,runner,optimization,scan] [--out FILE]

Prints one JSON line per row (the first line is the machine canary and the versions); see
benchmarks/README.md for the rows and columns. Everything runs on 1 torch thread (PITFALLS.md: with 2
threads this VM's timings swing several-fold), method, floor and peer runs alternate, and each row
reports the median (and min) over its repeats. Nothing here asserts on a time.
"""
from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported; Lightning then leaves threads alone too

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from collections import OrderedDict
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

THREADS = 1
GRADIENT_METHODS = ("saliency", "guided_backprop", "deconvnet", "input_x_gradient")
ADVERSARIAL_METHODS = ("fgsm", "pgd")
METHODS = ("occlusion", *GRADIENT_METHODS, "gradcam", "guided_gradcam", "integrated_gradients", "smoothgrad", *ADVERSARIAL_METHODS)
METRICS = ("deletion", "insertion", "pointing_game", "mask_energy", "randomization")
MODEL = "resnet18"
CHUNK_CANDIDATES = (8, 16, 32, 64)  # images per forward tried for a peer's batching knob


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


def time_alternating(fns: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True, inner: int = 1) -> dict[str, Timing]:
    """Time each fn, calling them in turn (a, b, c, a, b, c, ...) so machine drift hits all alike.
    ``inner``: calls per timed sample (for sub-millisecond fns); the figures are per call."""
    set_threads()
    gc.collect()
    if warmup:
        for fn in fns.values():
            fn()
    times = {name: Timing() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(inner):
                fn()
            times[name].cpu.append((time.process_time() - cpu) / inner)
            times[name].wall.append((time.perf_counter() - wall) / inner)
    return times


def time_once(fn: Callable[[], Any]) -> float:
    """CPU seconds of one call (choosing a peer's setting: CPU time is least disturbed by other processes)."""
    return time_alternating({"fn": fn}, 1, warmup=False)["fn"].cpu[0]


@dataclass
class Row:
    method: str  # the row's name: a method, or a metric for stage "metric"
    batch: int
    size: int
    stage: str  # "method": the Python API alone; "metric": one metric's evaluate; "runner": a whole `vizkit` run;
    # "optimization": an optimization method's Lightning fit, per optimizer step
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
              has_ratio: bool = True, **extra: Any) -> "Row":
        """A row from `time_alternating` over "method", "floor" and (where there is one) "peer"."""
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
                   has_ratio=has_ratio)

    @property
    def ratio(self) -> float | None:
        return self.seconds / self.floor_seconds if self.has_ratio else None

    def to_json(self) -> str:
        peer_ratio = self.seconds / self.peer_seconds if self.peer_seconds else None
        row = {"method": self.method, "model": self.model, "batch": self.batch, "size": self.size,
               "threads": self.threads, "stage": self.stage, "seconds": self.seconds,
               "floor_seconds": self.floor_seconds, "ratio": self.ratio, "peer": self.peer,
               "peer_seconds": self.peer_seconds, "peer_ratio": peer_ratio, "repeats": self.repeats, **self.extra}
        return json.dumps(_rounded(row))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")  # 6 significant digits: metric rows take microseconds
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def second_peer(times: dict[str, Timing], name: str, seconds: float) -> dict[str, Any]:
    """Extra keys for a second peer timed as "peer2"."""
    peer2 = times["peer2"]
    return {"peer2": name, "peer2_seconds": peer2.median, "peer2_ratio": seconds / peer2.median, "peer2_min": min(peer2.wall),
            "peer2_cpu_seconds": statistics.median(peer2.cpu)}


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


def chunk_candidates(batch: int, limit: int) -> list[int]:
    """Images per forward to try for a peer's batching knob: 8..64, at least one batch, at most `limit`."""
    return sorted({min(max(batch, images), limit) for images in CHUNK_CANDIDATES})


# ------------------------------------------------------------------ gradient methods


def gradient_floor(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One forward and one backward to the input: what saliency, guided backprop and deconvnet need."""
    x = x.detach().requires_grad_()
    score = model(x)[torch.arange(x.shape[0]), target].sum()
    (gradient,) = torch.autograd.grad(score, x)
    return gradient


def gradient_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    import vizkit
    from captum.attr import Deconvolution, GuidedBackprop, InputXGradient, Saliency

    method = vizkit.create_method(name)
    if name == "saliency":
        peer, peer_name, peer_kwargs = Saliency(model), "captum.Saliency(abs=True)", {"abs": True}
    elif name == "input_x_gradient":
        peer, peer_name, peer_kwargs = InputXGradient(model), "captum.InputXGradient", {}
    else:
        captum_cls = GuidedBackprop if name == "guided_backprop" else Deconvolution
        peer, peer_name, peer_kwargs = captum_cls(without_inplace_relus(model)), f"captum.{captum_cls.__name__}", {}
    times = time_alternating({
        "method": lambda: method.attribute(model, x, target),
        "floor": lambda: gradient_floor(model, x, target),
        "peer": lambda: peer.attribute(x, target=target, **peer_kwargs),
    }, repeats)
    note = "floor: model(x)[range(B), target].sum() then autograd.grad w.r.t. x"
    if name in ("guided_backprop", "deconvnet"):
        note += "; captum gets a copy with inplace=False ReLUs"
    return Row.timed(name, x, times, peer_name, note=note)


# ------------------------------------------------------------------ attacks


PGD_STEPS = 10


def attack_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    """FGSM (1 step) or PGD L∞ (10 steps, random start) at ε 8/255, step 2/255, against torchattacks
    on the same pixels with the model's normalization set (``set_normalization_used``). Labels: the
    row's targets, untargeted. Floor: ``steps`` x (forward of the normalized pixels + cross-entropy +
    autograd.grad to the input)."""
    import torch.nn.functional as F
    import torchattacks

    import vizkit
    from vizkit.pixels import PixelSpace

    steps = 1 if name == "fgsm" else PGD_STEPS
    fields = {"eps": "8/255"} if name == "fgsm" else {"eps": "8/255", "step_size": "2/255", "steps": steps, "random_start": True}
    method = vizkit.create_method(name, **fields)
    space = PixelSpace.for_model(model)
    pixels = space.to_pixels(x).clamp(0, 1)
    if name == "fgsm":
        peer = torchattacks.FGSM(model, eps=8 / 255)
    else:
        peer = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=steps, random_start=True)
    peer.set_normalization_used(mean=model.pretrained_cfg["mean"], std=model.pretrained_cfg["std"])

    def floor():
        adversarial = pixels
        for _ in range(steps):
            adversarial = adversarial.detach().requires_grad_()
            loss = F.cross_entropy(model(space.from_pixels(adversarial)), target)
            (gradient,) = torch.autograd.grad(loss, adversarial)
            adversarial = adversarial + gradient.sign()
        return adversarial

    space_x = space.from_pixels(pixels)
    times = time_alternating({
        "method": lambda: method.attack(model, space_x, target),
        "floor": floor,
        "peer": lambda: peer(pixels, target),
    }, repeats)
    note = (f"eps 8/255 (pixels), {steps} step(s)" + ("" if name == "fgsm" else ", step 2/255, random start") +
            "; torchattacks on the same pixels with set_normalization_used(mean, std); floor: steps x (forward + "
            "cross-entropy + autograd.grad to the input)")
    return Row.timed(name, x, times, f"torchattacks.{type(peer).__name__}", passes=x.shape[0] * steps,
                     settings={"eps": "8/255", "steps": steps}, note=note)


# ------------------------------------------------------------------ Grad-CAM


def layer_gradient_floor(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """One forward with a hook that keeps `layer`'s output, then autograd.grad of the target logits' sum
    w.r.t. that output: the backward stops at the layer."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        logits = model(x)
    finally:
        handle.remove()
    score = logits.max(1).values if target is None else logits[torch.arange(x.shape[0]), target]  # None: the predicted class
    (gradient,) = torch.autograd.grad(score.sum(), captured[0])
    return gradient


def gradcam_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    import vizkit
    from captum.attr import LayerAttribution, LayerGradCam
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    method = vizkit.create_method("gradcam")
    captum_cam = LayerGradCam(model, model.layer4)

    def run_captum():
        cam = captum_cam.attribute(x, target=target, relu_attributions=True)
        return LayerAttribution.interpolate(cam, x.shape[-2:], "bilinear")

    # pytorch-grad-cam keeps its hooks on the layer while the object lives: a copy, so they never slow the others
    pgc_model = copy.deepcopy(model)
    pgc = GradCAM(model=pgc_model, target_layers=[pgc_model.layer4])
    pgc_targets = [ClassifierOutputTarget(int(t)) for t in target]
    try:
        times = time_alternating({
            "method": lambda: method.attribute(model, x, target),
            "floor": lambda: layer_gradient_floor(model, model.layer4, x, target),
            "peer": run_captum,
            "peer2": lambda: pgc(input_tensor=x, targets=pgc_targets),
        }, repeats)
    finally:
        pgc.activations_and_grads.release()
    seconds = times["method"].median
    return Row.timed("gradcam", x, times, "captum.LayerGradCam(layer4, relu)+interpolate(bilinear)",
                     **second_peer(times, "pytorch_grad_cam.GradCAM([layer4])", seconds), settings={"layer": "layer4"},
                     note="floor: one forward with a hook keeping layer4's output, autograd.grad of the target logits' sum "
                          "w.r.t. it (the backward stops at layer4); pytorch-grad-cam runs on a copy (its hooks stay while it lives) "
                          "and also computes every weight gradient")


def guided_gradcam_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    import vizkit
    from captum.attr import GuidedGradCam

    method = vizkit.create_method("guided_gradcam")
    copied = without_inplace_relus(model)
    peer = GuidedGradCam(copied, copied.layer4)

    def floor():
        layer_gradient_floor(model, model.layer4, x, target)
        return gradient_floor(model, x, target)

    times = time_alternating({
        "method": lambda: method.attribute(model, x, target),
        "floor": floor,
        "peer": lambda: peer.attribute(x, target=target, interpolate_mode="bilinear"),
    }, repeats)
    return Row.timed("guided_gradcam", x, times, "captum.GuidedGradCam(layer4, bilinear)", settings={"layer": "layer4"},
                     note="floor: gradcam's floor (forward + backward to layer4) then the gradient floor (forward + backward "
                          "to x); captum gets a copy with inplace=False ReLUs")


# ------------------------------------------------------------------ many-pass gradient methods


def chunked_gradient_floor(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, chunk: int) -> None:
    """Forward + backward to the input for pre-built images, `chunk` images per pass."""
    for inputs, chunk_targets in zip(images.split(chunk), targets.split(chunk)):
        gradient_floor(model, inputs, chunk_targets)


def integrated_gradients_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int, repeats: int) -> Row:
    import vizkit
    from captum.attr import IntegratedGradients
    from vizkit.baselines import pixel_baseline
    from vizkit.methods.attribution.integrated_gradients import quadrature
    from vizkit.pixels import PixelSpace

    method = vizkit.create_method("integrated_gradients", steps=steps)
    config = method.config
    chunk, batch = config.batch_size, x.shape[0]
    pixels = PixelSpace.for_model(model)  # the method's default baseline, built here for the floor and captum
    baseline = pixels.from_pixels(pixel_baseline(config.baseline, pixels.to_pixels(x), seed=config.seed))
    # the floor's interpolated images, built outside the timing, step-major as the method and captum
    alphas, _ = quadrature(steps, config.rule)
    rows = torch.arange(batch).repeat(steps)
    alpha = torch.tensor(alphas, dtype=x.dtype).repeat_interleave(batch).view(-1, 1, 1, 1)
    images = baseline[rows] + alpha * (x - baseline)[rows]
    targets = target[rows]

    def floor():
        with torch.no_grad():  # the method's S(x) and S(baseline), for its completeness error
            model(x)
            model(baseline)
        chunked_gradient_floor(model, images, targets, chunk)

    peer = IntegratedGradients(model)
    run_peer = lambda images_per_pass, n_steps=steps: peer.attribute(x, baselines=baseline, target=target, n_steps=n_steps,
                                                                     method=config.rule, internal_batch_size=images_per_pass)
    # captum's best internal_batch_size among 8..64 images per pass, each timed once on (at most) 64 images:
    # a chunk size's cost per image does not depend on how many steps there are
    trial_steps = min(steps, max(1, max(CHUNK_CANDIDATES) // batch))
    tried = {str(n): time_once(lambda n=n: run_peer(n, trial_steps)) for n in chunk_candidates(batch, trial_steps * batch)}
    best = int(min(tried, key=tried.get))
    fns = {"method": lambda: method.attribute(model, x, target), "floor": floor, "peer": lambda: run_peer(best),
           # the same work as vizkit: captum also reports the completeness gap (its 2 extra forwards)
           "peer2": lambda: peer.attribute(x, baselines=baseline, target=target, n_steps=steps, method=config.rule,
                                           internal_batch_size=best, return_convergence_delta=True)}
    if best != chunk:  # vizkit with captum's chunk: the same batching as the peer's best
        same = vizkit.create_method("integrated_gradients", steps=steps, batch_size=best)
        fns["method_at_peer_chunk"] = lambda: same.attribute(model, x, target)
    times = time_alternating(fns, repeats, warmup=False)  # the model is warm; the captum trials warmed the peer
    settings = {"steps": steps, "rule": config.rule, "baseline": config.baseline, "batch_size": chunk,
                "peer_internal_batch_size": best, "peer_tried": tried, "peer_tried_steps": trial_steps}
    extra = {**_at_peer_chunk(times, best),
             **second_peer(times, f"captum.IntegratedGradients({config.rule}, return_convergence_delta=True)", times["method"].median)}
    return Row.timed("integrated_gradients", x, times, f"captum.IntegratedGradients({config.rule})",
                     passes=batch * steps, settings=settings, **extra,
                     note=f"floor: the steps x B interpolated images (pre-built), forward + backward to the input in chunks of "
                          f"{chunk}, plus the method's 2 no_grad forwards (x, baseline) for its completeness error; captum makes "
                          f"no such forwards (return_convergence_delta=False); peer2 = captum with return_convergence_delta=True, the same work")


def _at_peer_chunk(times: dict[str, Timing], best: int) -> dict[str, Any]:
    if "method_at_peer_chunk" not in times:
        return {"method_at_peer_chunk_seconds": None}
    at = times["method_at_peer_chunk"].median
    return {"method_at_peer_chunk_seconds": at, "method_at_peer_chunk_cpu": statistics.median(times["method_at_peer_chunk"].cpu),
            "peer_ratio_at_same_chunk": at / times["peer"].median, "default_vs_peer_chunk": times["method"].median / at}


def smoothgrad_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, samples: int, repeats: int) -> Row:
    import vizkit
    from captum.attr import NoiseTunnel, Saliency

    method = vizkit.create_method("smoothgrad", samples=samples)
    config = method.config
    batch = x.shape[0]
    per_chunk = max(1, config.batch_size // batch)  # samples of every input per pass, as the method
    sigma = config.noise * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    generator = torch.Generator().manual_seed(1)
    chunks = []  # (noisy images, targets) per pass, pre-built in the method's order (sample-major)
    for first in range(0, samples, per_chunk):
        count = min(per_chunk, samples - first)
        rows = torch.arange(batch).repeat(count)
        noise = torch.randn((batch * count, *x.shape[1:]), generator=generator)
        chunks.append((x[rows] + noise * sigma[rows].view(-1, 1, 1, 1), target[rows]))

    def floor():
        for images, targets in chunks:
            gradient_floor(model, images, targets)

    peer = NoiseTunnel(Saliency(model))
    stdev = float(sigma.mean())  # captum takes one sigma per input tensor
    run_peer = lambda per_pass: peer.attribute(x, nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=per_pass,
                                               stdevs=stdev, target=target, abs=False)
    candidates = sorted({max(1, min(samples, images // batch)) for images in CHUNK_CANDIDATES})
    tried = {str(n): time_once(lambda n=n: run_peer(n)) for n in candidates}
    best = int(min(tried, key=tried.get))
    fns = {"method": lambda: method.attribute(model, x, target), "floor": floor, "peer": lambda: run_peer(best)}
    if best != per_chunk:
        same = vizkit.create_method("smoothgrad", samples=samples, batch_size=best * batch)
        fns["method_at_peer_chunk"] = lambda: same.attribute(model, x, target)
    times = time_alternating(fns, repeats, warmup=False)
    settings = {"base": config.base, "samples": samples, "noise": config.noise, "batch_size": config.batch_size,
                "images_per_pass": per_chunk * batch, "peer_nt_samples_batch_size": best,
                "peer_images_per_pass": best * batch, "peer_tried": tried}
    return Row.timed("smoothgrad", x, times, "captum.NoiseTunnel(Saliency, smoothgrad, abs=False)", passes=batch * samples,
                     settings=settings, **_at_peer_chunk(times, best),
                     note=f"floor: the samples x B noisy images (pre-built), forward + backward to the input, "
                          f"{per_chunk * batch} images per pass as the method")


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
    tried = {str(n): time_once(lambda n=n: run_peer(n)) for n in candidates}
    best = int(min(tried, key=tried.get))  # by CPU time: least disturbed by other processes

    fns = {"method": lambda: method.attribute(model, x, target), "floor": floor, "peer": lambda: run_peer(best)}
    if chunk != 8:  # not the floor: what the same passes cost in chunks of 8 images (pointless when the chunk is 8)
        fns["floor_chunk8"] = lambda: floor(8)
    times = time_alternating(fns, repeats, warmup)
    settings = {"window": window, "stride": stride, "windows": len(masks), "batch_size": chunk, "fill": method.config.fill,
                "peer_perturbations_per_eval": best, "peer_tried": tried}
    chunk8 = times["floor_chunk8"].median if "floor_chunk8" in times else times["floor"].median
    return Row.timed("occlusion", x, times, "captum.Occlusion(softmax)", passes=batch * (1 + len(masks)), settings=settings,
                     floor_chunk8_seconds=chunk8, ratio_vs_floor_chunk8=times["method"].median / chunk8,
                     note=f"floor: clean forward + pre-built perturbed inputs forwarded in chunks of {chunk}, no_grad")


# ------------------------------------------------------------------ metrics


def metric_inputs(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """What the runner hands a metric: saliency maps of x (computed here, untimed), a class target,
    random rectangular object masks (pointing_game, mask_energy)."""
    import vizkit
    from vizkit.metrics import MetricInputs
    from vizkit.pixels import PixelSpace
    from vizkit.targets import ClassTarget

    saliency = vizkit.create_method("saliency")
    maps = saliency.attribute(model, x, target)
    batch, _, height, width = x.shape
    generator = torch.Generator().manual_seed(7)
    masks = torch.zeros(batch, 1, height, width, dtype=torch.bool)
    for b in range(batch):
        top, left = torch.randint(height // 2, (2,), generator=generator).tolist()
        masks[b, :, top:top + height // 3, left:left + width // 3] = True
    return MetricInputs(model, x, maps, ClassTarget(target), PixelSpace.for_model(model), saliency, masks)


def perturbation_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int, warmup: bool) -> Row:
    from vizkit.metrics import create_metric
    from vizkit.metrics.perturbation import importance_ranks, substrate_pixels, switch_counts

    metric = create_metric(name)
    config = metric.config
    inputs = metric_inputs(model, x, target)
    batch, _, height, width = x.shape
    pixels = inputs.pixels
    substrate = pixels.from_pixels(substrate_pixels(pixels.to_pixels(x), config.substrate))
    start, finish = (x, substrate) if name == "deletion" else (substrate, x)
    ranks = importance_ranks(inputs.maps).view(batch, 1, height, width)
    counts = switch_counts(height * width, config.steps)
    # the floor's (steps+1) x B perturbed images, pre-built in the metric's order (image-major)
    images = torch.cat([torch.where(ranks[b:b + 1] < count, finish[b:b + 1], start[b:b + 1]) for b in range(batch) for count in counts])

    def floor():
        with torch.no_grad():
            for chunk in images.split(config.batch_size):
                model(chunk)

    times = time_alternating({"method": lambda: metric.evaluate(inputs), "floor": floor}, repeats, warmup)
    settings = {"steps": config.steps, "substrate": config.substrate, "batch_size": config.batch_size}
    return Row.timed(name, x, times, None, stage="metric", passes=batch * (config.steps + 1), settings=settings,
                     note=f"floor: the (steps+1) x B perturbed images (pre-built), forwarded {config.batch_size} per pass, no_grad; "
                          f"maps: saliency of x")


def mask_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int, inner: int) -> Row:
    """pointing_game, mask_energy: no pass at all. The floor is the bare tensor arithmetic on the maps
    (argmax; clamp and sums), so `ratio` would only measure Python overhead: null; the row says what
    the metric costs against one forward of the batch instead."""
    from vizkit.metrics import create_metric

    metric = create_metric(name)
    inputs = metric_inputs(model, x, target)
    maps, masks = inputs.maps, inputs.masks
    if name == "pointing_game":
        floor = lambda: maps.flatten(1).argmax(1)
        floor_note = "maps.flatten(1).argmax(1)"
    else:
        floor = lambda: (maps.clamp(min=0).flatten(1) * masks.flatten(1)).sum(1) / maps.clamp(min=0).flatten(1).sum(1)
        floor_note = "(maps.clamp(min=0) * masks).sum / maps.clamp(min=0).sum, per input"
    times = time_alternating({"method": lambda: metric.evaluate(inputs), "floor": floor}, repeats, inner=inner)

    def forward():
        with torch.no_grad():
            model(x)

    forward_seconds = time_alternating({"forward": forward}, 3)["forward"].median
    seconds = times["method"].median
    return Row.timed(name, x, times, None, stage="metric", has_ratio=False, arithmetic_ratio=seconds / times["floor"].median,
                     forward_seconds=forward_seconds, share_of_forward=seconds / forward_seconds, inner_calls=inner,
                     note=f"no forward/backward pass: floor = {floor_note}, ratio null (it would measure Python overhead); "
                          f"arithmetic_ratio = seconds / floor; share_of_forward = seconds / one no_grad forward of the batch")


def randomization_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, max_steps: int, repeats: int) -> Row:
    from vizkit.metrics import create_metric
    from vizkit.metrics.randomization import cascade_blocks

    metric = create_metric("randomization", max_steps=max_steps)
    inputs = metric_inputs(model, x, target)
    names = [name for name, _ in cascade_blocks(model)][:max_steps]

    def floor():
        randomized = copy.deepcopy(model)
        modules = dict(randomized.named_modules())
        for name in names:
            for module in modules[name].modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
            gradient_floor(randomized, x, target)  # the method's passes (saliency: one forward + backward)

    times = time_alternating({"method": lambda: metric.evaluate(inputs), "floor": floor}, repeats)
    return Row.timed("randomization", x, times, None, stage="metric", passes=x.shape[0] * max_steps,
                     settings={"method": "saliency", "max_steps": max_steps, "blocks": names},
                     note="floor: deepcopy of the model, reset_parameters() of the same blocks top-down, after each one "
                          "the method's passes (saliency: one forward + backward to x)")


# ------------------------------------------------------------------ whole runs


def write_images(folder: Path, count: int = 8, size: int = 224) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"random{i}.png")


def runner_row(name: str, images: Path, workdir: Path, overrides: list[str], repeats: int = 3) -> Row:
    """``repeats`` whole runs, one after another, each in a fresh subprocess; seconds and floor are the
    medians (a run's fixed costs are a few tenths of a second, where one busy moment shows)."""
    runs = []
    for repeat in range(repeats):
        run_dir = workdir / f"run-{name}-{repeat}"
        command = [sys.executable, "-m", "vizkit.app", f"model={MODEL}", "data=images", f"data.paths=[{images}]",
                   "data.batch_size=8", "trainer.accelerator=cpu", f"method={name}", *overrides, f"hydra.run.dir={run_dir}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"}
        started = time.perf_counter()
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
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


# the runner rows' overrides: bound the many-pass methods' time (the row measures what a run adds to the method)
RUNNER_OVERRIDES = {
    "occlusion": ["method.window=56", "method.stride=28"],
    "integrated_gradients": ["method.steps=8"],
    "smoothgrad": ["method.samples=4"],
}


# ------------------------------------------------------------------ optimization methods

# What each optimization row optimizes on resnet18 (its Config fields, applied where the Config has them;
# methods still being written may name their layer fields differently: the row says which fields it used)
OPTIMIZATION_METHODS = ("class_model", "feature_viz", "inversion", "deep_dream", "neural_style")
FEATURE_VIZ_TARGET = ("layer3", 5)  # channel:layer3:5; lucent names it "layer3:5"
OPTIMIZATION_FIELDS: dict[str, dict[str, Any]] = {
    "class_model": {},
    "feature_viz": {},
    "inversion": {"layer": "layer3", "layers": ["layer3"]},
    "deep_dream": {"layer": "layer3", "layers": ["layer3"]},
    "neural_style": {"content_layer": "layer3", "style_layers": ["act1", "layer1", "layer2", "layer3"]},
}


class Skipped(Exception):
    """An optimization row that cannot run here (its method is not written yet, or refuses the model)."""


def hook_count(model: nn.Module) -> int:
    """Hooks registered on the model's modules: forward, forward-pre and backward hooks of every kind."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(module, kind, {})) for module in model.modules() for kind in kinds)


def per_step(timing: Timing, steps: float) -> Timing:
    return Timing([w / steps for w in timing.wall], [c / steps for c in timing.cpu])


class Inner:
    """Seconds of the measured part of a call (a fit without building its Trainer), one sample per call."""

    def __init__(self) -> None:
        self.timing = Timing()

    def __enter__(self) -> "Inner":
        set_threads()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timing.cpu.append(time.process_time() - self._cpu)
        self.timing.wall.append(time.perf_counter() - self._wall)


def optimization_method(name: str, steps: int, size: int, batch: int):
    """(the method configured for the row, its target, the fields given) or Skipped."""
    import dataclasses

    from vizkit.errors import VizkitError
    from vizkit.registry import create_method, get

    try:
        entry = get(name)
    except VizkitError as error:  # not registered, or its module does not import (yet)
        raise Skipped(f"not available: {error}") from None
    fields = {f.name for f in dataclasses.fields(entry.cls.Config)}
    wanted = {"steps": steps, "size": size, **OPTIMIZATION_FIELDS.get(name, {})}
    if "batch" in fields:
        wanted["batch"] = batch
    given = {key: value for key, value in wanted.items() if key in fields}
    try:
        method = create_method(name, **given)
    except VizkitError as error:
        raise Skipped(f"config {given} refused: {error}") from None
    if name == "class_model":
        target: Any = "class:1" if batch == 1 else [f"class:{c}" for c in range(1, batch + 1)]
    elif name == "feature_viz":
        target = "channel:{}:{}".format(*FEATURE_VIZ_TARGET)
    else:
        target = None
    return method, target, given


def probe_passes(model: nn.Module, problem: Any, config: Any) -> tuple[list[list[tuple[int, ...]]], list[str]]:
    """One untimed plain run of the problem with hooks that record, for every evaluation of the loss
    (L-BFGS evaluates it several times per step), the input shape of each model forward (the transforms
    change the size), and which of the model's top-level modules ran (vizkit stops a forward after the
    deepest layer it reads). The hooks are removed afterwards; it also warms the plain loop."""
    from vizkit.optimize.loop import run_steps

    evaluations: list[list[tuple[int, ...]]] = []
    ran: set[str] = set()
    inside = [False]

    def before(_module, args):
        if inside[0]:
            evaluations[-1].append(tuple(args[0].shape))

    handles = [model.register_forward_pre_hook(before)]
    for child_name, child in model.named_children():
        handles.append(child.register_forward_hook(lambda _m, _i, _o, child_name=child_name: ran.add(child_name) if inside[0] else None))
    loss = problem.loss

    def counted(step, max_loss=float("inf")):
        evaluations.append([])
        inside[0] = True
        try:
            return loss(step, max_loss)
        finally:
            inside[0] = False

    problem.loss = counted
    try:
        run_steps(problem, config)
    finally:
        del problem.loss
        for handle in handles:
            handle.remove()
    order = [child_name for child_name, _ in model.named_children()]
    return evaluations, [child_name for child_name in order if child_name in ran]


def trunk_for(model: nn.Module, children_ran: list[str]) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The model's forward up to the deepest top-level module the method's forward reached: the model
    itself when that is the last one, else its children up to there as a Sequential (checked against
    the model's own forward once)."""
    children = list(model.named_children())
    deepest = max(i for i, (child_name, _) in enumerate(children) if child_name in children_ran)
    if deepest == len(children) - 1:
        return model, "the whole model"
    trunk = nn.Sequential(OrderedDict(children[: deepest + 1]))
    captured: list[torch.Tensor] = []
    handle = children[deepest][1].register_forward_hook(lambda _m, _i, output: captured.append(output.clone()))
    probe = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    try:
        with torch.no_grad():
            model(probe)
            same = torch.allclose(trunk(probe), captured[0], atol=1e-5)
    finally:
        handle.remove()
    if not same:
        raise RuntimeError(f"the children of {type(model).__name__} up to {children[deepest][0]} are not its forward; give the floor a stop hook")
    return trunk, f"the model's children up to {children[deepest][0]} (the method's forward stops there)"


def input_gradient_passes(model: nn.Module, trunk: Callable[[torch.Tensor], torch.Tensor], inputs: list[torch.Tensor]) -> None:
    """Forward + backward to the input for each tensor, the model frozen (no weight gradient)."""
    from vizkit.optimize.loop import frozen

    with frozen(model):
        for x in inputs:
            x = x.detach().requires_grad_()
            torch.autograd.grad(trunk(x).sum(), x)


def optimization_row(name: str, model: nn.Module, batch: int, size: int, steps: int, repeats: int, workdir: Path,
                     with_peer: bool = True) -> Row:
    """Seconds per optimizer step of the Lightning fit the `vizkit` command runs, against one forward +
    backward to the input per step at the sizes the method's forwards see (its transforms change the
    size), the plain torch loop, and (feature_viz) lucent's render_vis."""
    from vizkit.data import unique_names
    from vizkit.optimize.lightning import OptimizationTask, step_loader
    from vizkit.optimize.loop import frozen, run_steps
    from vizkit.output import RunWriter
    from vizkit.runner import _trainer

    method, target, given = optimization_method(name, steps, size, batch)
    config = method.config
    images = None
    if method.needs_images:  # random pixel images, a fixed generator
        images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size * 10 + batch))
    try:
        method.check(model)
        problem = method.problem(model, target, images)
    except Exception as error:  # a method being written may refuse resnet18's layers: the row says why
        raise Skipped(f"{type(error).__name__}: {error}") from None
    for parameter in model.parameters():
        parameter.grad = None
    hooks_before = hook_count(model)
    evaluations, children_ran = probe_passes(model, problem, config)  # untimed; warms the plain loop
    trunk, floor_depth = trunk_for(model, children_ran)
    generator = torch.Generator().manual_seed(11)
    floor_inputs = [torch.randn(shape, generator=generator) for passes in evaluations for shape in passes]
    passes_per_evaluation = len(floor_inputs) / len(evaluations)
    nominal = [torch.randn(batch, 3, size, size, generator=generator)] * min(steps, 8)

    trainers, fits, plains, problems = Inner(), Inner(), Inner(), Inner()
    counts: dict[str, list[int]] = {"fit": [], "plain": []}

    def count_evaluations(problem_: Any, key: str) -> None:
        loss = problem_.loss

        def counted(step, max_loss=float("inf")):
            counts[key][-1] += 1
            return loss(step, max_loss)

        counts[key].append(0)
        problem_.loss = counted

    def fit(fit_steps: int = steps, record: bool = True) -> None:
        """The runner's fit (vizkit/optimize/run.py): its Trainer and TensorBoard logger, progress bar off,
        loss scalars every min(log_every, 8) steps, the images at step 0, every log_every and the last."""
        fit_config = dataclass_replace(config, steps=fit_steps)
        with problems if record else _nothing():
            problem_ = method.problem(model, target, images)
        problem_.names = unique_names(problem_.names)
        run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
        with trainers if record else _nothing():
            trainer, logger = _trainer({"accelerator": "cpu", "progress_bar": False}, run_dir,
                                       log_every_n_steps=min(config.log_every, 8), max_steps=fit_steps)
            writer = RunWriter(run_dir, method.name, logger.experiment)
        task = OptimizationTask(problem_, fit_config, lambda step, pixels: writer.add_image_batch(problem_.names, pixels, step))
        if record:
            count_evaluations(problem_, "fit")
        with fits if record else _nothing(), frozen(model):
            trainer.fit(task, train_dataloaders=step_loader(fit_steps))
        if writer.image_events is not None:
            writer.image_events.close()
        logger.finalize("success")
        set_threads()

    def plain() -> None:
        problem_ = method.problem(model, target, images)
        count_evaluations(problem_, "plain")
        with plains:
            run_steps(problem_, config)

    fns: dict[str, Callable[[], Any]] = {
        "method": fit,
        "floor": lambda: input_gradient_passes(model, trunk, floor_inputs),
        "plain": plain,
        "floor_nominal": lambda: input_gradient_passes(model, trunk, nominal),
    }
    lucent = with_peer and name == "feature_viz"
    peer_extra: dict[str, Any] = {}
    if lucent and importlib.util.find_spec("lucent") is None:  # a peer, not a dependency: the bench extra has it
        lucent, peer_extra["peer_note"] = False, "lucent is not installed: `make bench` installs the bench extra (torch-lucent)"
    if lucent:
        fns.update(lucent_fns(model, size, batch, steps, peer_extra))
    # warm-ups: a 2-step fit (Lightning's first fit pays one-time costs), one pass of each floor; the
    # probe warmed the plain loop, lucent_fns warmed lucent
    fit(warmup_steps(config), record=False)
    input_gradient_passes(model, trunk, floor_inputs[:1])
    input_gradient_passes(model, trunk, nominal[:1])
    times = time_alternating(fns, repeats, warmup=False)
    hooks_after = hook_count(model)
    weight_grads = any(parameter.grad is not None for parameter in model.parameters())

    evaluations_per_step = len(evaluations) / steps
    floor_per_pass = per_step(times["floor"], len(floor_inputs))  # one forward + backward at the method's sizes
    floor_per_step = per_step(floor_per_pass, 1 / passes_per_evaluation)  # one evaluation's passes (1 for all methods here)
    times_per_step = {"method": per_step(fits.timing, steps), "floor": floor_per_step}
    if lucent:
        times_per_step["peer"] = per_step(times["peer"], steps)
        times_per_step["peer2"] = per_step(times["peer2"], steps)
    plain_seconds = statistics.median(plains.timing.wall) / steps
    seconds = statistics.median(fits.timing.wall) / steps
    sizes = [shape[-1] for passes in evaluations for shape in passes]
    floor_nominal = statistics.median(times["floor_nominal"].wall) / len(nominal)
    extra: dict[str, Any] = {
        "steps": steps,
        "plain_seconds": plain_seconds, "plain_min": min(plains.timing.wall) / steps,
        "plain_cpu_seconds": statistics.median(plains.timing.cpu) / steps,
        "plain_ratio": plain_seconds / floor_per_step.median, "lightning_share": seconds / plain_seconds - 1,
        "trainer_seconds": statistics.median(trainers.timing.wall), "problem_seconds": statistics.median(problems.timing.wall),
        "evaluations_per_step": evaluations_per_step,
        "evaluations_fit": counts["fit"], "evaluations_plain": counts["plain"],
        "seconds_per_evaluation": seconds / evaluations_per_step,
        "ratio_per_evaluation": seconds / evaluations_per_step / floor_per_step.median,
        "floor_nominal_seconds": floor_nominal, "ratio_vs_nominal_floor": seconds / floor_nominal,
        "forward_sizes": {"min": min(sizes), "mean": statistics.mean(sizes), "max": max(sizes)},
        "floor_depth": floor_depth,
        "hooks_before": hooks_before, "hooks_after_vizkit": hooks_after, "weight_grads_after_vizkit": weight_grads,
        "settings": {"target": target, "fields": given, "images": "torch.rand, fixed generator" if images is not None else None,
                     "optimizer": config.optimizer, "lr": config.lr, "log_every": config.log_every,
                     "transforms": list(getattr(config, "transforms", []) or [])},
    }
    peer_name = None
    if lucent:
        peer_name = "lucent.render_vis(unfrozen model)"
        peer2_name = "lucent.render_vis(frozen model)"
        extra.update(second_peer({"peer2": times_per_step["peer2"]}, peer2_name, seconds))
        peer_floor = statistics.median(times["peer_floor"].wall) / peer_extra["peer_floor_passes"]
        peer_extra.update(peer_floor_seconds=peer_floor,
                          peer_over_own_floor=times_per_step["peer"].median / peer_floor,
                          peer2_over_own_floor=times_per_step["peer2"].median / peer_floor)
        peer_extra.pop("peer_floor_passes")
    extra.update(peer_extra)
    row_times = {k: v for k, v in times_per_step.items() if k != "peer2"}
    note = ("seconds: trainer.fit of the runner's Trainer (TensorBoard logger, loss scalars, images at step 0, every "
            "log_every and the last; Trainer and problem construction excluded) per step; floor: one forward + backward "
            f"to the input per step, model frozen, at the sizes the method's forwards saw (replayed), through {floor_depth}; "
            "plain_seconds: run_steps (the plain loop, its final no-grad measure() forward included) per step")
    return Row.timed(name, torch.empty(batch, 3, size, size), row_times, peer_name, stage="optimization", **extra, note=note)


def warmup_steps(config: Any) -> int:
    """A short fit's steps: 2, or as few as the config allows (deep_dream wants a step per octave)."""
    from vizkit.errors import ConfigError

    for steps in (2, getattr(config, "octaves", 2), config.steps):
        try:
            dataclass_replace(config, steps=steps)
            return steps
        except (ConfigError, TypeError, ValueError):
            continue
    return config.steps


@contextlib.contextmanager
def _nothing():
    yield


def lucent_fns(model: nn.Module, size: int, batch: int, steps: int, extra: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """lucent's render_vis on the same channel, steps, size, Adam lr 0.05 and standard transforms (its
    defaults), on deep copies (its ~93 forward hooks per call are counted, then removed, so calls do not
    pile them up): "peer" as a user calls it (weights require grad: their gradients are computed too),
    "peer2" with the copy frozen. lucent upsamples a 128-px image to 224 px before the model (its
    transforms grow it to 152-168 px first) and runs the whole model; "peer_floor" is one forward +
    backward of the whole model at 224 px, frozen, to the input: lucent's own floor."""
    with warnings.catch_warnings():  # kornia 0.4.1 at import: torch.jit.script is deprecated
        warnings.simplefilter("ignore")
        from lucent.optvis import param, render

    layer, channel = FEATURE_VIZ_TARGET
    objective = f"{layer.replace('.', '_')}:{channel}"
    user, still = copy.deepcopy(model), copy.deepcopy(model)
    for parameter in user.parameters():
        parameter.requires_grad_(True)
    for parameter in still.parameters():
        parameter.requires_grad_(False)
    seen: dict[str, list[int]] = {"peer": [], "peer2": []}
    grads: dict[str, bool] = {}

    def run(net: nn.Module, key: str, n_steps: int = steps) -> None:
        render.render_vis(net, objective, param_f=lambda: param.image(size, batch=batch, fft=True, decorrelate=True),
                          thresholds=(n_steps,), show_image=False, progress=False)
        seen[key].append(hook_count(net))
        grads[key] = any(parameter.grad is not None for parameter in net.parameters())
        for module in net.modules():  # remove what lucent left, and the weight gradients, so each call is a user's first
            module._forward_hooks.clear()
        for parameter in net.parameters():
            parameter.grad = None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(user, "peer", 2)  # warm-up
        run(still, "peer2", 2)
    passes = min(steps, 8)
    full = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(13))

    def lucent_call(net: nn.Module, key: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(net, key)

    extra.update(peer_objective=objective, peer_forward_size=224,
                 peer_hooks_after_call=seen["peer"], peer2_hooks_after_call=seen["peer2"],
                 peer_weight_grads=grads, peer_floor_passes=passes,
                 peer_note="lucent upsamples images under 224 px to 224 before the model and runs the whole model "
                           "(vizkit's forward sees the sizes in forward_sizes and stops after the target layer); peer_floor_seconds: "
                           "one forward + backward of the whole model at 224 px, frozen, to the input; hooks are counted "
                           "after each call, then removed")
    return {"peer": lambda: lucent_call(user, "peer"), "peer2": lambda: lucent_call(still, "peer2"),
            "peer_floor": lambda: input_gradient_passes(model, model, [full] * passes)}


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


def scan_extra(times: dict[str, Timing], images: int) -> dict[str, Any]:
    seconds, floor = times["method"].median, times["floor"].median
    return {"images": images, "images_per_second": images / seconds, "floor_images_per_second": images / floor,
            "throughput_ratio": floor / seconds}


def warm_scan(fns: dict[str, Callable[[Any], Any]], loader: Any) -> None:
    """One batch through each fn (the full warm-up would double the row's cost)."""
    first = [next(iter(loader))]
    for fn in fns.values():
        fn(first)


def top_patches_row(model: nn.Module, plan: ScanPlan) -> Row:
    """start → update over the loader → merge([state]); finish (the crops) timed apart."""
    import vizkit
    from vizkit.pixels import PixelSpace

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
    extra = scan_extra(times, plan.images)
    extra.update(finish_seconds=finish.median, finish_settings={"channels": "top:6", "k": 9},
                 settings={"layer": "layer4", "channels": "all", "k": 9, "loader_batch": plan.batch})
    note = ("seconds: start, update per loader batch, merge([state]) (finish not included: finish_seconds); floor: the same "
            "loader's batches through model(space.from_pixels(pixels)) under no_grad, the whole model (the method stops "
            "after layer4 and skips the head); throughput_ratio = floor / seconds (goal >= 0.9)")
    return Row.timed("top_patches", torch.empty(plan.batch, 3, plan.size, plan.size), times, None, stage="scan",
                     **extra, note=note)


def predicted_layer_gradient(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer_gradient_floor` with each input's predicted class as target: one forward, backward to the layer."""
    return layer_gradient_floor(model, layer, x, None)


def gradcam_scan_row(model: nn.Module, plan: ScanPlan) -> Row:
    """Data-set attribution: `create_method("gradcam").attribute(model, x)` (predicted class) per batch."""
    import vizkit
    from vizkit.pixels import PixelSpace

    method = vizkit.create_method("gradcam")
    loader = scan_loader(plan)
    space = PixelSpace.for_model(model)

    def scan(batches: Any = loader) -> None:
        for pixels, _ in batches:
            method.attribute(model, space.from_pixels(pixels))

    def floor(batches: Any = loader) -> None:
        inference_floor(model, batches, space)

    def gradient_floor(batches: Any = loader) -> None:
        for pixels, _ in batches:
            predicted_layer_gradient(model, model.layer4, space.from_pixels(pixels))

    fns = {"method": scan, "floor": floor, "gradient_floor": gradient_floor}
    warm_scan(fns, loader)
    times = time_alternating(fns, plan.repeats, warmup=False)
    gradient = times["gradient_floor"]
    extra = scan_extra(times, plan.images)
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
from vizkit.data import input_loader, open_inputs
from vizkit.models import data_config, load_model
from vizkit.pixels import PixelSpace
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
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"}
    for repeat in range(plan.repeats):
        run_dir = workdir / f"run-{name}-{repeat}"
        command = [sys.executable, "-m", "vizkit.app", f"model={MODEL}", "data=imagefolder", f"data.root={folder}",
                   f"data.batch_size={plan.batch}", f"data.workers={workers}", "trainer.accelerator=cpu",
                   "trainer.progress_bar=false", *SCAN_RUNS[name], f"hydra.run.dir={run_dir}"]
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"vizkit {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        runs.append(json.loads((run_dir / "results.json").read_text())["timings"])
        floor = subprocess.run([sys.executable, "-c", SCAN_RUN_FLOOR, str(folder), str(plan.batch), str(workers), MODEL],
                               cwd=workdir, env=env, capture_output=True, text=True, check=True)
        wall, cpu = map(float, floor.stdout.split()[-2:])
        floors.wall.append(wall)
        floors.cpu.append(cpu)
    key = "scan_seconds" if "scan_seconds" in runs[0] else "predict_seconds"
    seconds = statistics.median(r[key] for r in runs)
    typical = min(runs, key=lambda r: abs(r[key] - seconds))
    images = sum(1 for path in folder.rglob("*.jpg"))
    extra = {"images": images, "images_per_second": images / seconds, "floor_images_per_second": images / floors.median,
             "throughput_ratio": floors.median / seconds, "run_seconds": [r[key] for r in runs], "floor_runs": floors.wall,
             "floor_cpu": floors.cpu, "timings": typical,
             "settings": {"overrides": SCAN_RUNS[name], "workers": workers, "loader_batch": plan.batch,
                          "files": "JPEG q90, 256 px, resized and center-cropped to 224 by timm's eval transform"},
             "note": f"seconds: the run's {key} (Trainer, decoding in the loader's workers, the method, per-batch writing; "
                     "not the model load, not top_patches' crops: finish_seconds in timings); floor: a fresh process with the "
                     "run's model (seed 0), the same files through the same loader, model(space.from_pixels(pixels)) under "
                     "no_grad, the pass alone timed; both cold (first-pass costs in both); throughput_ratio = floor / seconds (goal >= 0.9)"}
    return Row(name, plan.batch, 224, "scan", seconds, floors.median, repeats=plan.repeats, extra=extra)  # 224: timm's eval size for resnet18


# ------------------------------------------------------------------ main


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
    randomization_steps: int = 3
    # optimization rows: image side, optimizer steps per run, timed runs, and batch -> rows with a lucent peer
    optimization_size: int = 128
    optimization_steps: int = 32
    optimization_repeats: int = 3
    optimization_batches: dict[int, bool] = field(default_factory=lambda: {1: True})

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if quick:
            return cls(64, (1,), {1: 9}, {"window": 16, "stride": 8}, {1: 5}, ig_steps={1: 32}, ig_repeats={1: 3},
                       smoothgrad_samples={1: 16}, smoothgrad_repeats={1: 5}, perturbation_repeats={1: 5}, randomization_repeats={1: 7},
                       optimization_size=64, optimization_steps=8, optimization_repeats=1)
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
    if name == "integrated_gradients":
        return integrated_gradients_row(model, x, target, plan.ig_steps[batch], plan.ig_repeats[batch])
    if name == "smoothgrad":
        return smoothgrad_row(model, x, target, plan.smoothgrad_samples[batch], plan.smoothgrad_repeats[batch])
    if name in ADVERSARIAL_METHODS:
        return attack_row(name, model, x, target, plan.repeats[batch] if name == "fgsm" else max(3, plan.repeats[batch] - 2))
    return gradient_row(name, model, x, target, plan.repeats[batch])


def metric_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, plan: Plan) -> Row:
    batch = x.shape[0]
    if name in ("deletion", "insertion"):
        return perturbation_row(name, model, x, target, plan.perturbation_repeats[batch], warmup=batch == 1)
    if name == "randomization":
        return randomization_row(model, x, target, plan.randomization_steps, plan.randomization_repeats[batch])
    return mask_row(name, model, x, target, plan.repeats[batch], inner=20)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1, 64 px, few repeats, method and metric stages only")
    parser.add_argument("--rows", default=",".join(METHODS + METRICS + OPTIMIZATION_METHODS + SCANS),
                        help="comma-separated methods, metrics, optimization methods and scans (default: all)")
    parser.add_argument("--stages", default="method,metric,runner,optimization,scan",
                        help="method (the Python API), metric (metrics' evaluate), runner (whole runs), optimization "
                             "(optimization methods' Lightning fit per step), scan (a data set's throughput); --quick: no runner")
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.rows.split(",") if m.strip()]
    known = METHODS + METRICS + OPTIMIZATION_METHODS + SCANS
    unknown = set(names) - set(known)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(known)}")
    methods = [name for name in names if name in METHODS]
    metrics = [name for name in names if name in METRICS]
    optimizations = [name for name in names if name in OPTIMIZATION_METHODS]
    scans = [name for name in names if name in SCANS]
    stages = {s.strip() for s in args.stages.split(",")}
    if args.quick:
        stages -= {"runner"}

    set_threads()
    warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")  # "required_grads has been set", hooks notice
    plan = Plan.make(args.quick)

    def progress(row: Row) -> None:
        ratio = f"ratio {row.ratio:.3f}" if row.has_ratio else "ratio -"
        text = f"  {row.stage:6} {row.method:20} batch {row.batch}: {row.seconds:.4f} s, floor {row.floor_seconds:.4f} s, {ratio}"
        text += f", peer {row.peer_seconds:.4f} s" if row.peer_seconds else ""
        text += f", plain {row.extra['plain_seconds']:.4f} s" if row.stage == "optimization" else ""
        text += f", write {row.extra['timings']['write_seconds']:.3f} s" if row.stage == "runner" else ""
        text += f", {row.extra['images_per_second']:.1f} img/s, throughput {row.extra['throughput_ratio']:.3f}" if row.stage == "scan" else ""
        text += f" [{row.extra['row_seconds']:.0f} s]" if "row_seconds" in row.extra else ""
        print(text, file=sys.stderr, flush=True)

    canary_start = canary()
    started = time.perf_counter()
    rows: list[Row] = []
    model = make_model()
    for batch in plan.batches:
        x, target = make_input(batch, plan.size)
        todo = [("method", name, method_row) for name in methods if "method" in stages]
        todo += [("metric", name, metric_row) for name in metrics if "metric" in stages]
        for _, name, make_row in todo:
            set_threads()
            row_started = time.perf_counter()
            rows.append(make_row(name, model, x, target, plan))
            rows[-1].extra["row_seconds"] = time.perf_counter() - row_started  # tuning and warm-up included
            progress(rows[-1])
    if "runner" in stages and methods:
        with tempfile.TemporaryDirectory(prefix="vizkit-bench-") as tmp:
            workdir = Path(tmp)
            write_images(workdir / "images")
            for name in methods:
                rows.append(runner_row(name, workdir / "images", workdir, RUNNER_OVERRIDES.get(name, [])))
                progress(rows[-1])
                set_threads()
    skipped: dict[str, str] = {}
    if "optimization" in stages and optimizations:
        with tempfile.TemporaryDirectory(prefix="vizkit-bench-opt-") as tmp:
            for batch, with_peer in plan.optimization_batches.items():
                for name in optimizations:
                    set_threads()
                    row_started = time.perf_counter()
                    try:
                        row = optimization_row(name, model, batch, plan.optimization_size, plan.optimization_steps,
                                               plan.optimization_repeats, Path(tmp), with_peer)
                    except Skipped as why:
                        skipped[f"{name}/batch{batch}"] = str(why)
                        print(f"  skipped {name} batch {batch}: {why}", file=sys.stderr, flush=True)
                        continue
                    row.extra["row_seconds"] = time.perf_counter() - row_started
                    rows.append(row)
                    progress(row)
    if "scan" in stages and scans:
        scan_plan = ScanPlan.make(args.quick)
        with tempfile.TemporaryDirectory(prefix="vizkit-bench-scan-") as tmp:
            if any(name in SCAN_RUNS for name in scans):
                write_image_folder(Path(tmp) / "folder", scan_plan.images)
            for name in scans:
                set_threads()
                row_started = time.perf_counter()
                if name in SCAN_RUNS:
                    row = scan_run_row(name, scan_plan, Path(tmp) / "folder", Path(tmp), workers=1)
                else:
                    row = (top_patches_row if name == "top_patches" else gradcam_scan_row)(model, scan_plan)
                row.extra["row_seconds"] = time.perf_counter() - row_started
                rows.append(row)
                progress(row)
    canary_end = canary()

    import captum
    import pytorch_grad_cam
    import timm

    head = {"canary_start": canary_start.median, "canary_end": canary_end.median,
            "canary_cpu_start": statistics.median(canary_start.cpu), "canary_cpu_end": statistics.median(canary_end.cpu),
            "canary": "median of 5 x (10 forwards of Conv2d(64,64,3) on [1,64,56,56]), wall and process CPU seconds",
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": THREADS,
            "cpus": os.cpu_count(), "machine": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "captum": captum.__version__,
            "pytorch_grad_cam": getattr(pytorch_grad_cam, "__version__", _distribution_version("grad-cam")),
            "quick": args.quick, "total_seconds": time.perf_counter() - started}
    if "optimization" in stages and optimizations:
        head.update(lucent=_distribution_version("torch-lucent"), kornia=_distribution_version("kornia"),
                    pytorch_lightning=_distribution_version("pytorch-lightning"), skipped=skipped)
    lines = [json.dumps(_rounded(head))] + [row.to_json() for row in rows]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _distribution_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
