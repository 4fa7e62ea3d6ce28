"""The peers every row is compared with, each behind a small adapter: captum (attribution; infidelity
and max-sensitivity), pytorch-grad-cam (Grad-CAM; on a ViT with its documented ``reshape_transform``;
ROAD and the confidence metrics), torchattacks (FGSM, PGD; C&W, APGD, APGD-T, FAB-T, Square,
AutoAttack) and lucent (feature visualization).

Each adapter returns a callable doing the peer's work on the row's inputs, and the name the row
records for it. What a peer needs that vizkit does not (PITFALLS.md, "Peers") is done here: captum's
ReLU hooks get a copy with ``inplace=False`` ReLUs, pytorch-grad-cam runs on a copy and its hooks are
released, lucent's leftover hooks and weight gradients are counted and cleared after every call.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import nn

from floors import hook_count, input_gradient_passes

CHUNK_CANDIDATES = (8, 16, 32, 64)  # images per forward tried for a peer's batching knob

Call = Callable[[torch.Tensor, torch.Tensor], Any]  # (x, target) -> the peer's result


def chunk_candidates(batch: int, limit: int) -> list[int]:
    """Images per forward to try for a peer's batching knob: 8..64, at least one batch, at most `limit`."""
    return sorted({min(max(batch, images), limit) for images in CHUNK_CANDIDATES})


def without_inplace_relus(model: nn.Module) -> nn.Module:
    """A copy whose ReLU modules are not in-place: captum's ReLU hooks need that."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return copied


# ------------------------------------------------------------------ captum


def captum_gradient(name: str, model: nn.Module) -> tuple[Call, str]:
    """captum's one-pass gradient method for a vizkit one: Saliency (abs, as vizkit's default),
    InputXGradient, GuidedBackprop / Deconvolution (on a copy with inplace=False ReLUs)."""
    from captum.attr import Deconvolution, GuidedBackprop, InputXGradient, Saliency

    if name == "saliency":
        peer, peer_name, peer_kwargs = Saliency(model), "captum.Saliency(abs=True)", {"abs": True}
    elif name == "input_x_gradient":
        peer, peer_name, peer_kwargs = InputXGradient(model), "captum.InputXGradient", {}
    else:
        captum_cls = GuidedBackprop if name == "guided_backprop" else Deconvolution
        peer, peer_name, peer_kwargs = captum_cls(without_inplace_relus(model)), f"captum.{captum_cls.__name__}", {}
    return lambda x, target: peer.attribute(x, target=target, **peer_kwargs), peer_name


def captum_layer_gradcam(model: nn.Module) -> tuple[Call, str]:
    """captum's LayerGradCam on layer4 with its ReLU, interpolated bilinearly to the input: vizkit's map."""
    from captum.attr import LayerAttribution, LayerGradCam

    captum_cam = LayerGradCam(model, model.layer4)

    def run(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cam = captum_cam.attribute(x, target=target, relu_attributions=True)
        return LayerAttribution.interpolate(cam, x.shape[-2:], "bilinear")

    return run, "captum.LayerGradCam(layer4, relu)+interpolate(bilinear)"


def captum_guided_gradcam(model: nn.Module) -> tuple[Call, str]:
    """captum's GuidedGradCam on layer4, bilinear, on a copy with inplace=False ReLUs."""
    from captum.attr import GuidedGradCam

    copied = without_inplace_relus(model)
    peer = GuidedGradCam(copied, copied.layer4)
    return lambda x, target: peer.attribute(x, target=target, interpolate_mode="bilinear"), "captum.GuidedGradCam(layer4, bilinear)"


def captum_integrated_gradients(model: nn.Module, baseline: torch.Tensor, rule: str) -> tuple[Callable[..., Any], str]:
    """``run(x, target, n_steps, internal_batch_size, delta=False)``: captum's IntegratedGradients with
    vizkit's baseline and quadrature rule; ``delta``: also its completeness gap (2 more forwards)."""
    from captum.attr import IntegratedGradients

    peer = IntegratedGradients(model)

    def run(x: torch.Tensor, target: torch.Tensor, n_steps: int, internal_batch_size: int, delta: bool = False) -> Any:
        extra = {"return_convergence_delta": True} if delta else {}
        return peer.attribute(x, baselines=baseline, target=target, n_steps=n_steps, method=rule,
                              internal_batch_size=internal_batch_size, **extra)

    return run, f"captum.IntegratedGradients({rule})"


def captum_deeplift(model: nn.Module, baseline: torch.Tensor) -> tuple[Call, str]:
    """``run(x, target)``: captum's DeepLift (Rescale, multiply_by_inputs) from vizkit's baseline, on a
    copy with ``inplace=False`` ReLUs (its hooks need that)."""
    from captum.attr import DeepLift

    peer = DeepLift(without_inplace_relus(model))
    return (lambda x, target: peer.attribute(x, baselines=baseline, target=target)), "captum.DeepLift"


