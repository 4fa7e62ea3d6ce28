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

from vizkit.methods.attribution.cam import CamConfig, CamInputs, CamMethod


@dataclass
class GradCamConfig(CamConfig):
    """layer, layout, relu (``CamConfig``)."""


class GradCam(CamMethod):
    name = "gradcam"
    description = "Grad-CAM: a layer's activations weighted by their pooled gradients (Selvaraju et al. 2017)"
    Config = GradCamConfig

    def weights(self, inputs: CamInputs):
        return inputs.gradient.mean((2, 3), keepdim=True)  # alpha_k
