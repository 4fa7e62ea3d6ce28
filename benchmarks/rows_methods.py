"""Method rows (a method's Python API alone) and metric rows (a metric's ``evaluate`` alone): each
against its floor, the bare passes it needs, and (methods) a peer; see README.md for what each times."""
from __future__ import annotations

import copy
import statistics
from typing import Any

import torch
from torch import nn

from floors import block_input_gradient_floor, chunked_gradient_floor, gradient_floor, layer_gradient_floor, no_grad_forward
from harness import VIT_MODEL, Row, Timing, fastest_setting, second_peer, time_alternating
from peers import (CHUNK_CANDIDATES, captum_gradient, captum_guided_gradcam, captum_integrated_gradients, captum_layer_gradcam,
                   captum_occlusion, captum_smoothgrad, chunk_candidates, pytorch_grad_cam, torchattacks_attack, vit_reshape_transform)

PGD_STEPS = 10


# ------------------------------------------------------------------ gradient methods


def gradient_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    import vizkit

    method = vizkit.create_method(name)
    peer, peer_name = captum_gradient(name, model)
    times = time_alternating({
        "method": lambda: method.attribute(model, x, target),
        "floor": lambda: gradient_floor(model, x, target),
        "peer": lambda: peer(x, target),
    }, repeats)
    note = "floor: model(x)[range(B), target].sum() then autograd.grad w.r.t. x"
    if name in ("guided_backprop", "deconvnet"):
        note += "; captum gets a copy with inplace=False ReLUs"
    return Row.timed(name, x, times, peer_name, note=note)


# ------------------------------------------------------------------ attacks


def attack_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    """FGSM (1 step) or PGD L∞ (10 steps, random start) at ε 8/255, step 2/255, against torchattacks
    with the model's normalization set (``set_normalization_used``): torchattacks 3.5 then takes the
    normalized input, as vizkit's ``attack`` does, and maps it to pixels itself. Labels: the
    row's targets, untargeted. Floor: ``steps`` x (forward of the normalized pixels + cross-entropy +
    autograd.grad to the input)."""
    import torch.nn.functional as F

    import vizkit
    from vizkit.core.pixels import PixelSpace

    steps = 1 if name == "fgsm" else PGD_STEPS
    fields = {"eps": "8/255"} if name == "fgsm" else {"eps": "8/255", "step_size": "2/255", "steps": steps, "random_start": True}
    method = vizkit.create_method(name, **fields)
    space = PixelSpace.for_model(model)
    pixels = space.to_pixels(x).clamp(0, 1)
    peer, peer_name = torchattacks_attack(name, model, steps)

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
        "peer": lambda: peer(space_x, target),
    }, repeats)
    note = (f"eps 8/255 (pixels), {steps} step(s)" + ("" if name == "fgsm" else ", step 2/255, random start") +
            "; torchattacks on the same normalized input with set_normalization_used(mean, std); floor: steps x (forward + "
            "cross-entropy + autograd.grad to the input)")
    return Row.timed(name, x, times, peer_name, passes=x.shape[0] * steps, settings={"eps": "8/255", "steps": steps}, note=note)


# ------------------------------------------------------------------ Grad-CAM


def gradcam_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    import vizkit

    method = vizkit.create_method("gradcam")
    run_captum, captum_name = captum_layer_gradcam(model)
    with pytorch_grad_cam(model, target) as (run_pgc, pgc_name):
        times = time_alternating({
            "method": lambda: method.attribute(model, x, target),
            "floor": lambda: layer_gradient_floor(model, model.layer4, x, target),
            "peer": lambda: run_captum(x, target),
            "peer2": lambda: run_pgc(x),
        }, repeats)
    seconds = times["method"].median
    return Row.timed("gradcam", x, times, captum_name, **second_peer(times, pgc_name, seconds), settings={"layer": "layer4"},
                     note="floor: one forward with a hook keeping layer4's output, autograd.grad of the target logits' sum "
                          "w.r.t. it (the backward stops at layer4); pytorch-grad-cam runs on a copy (its hooks stay while it lives) "
                          "and also computes every weight gradient")


