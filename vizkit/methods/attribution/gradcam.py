"""Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization").

With A the activation of a convolutional layer (K channels) and S the target's score (a class logit):

    alpha_k = mean over (i, j) of dS/dA_k[i, j]           (global-average-pooled gradients)
    L       = ReLU( sum_k alpha_k * A_k )                  (eq. 1-2)

then upsampled bilinearly to the input's size. The layer defaults to the backbone's last feature stage
(timm's ``feature_info``: ``layer4`` for ResNets, ``stages.3`` for ConvNeXt, ``blocks.6`` for
EfficientNet-B0). Stages whose output is channels-last (``[B,H,W,C]``: Swin, MaxViT) are recognized
from ``feature_info``'s channel count, or with ``layout=nhwc``.

Vision transformers (ViT, DeiT, EVA, BEiT: ``layout=tokens``, recognized from a ``[B,N,C]`` output
of a model with a ``patch_embed``) lay a layer out as ``[B, prefix + H*W, C]``: the class,
distillation and register tokens (the model's ``num_prefix_tokens``) are dropped and the rest
reshaped to the patch grid at the actual input's size (``patch_embed.dynamic_feat_size``, else its
``grid_size``), never a fixed 14x14. Their default layer is the last block's first norm
(``vizkit.core.models.default_layer`` says why). This is pytorch-grad-cam's ViT recipe (its
``reshape_transform``), and the map equals its ``GradCAM`` there up to its min-max scaling.

One forward and one backward that stops at the layer: only the activation's gradient is requested,
so no weight gradient is computed and no graph is retained (pytorch-grad-cam was measured at 2.5-2.7x
that floor for doing both). The layer's true output is used even when an in-place op follows it
(``vizkit.core.hooks.capture_output``).

The map is not normalized: it keeps the score's units, so maps of one run compare. It equals captum's
``LayerGradCam(relu_attributions=True)`` followed by ``LayerAttribution.interpolate(..., "bilinear")``,
and pytorch-grad-cam's ``GradCAM`` up to that library's per-image min-max scaling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vizkit.core.errors import ConfigError
from vizkit.core.hooks import capture_output
from vizkit.methods.base import AttributionMethod
from vizkit.core.layouts import LAYOUTS, channels_first, layout_of
from vizkit.core.models import default_layer, find_layer


@dataclass
class GradCamConfig:
    layer: str = ""  # a named_modules() name (vizkit-layers MODEL); "" = the last feature stage in timm's feature_info
    layout: str = "auto"  # auto (from feature_info's channel count; tokens for a ViT's [B,N,C]), nchw, nhwc, tokens
    relu: bool = True  # the paper's ReLU: keep only evidence for the target

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got '{self.layout}'")


def layer_activation_and_gradient(model, x, target, layer: str, method_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output for x and the gradient of the target's summed score with respect to it."""
    module = find_layer(model, layer)
    x = x.detach()
    with torch.enable_grad():
        with capture_output(module, layer) as captured:
            score = target.score(model, x)
        if len(captured) != 1:
            times = "never" if not captured else f"{len(captured)} times"
            raise ConfigError(f"{method_name}: layer '{layer}' runs {times} in one forward pass "
                              f"(before the target, once); choose another with method.layer=NAME")
        (activation,) = captured
        if not activation.requires_grad:
            raise ConfigError(f"{method_name}: the target's score does not depend on layer '{layer}'; choose a layer before the target")
        (gradient,) = torch.autograd.grad(score.sum(), activation)
    return activation.detach(), gradient


def feature_map(tensor: torch.Tensor, model, layer: str, input_size, layout: str) -> torch.Tensor:
    """The layer's output (or its gradient) as ``[B,C,H,W]``, or a one-line refusal."""
    maps = channels_first(tensor, model, layer, input_size, layout)
    if maps.dim() != 4:
        raise ConfigError(f"layer '{layer}' outputs shape {tuple(tensor.shape)}; Grad-CAM needs a [B,C,H,W] feature map "
                          f"(a convolutional layer) or a vision transformer's tokens")
    return maps


class GradCam(AttributionMethod):
    name = "gradcam"
    description = "Grad-CAM: a layer's activations weighted by their pooled gradients (Selvaraju et al. 2017)"
    Config = GradCamConfig
    target_kinds = frozenset({"class", "channel", "neuron"})

    def check(self, model):
        find_layer(model, self.config.layer or default_layer(model))

    def compute(self, model, x, target, pixels):
        layer = self.config.layer or default_layer(model)
        activation, gradient = layer_activation_and_gradient(model, x, target, layer, self.name)
        layout = layout_of(activation, model, layer, x.shape[-2:], self.config.layout)
        activation = feature_map(activation, model, layer, x.shape[-2:], layout).float()
        gradient = feature_map(gradient, model, layer, x.shape[-2:], layout).float()
        weights = gradient.mean((2, 3), keepdim=True)  # alpha_k
        cam = (weights * activation).sum(1, keepdim=True)
        if self.config.relu:
            cam = cam.clamp_min(0)
        return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
