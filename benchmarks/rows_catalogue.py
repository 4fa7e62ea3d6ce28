"""Method rows of the attribution catalogue beyond the CAMs (issue 17): LRP, DeepLIFT, GradientSHAP,
FullGrad and SmoothGrad-CAM++, each against its floor and its reference library on resnet18 (README.md
says what each times).

Floors are the passes a method cannot avoid: LRP one forward and one backward to the input (each
layer's rule then recomputes that layer's modified copies: the ratio says what the rules cost).
"""
from __future__ import annotations

import torch
from torch import nn

from floors import chunked_gradient_floor, gradient_floor, layer_gradient_floor, no_grad_forward
from harness import Row, time_alternating
from peers import captum_deeplift, captum_gradient_shap, pytorch_grad_cam, torchcam_smoothgradcampp, zennit_lrp

LRP_COMPOSITES = ("epsilon_plus", "epsilon_gamma_box")
CATALOGUE = (*(f"lrp_{composite}" for composite in LRP_COMPOSITES), "deeplift", "gradient_shap", "fullgrad", "smoothgradcam_plus_plus")


def lrp_row(composite: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    import vizkit
    from vizkit.core.pixels import PixelSpace

    method = vizkit.create_method("lrp", composite=composite)
    pixels = PixelSpace.for_model(model)
    bounds = {}
    if composite == "epsilon_gamma_box":
        bounds = {"low": pixels.from_pixels(torch.zeros(1, 3, 1, 1)), "high": pixels.from_pixels(torch.ones(1, 3, 1, 1))}
    run_peer, peer_name = zennit_lrp(model, composite, **bounds)
    times = time_alternating({
        "method": lambda: method.attribute(model, x, target),
        "floor": lambda: gradient_floor(model, x, target),
        "peer": lambda: run_peer(x, target),
    }, repeats)
    return Row.timed(f"lrp_{composite}", x, times, peer_name, settings={"composite": composite},
                     note="floor: one forward, one backward to the input; zennit on a copy with its BatchNorm-merging "
                          "and Sum canonizers (built per call, as its context manager does)")


def deeplift_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    import vizkit
    from vizkit.core.pixels import PixelSpace
    from vizkit.probes.baselines import pixel_baseline

    method = vizkit.create_method("deeplift")
    pixels = PixelSpace.for_model(model)  # the method's default baseline, built here for the floor and captum
    baseline = pixels.from_pixels(pixel_baseline(method.config.baseline, pixels.to_pixels(x), seed=0)).expand_as(x).contiguous()
    pairs, pair_targets = torch.cat([x, baseline]), torch.cat([target, target])
    run_peer, peer_name = captum_deeplift(model, baseline)
    times = time_alternating({
        "method": lambda: method.attribute(model, x, target),
        "floor": lambda: gradient_floor(model, pairs, pair_targets),
        "peer": lambda: run_peer(x, target),
    }, repeats)
    return Row.timed("deeplift", x, times, peer_name, settings={"baseline": method.config.baseline},
                     note="floor: one forward and one backward to the input of the inputs and their baselines in one batch "
                          "(the method's own S(x) and S(x') for its completeness error are extra)")


def gradient_shap_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, samples: int, repeats: int) -> Row:
    import vizkit
    from vizkit.core.pixels import PixelSpace
    from vizkit.probes.baselines import pixel_baseline

    method = vizkit.create_method("gradient_shap", samples=samples)
    config = method.config
    pixels = PixelSpace.for_model(model)
    baselines = torch.cat([pixels.from_pixels(pixel_baseline(name, pixels.to_pixels(x[:1]), seed=0)) for name in config.baselines])
    generator = torch.Generator().manual_seed(0)  # the floor's images: the same count and shapes as the method's
    rows = torch.arange(x.shape[0]).repeat(samples)
    alphas = torch.rand(len(rows), 1, 1, 1, generator=generator)
    chosen = baselines[torch.randint(len(baselines), (len(rows),), generator=generator)]
    images = chosen + alphas * (x[rows] - chosen)
    run_peer, peer_name = captum_gradient_shap(model, baselines, samples)
    times = time_alternating({
        "method": lambda: method.attribute(model, x, target),
        "floor": lambda: chunked_gradient_floor(model, images, target[rows], config.batch_size),
        "peer": lambda: run_peer(x, target),
    }, repeats)
    return Row.timed("gradient_shap", x, times, peer_name, settings={"samples": samples, "baselines": list(config.baselines)},
                     note=f"floor: {samples} points per input between a baseline and the input, forward and backward to "
                          f"the input, {config.batch_size} a pass; captum draws all in one pass")


def fullgrad_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    import vizkit

    method = vizkit.create_method("fullgrad")
    with pytorch_grad_cam(model, target, cam_class="FullGrad") as (run_peer, peer_name):
        times = time_alternating({
            "method": lambda: method.attribute(model, x, target),
            "floor": lambda: gradient_floor(model, x, target),
            "peer": lambda: run_peer(x),
        }, repeats)
    return Row.timed("fullgrad", x, times, peer_name.replace("[layer4]", "[every bias layer]"), settings={},
                     note="floor: one forward, one backward to the input (every bias layer's gradient comes with it); "
                          "pytorch-grad-cam on a copy, also computing every weight gradient")


def smoothgradcam_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    import vizkit

    method = vizkit.create_method("smoothgradcam_plus_plus", layer="layer4")
    config = method.config
    generator = torch.Generator().manual_seed(0)
    rows = torch.arange(x.shape[0]).repeat(config.samples)  # sample-major, as the method
    noisy = x[rows] + config.noise_std * torch.randn(x[rows].shape, generator=generator)
    chunk = max(1, config.batch_size // x.shape[0]) * x.shape[0]

    def floor():  # the clean activation, then the noisy copies' forward and backward to layer4, batch_size at a time
        no_grad_forward(model, x)
        for images, targets in zip(noisy.split(chunk), target[rows].split(chunk)):
            layer_gradient_floor(model, model.layer4, images, targets)

    with torchcam_smoothgradcampp(model, "layer4", config.samples, config.noise_std, tuple(x.shape[1:])) as (run_peer, peer_name):
        times = time_alternating({
            "method": lambda: method.attribute(model, x, target),
            "floor": floor,
            "peer": lambda: run_peer(x, target),
        }, repeats)
    return Row.timed("smoothgradcam_plus_plus", x, times, peer_name, settings={"layer": "layer4", "samples": config.samples},
                     note=f"floor: one forward, then {config.samples} noisy copies per input, forward and backward to layer4, "
                          f"{chunk} a pass; torchcam on a copy (its clean forward, then a forward and backward per sample)")


def catalogue_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int, samples: int) -> Row:
    """``samples``: GradientSHAP's draws (the plan's SmoothGrad sample count for the batch)."""
    if name.startswith("lrp_"):
        return lrp_row(name[len("lrp_"):], model, x, target, repeats)
    if name == "fullgrad":
        return fullgrad_row(model, x, target, repeats)
    if name == "deeplift":
        return deeplift_row(model, x, target, repeats)
    if name == "gradient_shap":
        return gradient_shap_row(model, x, target, samples, repeats)
    if name == "smoothgradcam_plus_plus":
        return smoothgradcam_row(model, x, target, repeats)
    raise KeyError(name)