def guided_gradcam_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    import vizkit

    method = vizkit.create_method("guided_gradcam")
    peer, peer_name = captum_guided_gradcam(model)

    def floor():
        layer_gradient_floor(model, model.layer4, x, target)
        return gradient_floor(model, x, target)

    times = time_alternating({
        "method": lambda: method.attribute(model, x, target),
        "floor": floor,
        "peer": lambda: peer(x, target),
    }, repeats)
    return Row.timed("guided_gradcam", x, times, peer_name, settings={"layer": "layer4"},
                     note="floor: gradcam's floor (forward + backward to layer4) then the gradient floor (forward + backward "
                          "to x); captum gets a copy with inplace=False ReLUs")


# ------------------------------------------------------------------ vision transformers (vit_small_patch16_224)


def gradcam_vit_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    """Grad-CAM on a ViT at its default layer (the last block's norm1, layout tokens), as ``gradcam_row``:
    floor = one forward keeping that layer's output + autograd.grad of the target logits' sum w.r.t. it;
    peer = pytorch-grad-cam's GradCAM on the same layer with its documented ViT reshape_transform."""
    import vizkit
    from vizkit.core.models import default_layer, token_grid

    method = vizkit.create_method("gradcam")
    layer = f"blocks.{len(model.blocks) - 1}.norm1"
    assert default_layer(model) == layer, f"vizkit's default ViT layer is {default_layer(model)}, the row times {layer}"
    prefix, height, width = token_grid(model, x.shape[-2:])
    reshape = vit_reshape_transform(height, width)
    pgc = pytorch_grad_cam(model, target, layer, reshape, f"pytorch_grad_cam.GradCAM([{layer}], vit reshape_transform)")
    with pgc as (run_pgc, pgc_name):
        times = time_alternating({
            "method": lambda: method.attribute(model, x, target),
            "floor": lambda: layer_gradient_floor(model, model.get_submodule(layer), x, target),
            "peer": lambda: run_pgc(x),
        }, repeats)
    return Row.timed("gradcam_vit", x, times, pgc_name, model=VIT_MODEL,
                     settings={"layer": layer, "layout": "tokens", "prefix_tokens": prefix, "grid": [height, width]},
                     note=f"floor: one forward with a hook keeping {layer}'s output, autograd.grad of the target logits' sum "
                          f"w.r.t. it (the backward stops at that layer: the head, the final norm and the last block); "
                          f"pytorch-grad-cam: reshape_transform drops the class token, reshapes to {height}x{width} and permutes "
                          f"to channels first; it runs on a copy (its hooks stay while it lives) and also computes every weight gradient")


def attention_rollout_vit_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    """Attention rollout (defaults: head_fusion mean, discard_ratio 0) against one plain no_grad forward:
    the rollout needs only the forward (its probabilities are read beside each attention call)."""
    import vizkit

    method = vizkit.create_method("attention_rollout")
    config = method.config
    explicit = explicit_attention_copy(model)
    times = time_alternating({
        "method": lambda: method.attribute(model, x, target),
        "floor": lambda: no_grad_forward(model, x),
        "explicit_floor": lambda: no_grad_forward(explicit, x),
    }, repeats)
    seconds, explicit_floor = times["method"].median, times["explicit_floor"].median
    return Row.timed("attention_rollout_vit", x, times, None, model=VIT_MODEL,
                     settings={"head_fusion": config.head_fusion, "discard_ratio": config.discard_ratio, "blocks": len(model.blocks)},
                     explicit_floor_seconds=explicit_floor, explicit_floor_min=min(times["explicit_floor"].wall),
                     ratio_vs_explicit_floor=seconds / explicit_floor,
                     note="floor: one plain no_grad forward of the batch (the rollout needs only the forward; timm's fused "
                          "scaled_dot_product_attention never materializes the probabilities); explicit_floor_seconds: the same "
                          "forward with timm's hand-written attention (fused_attn=False on a copy: softmax(q k^T scale) @ v, the "
                          "probabilities materialized); no peer: neither captum nor pytorch-grad-cam has attention rollout")


def explicit_attention_copy(model: nn.Module) -> nn.Module:
    """A copy whose attention is timm's hand-written one (``fused_attn=False``): softmax(q kᵀ · scale) @ v,
    the probabilities materialized, as the attention methods need them (the fused kernel never makes them)."""
    explicit = copy.deepcopy(model)
    for block in explicit.blocks:
        block.attn.fused_attn = False
    return explicit