def captum_gradient_shap(model: nn.Module, baselines: torch.Tensor, samples: int) -> tuple[Call, str]:
    """``run(x, target)``: captum's GradientShap, ``samples`` draws from ``baselines`` (its distribution),
    no noise; all draws in one pass (captum has no batching knob for it)."""
    from captum.attr import GradientShap

    peer = GradientShap(model)
    return (lambda x, target: peer.attribute(x, baselines=baselines, n_samples=samples, stdevs=0.0, target=target)), \
        "captum.GradientShap"


def captum_smoothgrad(model: nn.Module) -> tuple[Callable[..., Any], str]:
    """``run(x, target, samples, per_pass, stdev)``: captum's NoiseTunnel(Saliency), smoothgrad, abs=False
    (vizkit's default base); ``per_pass``: its nt_samples_batch_size; one sigma for the whole input."""
    from captum.attr import NoiseTunnel, Saliency

    peer = NoiseTunnel(Saliency(model))

    def run(x: torch.Tensor, target: torch.Tensor, samples: int, per_pass: int, stdev: float) -> Any:
        return peer.attribute(x, nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=per_pass,
                              stdevs=stdev, target=target, abs=False)

    return run, "captum.NoiseTunnel(Saliency, smoothgrad, abs=False)"


def captum_occlusion(model: nn.Module, window: int, stride: int, fill: torch.Tensor, shape: torch.Size) -> tuple[Callable[..., Any], str]:
    """``run(x, target, per_eval)``: captum's Occlusion on the softmax, square windows over all channels,
    vizkit's fill as the baseline; ``per_eval``: its perturbations_per_eval."""
    from captum.attr import Occlusion

    _, channels, height, width = shape
    peer = Occlusion(lambda t: model(t).softmax(1))
    baseline = fill.expand(1, channels, height, width).contiguous()

    def run(x: torch.Tensor, target: torch.Tensor, per_eval: int) -> Any:
        return peer.attribute(x, target=target, sliding_window_shapes=(channels, window, window),
                              strides=(channels, stride, stride), baselines=baseline, perturbations_per_eval=per_eval)

    return run, "captum.Occlusion(softmax)"


# ------------------------------------------------------------------ pytorch-grad-cam


