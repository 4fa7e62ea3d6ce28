"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Each block's attention, heads fused (``head_fusion``: mean, max or min over heads), the residual
connection accounted for by averaging with the identity and rows renormalized:

    Â_l = normalize_rows( ½ A_l + ½ I ),        rollout = Â_L · … · Â_2 · Â_1

The map is the class token's row of the rollout over the patch tokens (a model without a class token:
the mean row of the patch tokens), reshaped to the patch grid at the input's size and upsampled
bilinearly. ``discard_ratio`` (as in the widely used vit-explain code) zeroes that fraction of each
fused attention's smallest entries per row, never a row's attention to the class token, before the
identity is added: 0 is the paper's rollout.

It explains the model, not a class: every target gets the same map (the prediction is read from the
same forward). The attention probabilities come from ``vizkit.probes.attention``, which leaves the
model untouched; timm's ViT, DeiT, EVA and BEiT compute attention with
``F.scaled_dot_product_attention`` by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vizkit.core.errors import ConfigError
from vizkit.core.models import token_grid
from vizkit.methods.attribution.transformer import TransformerAttribution, class_token_map
from vizkit.probes.attention import attention_maps

HEAD_FUSIONS = ("mean", "max", "min")


@dataclass
class AttentionRolloutConfig:
    head_fusion: str = "mean"  # mean | max | min over the heads of each block
    discard_ratio: float = 0.0  # fraction of each fused attention row's smallest entries set to 0 (0: the paper)

    def __post_init__(self) -> None:
        if self.head_fusion not in HEAD_FUSIONS:
            raise ConfigError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got '{self.head_fusion}'")
        if not 0.0 <= float(self.discard_ratio) < 1.0:
            raise ConfigError(f"discard_ratio must be in [0, 1), got {self.discard_ratio}")


def fuse_heads(attention: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """[B, heads, N, N] -> [B, N, N] by the mean, max or min over the heads."""
    if head_fusion == "mean":
        return attention.mean(1)
    return attention.amax(1) if head_fusion == "max" else attention.amin(1)


def rollout(attentions: list[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0, prefix: int = 1) -> torch.Tensor:
    """[B, N, N]: the rollout of per-block attentions, first block first: [B, heads, N, N], or [B, N, N]
    with the heads already fused by ``head_fusion``."""
    result = None
    for attention in attentions:
        fused = fuse_heads(attention, head_fusion) if attention.dim() == 4 else attention
        if discard_ratio > 0:
            count = int(fused.shape[-1] * discard_ratio)
            if count:
                smallest = fused.topk(count, dim=-1, largest=False).indices
                keep = torch.ones_like(fused, dtype=torch.bool).scatter(-1, smallest, False)
                keep[..., :prefix] = True  # attention to the class token is never discarded
                fused = fused * keep
        step = fused * 0.5
        step.diagonal(dim1=-2, dim2=-1).add_(0.5)  # ½ A + ½ I
        if head_fusion != "mean" or discard_ratio > 0:  # a mean of softmax rows already sums to 1
            step = step / step.sum(-1, keepdim=True)
        result = step if result is None else step @ result
    return result


class AttentionRollout(TransformerAttribution):
    name = "attention_rollout"
    description = "attention rollout: attention multiplied through the blocks, residuals included (Abnar & Zuidema 2020)"
    Config = AttentionRolloutConfig

    def compute(self, model, x, target, pixels):
        self.check(model)
        fusion = self.config.head_fusion
        with torch.no_grad(), attention_maps(reduce=lambda attention: fuse_heads(attention, fusion)) as attentions:
            target.logits(model, x)  # the forward whose attention is rolled out; it also gives the prediction
        self.require_attention(attentions)
        prefix, height, width = token_grid(model, x.shape[-2:])
        flow = rollout(attentions, self.config.head_fusion, float(self.config.discard_ratio), prefix)
        if flow.shape[-1] != prefix + height * width:
            raise ConfigError(f"{self.name}: the attention covers {flow.shape[-1]} tokens, not {prefix} prefix token(s) and a "
                              f"{height}x{width} patch grid")
        return class_token_map(flow, prefix, height, width, x.shape[-2:])