def gradient_weighted_attention_vit_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    """Gradient-weighted attention (Chefer et al. 2021): one forward and a backward to every block's
    attention probabilities, the first block's included. Floor: the forward + autograd.grad of the target
    logits' sum w.r.t. the tokens entering the first block (the backward through every block)."""
    import vizkit

    method = vizkit.create_method("gradient_weighted_attention")
    explicit = explicit_attention_copy(model)
    times = time_alternating({
        "method": lambda: method.attribute(model, x, target),
        "floor": lambda: block_input_gradient_floor(model, x, target),
        "explicit_floor": lambda: block_input_gradient_floor(explicit, x, target),
    }, repeats)
    seconds, explicit_floor = times["method"].median, times["explicit_floor"].median
    return Row.timed("gradient_weighted_attention_vit", x, times, None, model=VIT_MODEL, settings={"blocks": len(model.blocks)},
                     explicit_floor_seconds=explicit_floor, explicit_floor_min=min(times["explicit_floor"].wall),
                     ratio_vs_explicit_floor=seconds / explicit_floor,
                     note="floor: one forward with a pre-hook keeping the tokens entering blocks.0, autograd.grad of the target "
                          "logits' sum w.r.t. them (the backward through all 12 blocks, no weight gradients, stopping before the "
                          "patch embedding: a gradient reaching blocks.0's attention probabilities cannot avoid it; it also runs "
                          "blocks.0's qkv and norm1 backward, which the method skips); explicit_floor_seconds: the same pass with "
                          "timm's hand-written attention (fused_attn=False on a copy: the probabilities materialized and in the "
                          "graph); no peer: neither captum nor pytorch-grad-cam has it")


# ------------------------------------------------------------------ many-pass gradient methods


