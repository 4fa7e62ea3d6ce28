"""A layer's output as channels first, ``[B, C, H, W]``, whatever layout the model keeps it in.

A channel target, Grad-CAM's weights and an optimization's channel objective all mean "channel C at
every position". timm's models hold a layer's features in one of three layouts:

    nchw    convolutional networks (ResNet, ConvNeXt and EfficientNet stages)
    nhwc    ``[B, H, W, C]``: Swin and MambaOut (the model's ``output_fmt`` is "NHWC"), and any
            ``feature_info`` stage whose channel count is the last axis
    tokens  ``[B, prefix + H*W, C]``: ViT, DeiT, EVA, BEiT (a ``patch_embed`` and ``num_prefix_tokens``)

``auto`` tells them apart from the model: tokens for a token model's ``[B, N, C]`` output whose N is
its prefix plus the patch grid at the input's size (the class, distillation and register tokens are
dropped: they have no place in the image); nhwc for a stage whose ``feature_info`` channel count is
the last axis, or a 4-D output of an NHWC model other than a convolution's or a batch norm's; nchw
otherwise. So "channel C" of a ViT block is embedding dimension C over the patch tokens, and a channel
objective (a mean over positions) averages it over the patch tokens. Inside a ConvNeXt block (its
norm and MLP run channels-last) auto cannot tell; ``layout=nhwc`` says so where a method has the field.
"""
from __future__ import annotations

import torch
from torch import nn

from vizkit.core.errors import ConfigError
from vizkit.core.models import token_grid, token_model

LAYOUTS = ("auto", "nchw", "nhwc", "tokens")
_CHANNELS_FIRST_MODULES = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)


def stage_channels(model: nn.Module, layer: str) -> int | None:
    """The channel count timm's ``feature_info`` gives the stage ``layer`` (None: not a stage)."""
    for entry in getattr(model, "feature_info", None) or []:
        if isinstance(entry, dict) and entry.get("module") == layer:
            return entry.get("num_chs")
    return None


def layout_of(output: torch.Tensor, model: nn.Module, layer: str, input_size: tuple[int, int], layout: str = "auto") -> str:
    """nchw, nhwc or tokens for this output of ``layer`` (see the module's docstring); 3-D outputs of a
    model without tokens and 2-D outputs are "nchw": their channel is axis 1."""
    if layout != "auto":
        return layout
    if output.dim() == 3 and token_model(model):
        prefix, height, width = token_grid(model, input_size)
        if output.shape[1] == prefix + height * width:
            return "tokens"
    if output.dim() == 4:
        channels = stage_channels(model, layer)
        if channels is not None:
            return "nhwc" if output.shape[1] != channels and output.shape[-1] == channels else "nchw"
        if getattr(model, "output_fmt", None) == "NHWC" and not isinstance(_module(model, layer), _CHANNELS_FIRST_MODULES):
            return "nhwc"
    return "nchw"


def _module(model: nn.Module, layer: str) -> nn.Module | None:
    try:
        return model.get_submodule(layer) if layer else None
    except AttributeError:
        return None


def channels_first(output: torch.Tensor, model: nn.Module, layer: str, input_size: tuple[int, int], layout: str = "auto") -> torch.Tensor:
    """The output with channels on axis 1 and the image's positions after it: ``[B, C, H, W]`` for
    feature maps and token sequences, the output itself for anything else (``[B, C]``)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got '{layout}'")
    chosen = layout_of(output, model, layer, input_size, layout)
    if chosen == "tokens":
        if output.dim() != 3 or not token_model(model):
            raise ConfigError(f"layer '{layer}' outputs shape {tuple(output.shape)}; layout=tokens needs a [B,N,C] layer of a "
                              f"vision transformer (a model with patch_embed and num_prefix_tokens)")
        prefix, height, width = token_grid(model, input_size)
        if output.shape[1] - prefix != height * width:
            raise ConfigError(f"layer '{layer}' outputs {output.shape[1]} tokens; {prefix} prefix token(s) and a {height}x{width} patch "
                              f"grid make {prefix + height * width}: choose a layer that keeps every patch token")
        return output[:, prefix:].reshape(output.shape[0], height, width, output.shape[2]).permute(0, 3, 1, 2)
    if chosen == "nhwc":
        if output.dim() != 4:
            raise ConfigError(f"layer '{layer}' outputs shape {tuple(output.shape)}; layout=nhwc needs a [B,H,W,C] feature map")
        return output.permute(0, 3, 1, 2)
    return output