@contextlib.contextmanager
def pytorch_grad_cam(model: nn.Module, target: torch.Tensor, layer: str = "layer4",
                     reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     name: str | None = None, cam_class: str = "GradCAM", **settings: Any) -> Iterator[tuple[Callable[[torch.Tensor], Any], str]]:
    """``run(x)``: pytorch-grad-cam's ``cam_class`` (GradCAM, GradCAMPlusPlus, ScoreCAM, ...) on ``layer``
    (layer4; a ViT's: with its ``reshape_transform``) for ``target``'s classes, on a deep copy (its hooks
    stay on the layer while the object lives and would slow the other calls); released on exit; ``settings``:
    attributes set on the object (ScoreCAM's and AblationCAM's ``batch_size``). The gradient CAMs also
    compute every weight gradient."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    copied = copy.deepcopy(model)
    cam = getattr(pgc, cam_class)(model=copied, target_layers=[copied.get_submodule(layer)], reshape_transform=reshape_transform)
    for key, value in settings.items():
        setattr(cam, key, value)
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    try:
        yield (lambda x: cam(input_tensor=x, targets=targets)), name or f"pytorch_grad_cam.{cam_class}([{layer}])"
    finally:
        cam.activations_and_grads.release()


def vit_reshape_transform(height: int = 14, width: int = 14) -> Callable[[torch.Tensor], torch.Tensor]:
    """pytorch-grad-cam's documented ViT ``reshape_transform`` (its tutorial's): drop the class token,
    reshape the patch tokens to the ``height`` x ``width`` grid, channels first."""

    def reshape_transform(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    return reshape_transform


# ------------------------------------------------------------------ torchattacks


def torchattacks_attack(name: str, model: nn.Module, steps: int) -> tuple[Callable[[torch.Tensor, torch.Tensor], Any], str]:
    """torchattacks' FGSM or PGD (ε 8/255, step 2/255, random start) with the model's normalization set:
    ``run(x, labels)`` on the model's normalized input (torchattacks 3.5's ``__call__`` maps it back to
    pixels in [0, 1], attacks them and normalizes the result)."""
    import torchattacks

    if name == "fgsm":
        peer = torchattacks.FGSM(model, eps=8 / 255)
    else:
        peer = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=steps, random_start=True)
    peer.set_normalization_used(mean=model.pretrained_cfg["mean"], std=model.pretrained_cfg["std"])
    return peer, f"torchattacks.{type(peer).__name__}"


ROBUSTNESS_PEERS = {  # row -> torchattacks' class and settings (L∞ by default; ε 8/255 passed to all but CW, an L2 attack)
    "cw": ("CW", {"c": 1, "kappa": 0, "steps": 10, "lr": 0.01}),
    "apgd_ce": ("APGD", {"eps": 8 / 255, "loss": "ce", "steps": 10, "seed": 0}),
    "apgd_dlr": ("APGD", {"eps": 8 / 255, "loss": "dlr", "steps": 10, "seed": 0}),
    "apgd_t": ("APGDT", {"eps": 8 / 255, "n_classes": 4, "steps": 10, "seed": 0}),
    "fab_t": ("FAB", {"eps": 8 / 255, "multi_targeted": True, "n_classes": 4, "steps": 10, "seed": 0}),
    "square": ("Square", {"eps": 8 / 255, "n_queries": 100, "seed": 0}),
    "autoattack": ("AutoAttack", {"eps": 8 / 255, "n_classes": 4, "version": "standard", "seed": 0}),
}


def torchattacks_robustness(name: str, model: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], Any], str]:
    """(the copy it attacks, ``run(x, labels)``, its name): torchattacks' attack for a row of
    ``ROBUSTNESS_PEERS`` on a deep copy of the model, with ``set_normalization_used(mean, std)``, so
    it takes and returns the model's normalized input ``x`` (its ``__call__`` maps x back to pixels
    first, attacks them and normalizes the result). The copy's weight gradients (CW's
    ``cost.backward()``, FAB's backward) are cleared after every call, so each call is a user's first
    and the model the other rows use is untouched."""
    import torchattacks

    class_name, settings = ROBUSTNESS_PEERS[name]
    copied = copy.deepcopy(model)
    peer = getattr(torchattacks, class_name)(copied, **settings)
    peer.set_normalization_used(mean=model.pretrained_cfg["mean"], std=model.pretrained_cfg["std"])

    def run(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        adversarial = peer(x, labels)
        for parameter in copied.parameters():
            parameter.grad = None
        return adversarial

    shown = ", ".join(f"{key}={'8/255' if key == 'eps' else repr(value)}" for key, value in settings.items())
    return copied, run, f"torchattacks.{class_name}({shown})"


# ------------------------------------------------------------------ metrics' peers


def pytorch_grad_cam_metric(name: str, percentiles: list[float] | None = None) -> tuple[Callable[..., Any], str]:
    """``run(x, cams, target, model)``: pytorch-grad-cam's metric for a vizkit one, on numpy maps
    ``cams`` [B,H,W] and the target class's softmax probability (``ClassifierOutputSoftmaxTarget``):
    ROAD as ``ROADMostRelevantFirstAverage``/``ROADLeastRelevantFirstAverage`` with ``percentiles``
    (its shares of pixels kept: 100 - ours), average drop as ``DropInConfidence`` (max(0, Y - O), not
    divided by Y) and increase in confidence as ``IncreaseInConfidence`` (both
    ``CamMultImageConfidenceChange``: the normalized input times the map)."""
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    classes = {"road_morf": ROADMostRelevantFirstAverage, "road_lerf": ROADLeastRelevantFirstAverage,
               "average_drop": DropInConfidence, "increase_in_confidence": IncreaseInConfidence}
    peer = classes[name](percentiles) if name.startswith("road") else classes[name]()

    def run(x: torch.Tensor, cams: Any, target: torch.Tensor, model: nn.Module) -> Any:
        return peer(x, cams, [ClassifierOutputSoftmaxTarget(int(t)) for t in target], model)

    return run, f"pytorch_grad_cam.{type(peer).__name__}" + (f"(percentiles={percentiles})" if percentiles else "")


def captum_infidelity(model: nn.Module, std: torch.Tensor, samples: int, per_batch: int, seed: int = 0) -> tuple[Call, str]:
    """``run(x, attributions, target)``: captum's ``infidelity`` on the logits, ``normalize=True``,
    ``n_perturb_samples=samples``, ``max_examples_per_batch=per_batch`` (perturbed copies per forward),
    with a ``perturb_func`` drawing vizkit's kind of noise: per call, one Gaussian ``[C,H,W]`` per
    sample, ``std`` ([1,C,1,1]: the pixel std over the normalization's) per channel, shared by the
    inputs (captum's copies are input-major: copy r is sample r % k), and returning (I, x - I)."""
    from captum.metrics import infidelity

    generator = torch.Generator().manual_seed(seed)

    def run(x: torch.Tensor, attributions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            count = inputs.shape[0] // x.shape[0]  # the samples of this call
            draws = torch.randn((count, *inputs.shape[1:]), generator=generator) * std
            noise = draws[torch.arange(inputs.shape[0]) % count]
            return noise, inputs - noise

        return infidelity(model, perturb, x, attributions, target=target, n_perturb_samples=samples,
                          max_examples_per_batch=per_batch, normalize=True)

    return run, "captum.metrics.infidelity(normalize=True)"


def captum_sensitivity_max(model: nn.Module, radius: float, samples: int, per_batch: int) -> tuple[Call, str]:
    """``run(x, target)``: captum's ``sensitivity_max`` of ``Saliency(model).attribute`` (abs=True),
    its default uniform perturbation of ``radius`` (input units), ``n_perturb_samples=samples``,
    ``max_examples_per_batch=per_batch`` (perturbed copies per explanation)."""
    from captum.attr import Saliency
    from captum.metrics import sensitivity_max

    saliency = Saliency(model)

    def run(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sensitivity_max(saliency.attribute, x, perturb_radius=radius, n_perturb_samples=samples,
                               max_examples_per_batch=per_batch, target=target, abs=True)

    return run, "captum.metrics.sensitivity_max(Saliency(abs=True))"


# ------------------------------------------------------------------ lucent


def lucent_fns(model: nn.Module, layer: str, channel: int, size: int, batch: int, steps: int,
               extra: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """lucent's render_vis on ``layer``'s ``channel``, the same steps and size, Adam lr 0.05 and standard
    transforms (its defaults), on deep copies (its ~93 forward hooks per call are counted, then removed,
    so calls do not pile them up): "peer" as a user calls it (weights require grad: their gradients are
    computed too), "peer2" with the copy frozen. lucent upsamples a 128-px image to 224 px before the
    model (its transforms grow it to 152-168 px first) and runs the whole model; "peer_floor" is one
    forward + backward of the whole model at 224 px, frozen, to the input: lucent's own floor
    (``extra["peer_floor_passes"]`` of them per call). Warms lucent up; fills ``extra`` with what it saw."""
    with warnings.catch_warnings():  # kornia 0.4.1 at import: torch.jit.script is deprecated
        warnings.simplefilter("ignore")
        from lucent.optvis import param, render

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


# ------------------------------------------------------------------ zennit


def timm_basic_block_sum():
    """zennit's ``ResNetBasicBlockCanonizer`` rewritten for timm's ``BasicBlock``: the skip addition as a
    ``Sum`` module, which zennit's composites give the normalization rule (a ``+`` is not a module)."""
    from timm.models.resnet import BasicBlock
    from zennit.canonizers import AttributeCanonizer
    from zennit.layer import Sum

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(self.canonizer_sum(torch.stack([shortcut, x], dim=-1)))

    def attributes(_name, module):
        if isinstance(module, BasicBlock):
            return {"forward": forward.__get__(module), "canonizer_sum": Sum()}
        return None

    return AttributeCanonizer(attributes)


def zennit_lrp(model: nn.Module, composite: str, low: torch.Tensor | None = None, high: torch.Tensor | None = None) -> tuple[Call, str]:
    """``run(x, target)``: zennit's relevance at the input with ``composite`` (its registered name), the
    target's logit as the output relevance, on a copy with ``inplace=False`` ReLUs and the canonizers a
    timm ResNet or VGG needs (``SequentialMergeBatchNorm``, the BasicBlock's ``Sum``). ``low``/``high``:
    the pixel bounds of the box rule, for the composites that take them."""
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import COMPOSITES

    copied = without_inplace_relus(model)
    settings = {} if low is None else {"low": low, "high": high}

    def run(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0])
        with torch.no_grad():
            logits = copied(x)
        output_relevance = torch.zeros_like(logits)
        output_relevance[rows, target] = logits[rows, target]
        built = COMPOSITES[composite](canonizers=[SequentialMergeBatchNorm(), timm_basic_block_sum()], **settings)
        with Gradient(copied, built) as attributor:
            return attributor(x, output_relevance)[1]

    return run, f"zennit.Gradient({composite})"


# ------------------------------------------------------------------ torchcam


@contextlib.contextmanager
def torchcam_smoothgradcampp(model: nn.Module, layer: str, samples: int, std: float, shape: tuple[int, ...]) -> Iterator[tuple[Call, str]]:
    """``run(x, target)``: torchcam's ``SmoothGradCAMpp`` on a copy: the clean forward its extractor
    needs, then its ``samples`` noisy forwards and backwards; its hooks removed on exit."""
    from torchcam.methods import SmoothGradCAMpp

    copied = copy.deepcopy(model)
    extractor = SmoothGradCAMpp(copied, layer, num_samples=samples, std=std, input_shape=shape)

    def run(x: torch.Tensor, target: torch.Tensor) -> Any:
        copied(x)
        return extractor(class_idx=target.tolist(), normalized=False)

    try:
        yield run, f"torchcam.SmoothGradCAMpp({layer})"
    finally:
        extractor.remove_hooks()