def integrated_gradients_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int, repeats: int) -> Row:
    import vizkit
    from vizkit.core.pixels import PixelSpace
    from vizkit.methods.attribution.integrated_gradients import quadrature
    from vizkit.probes.baselines import pixel_baseline

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

    run_peer, peer_name = captum_integrated_gradients(model, baseline, config.rule)
    # captum's best internal_batch_size among 8..64 images per pass, each timed once on (at most) 64 images:
    # a chunk size's cost per image does not depend on how many steps there are
    trial_steps = min(steps, max(1, max(CHUNK_CANDIDATES) // batch))
    best, tried = fastest_setting(lambda n: run_peer(x, target, trial_steps, n), chunk_candidates(batch, trial_steps * batch))
    fns = {"method": lambda: method.attribute(model, x, target), "floor": floor, "peer": lambda: run_peer(x, target, steps, best),
           # the same work as vizkit: captum also reports the completeness gap (its 2 extra forwards)
           "peer2": lambda: run_peer(x, target, steps, best, delta=True)}
    if best != chunk:  # vizkit with captum's chunk: the same batching as the peer's best
        same = vizkit.create_method("integrated_gradients", steps=steps, batch_size=best)
        fns["method_at_peer_chunk"] = lambda: same.attribute(model, x, target)
    times = time_alternating(fns, repeats, warmup=False)  # the model is warm; the captum trials warmed the peer
    settings = {"steps": steps, "rule": config.rule, "baseline": config.baseline, "batch_size": chunk,
                "peer_internal_batch_size": best, "peer_tried": tried, "peer_tried_steps": trial_steps}
    extra = {**at_peer_chunk(times, best),
             **second_peer(times, f"captum.IntegratedGradients({config.rule}, return_convergence_delta=True)", times["method"].median)}
    return Row.timed("integrated_gradients", x, times, peer_name, passes=batch * steps, settings=settings, **extra,
                     note=f"floor: the steps x B interpolated images (pre-built), forward + backward to the input in chunks of "
                          f"{chunk}, plus the method's 2 no_grad forwards (x, baseline) for its completeness error; captum makes "
                          f"no such forwards (return_convergence_delta=False); peer2 = captum with return_convergence_delta=True, the same work")


def at_peer_chunk(times: dict[str, Timing], best: int) -> dict[str, Any]:
    """The method timed again with the peer's best chunk ("method_at_peer_chunk"), where that differs
    from the method's default: like against like (``peer_ratio_at_same_chunk``), and the default's cost
    (``default_vs_peer_chunk`` > 1: the default chunk is slower on this CPU)."""
    if "method_at_peer_chunk" not in times:
        return {"method_at_peer_chunk_seconds": None}
    at = times["method_at_peer_chunk"].median
    return {"method_at_peer_chunk_seconds": at, "method_at_peer_chunk_cpu": statistics.median(times["method_at_peer_chunk"].cpu),
            "peer_ratio_at_same_chunk": at / times["peer"].median, "default_vs_peer_chunk": times["method"].median / at}


def smoothgrad_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, samples: int, repeats: int) -> Row:
    import vizkit

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

    run_peer, peer_name = captum_smoothgrad(model)
    stdev = float(sigma.mean())  # captum takes one sigma per input tensor
    candidates = sorted({max(1, min(samples, images // batch)) for images in CHUNK_CANDIDATES})
    best, tried = fastest_setting(lambda n: run_peer(x, target, samples, n, stdev), candidates)
    fns = {"method": lambda: method.attribute(model, x, target), "floor": floor, "peer": lambda: run_peer(x, target, samples, best, stdev)}
    if best != per_chunk:
        same = vizkit.create_method("smoothgrad", samples=samples, batch_size=best * batch)
        fns["method_at_peer_chunk"] = lambda: same.attribute(model, x, target)
    times = time_alternating(fns, repeats, warmup=False)
    settings = {"base": config.base, "samples": samples, "noise": config.noise, "batch_size": config.batch_size,
                "images_per_pass": per_chunk * batch, "peer_nt_samples_batch_size": best,
                "peer_images_per_pass": best * batch, "peer_tried": tried}
    return Row.timed("smoothgrad", x, times, peer_name, passes=batch * samples, settings=settings, **at_peer_chunk(times, best),
                     note=f"floor: the samples x B noisy images (pre-built), forward + backward to the input, "
                          f"{per_chunk * batch} images per pass as the method")


# ------------------------------------------------------------------ occlusion


def occlusion_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, window: int, stride: int,
                  repeats: int, warmup: bool) -> Row:
    import vizkit
    from vizkit.core.pixels import PixelSpace
    from vizkit.methods.attribution.occlusion import window_starts

    method = vizkit.create_method("occlusion", window=window, stride=stride)
    chunk = method.config.batch_size
    batch, _, height, width = x.shape
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

    run_peer, peer_name = captum_occlusion(model, window, stride, fill, x.shape)
    # captum's best setting: perturbations_per_eval giving 8, 16 or 32 images per forward, timed once each
    candidates = sorted({max(1, images // batch) for images in (8, 16, 32)})
    best, tried = fastest_setting(lambda n: run_peer(x, target, n), candidates)  # by CPU time: least disturbed by other processes

    fns = {"method": lambda: method.attribute(model, x, target), "floor": floor, "peer": lambda: run_peer(x, target, best)}
    if chunk != 8:  # not the floor: what the same passes cost in chunks of 8 images (pointless when the chunk is 8)
        fns["floor_chunk8"] = lambda: floor(8)
    times = time_alternating(fns, repeats, warmup)
    settings = {"window": window, "stride": stride, "windows": len(masks), "batch_size": chunk, "fill": method.config.fill,
                "peer_perturbations_per_eval": best, "peer_tried": tried}
    chunk8 = times["floor_chunk8"].median if "floor_chunk8" in times else times["floor"].median
    return Row.timed("occlusion", x, times, peer_name, passes=batch * (1 + len(masks)), settings=settings,
                     floor_chunk8_seconds=chunk8, ratio_vs_floor_chunk8=times["method"].median / chunk8,
                     note=f"floor: clean forward + pre-built perturbed inputs forwarded in chunks of {chunk}, no_grad")


# ------------------------------------------------------------------ metrics


def metric_inputs(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """What the runner hands a metric: saliency maps of x (computed here, untimed), a class target,
    random rectangular object masks (pointing_game, mask_energy)."""
    import vizkit
    from vizkit.core.pixels import PixelSpace
    from vizkit.core.targets import ClassTarget
    from vizkit.metrics import MetricInputs

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
    return Row.timed(name, x, times, None, stage="metric", has_ratio=False,
                     **mask_figures(times["method"].median, times["floor"].median, forward_seconds), inner_calls=inner,
                     note=f"no forward/backward pass: floor = {floor_note}, ratio null (it would measure Python overhead); "
                          f"arithmetic_ratio = seconds / floor; share_of_forward = seconds / one no_grad forward of the batch")


def mask_figures(seconds: float, floor_seconds: float, forward_seconds: float) -> dict[str, float]:
    """A pass-free metric's figures: against its arithmetic floor, and against one forward of the batch."""
    return {"arithmetic_ratio": seconds / floor_seconds, "forward_seconds": forward_seconds,
            "share_of_forward": seconds / forward_seconds}


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
