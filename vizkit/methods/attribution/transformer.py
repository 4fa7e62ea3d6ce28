"""What the attention-based methods share: they explain vision transformers only, read the attention
beside ``F.scaled_dot_product_attention``, and show the class token's row of a token-to-token
relevance over the patch grid."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vizkit.core.errors import ConfigError
from vizkit.core.models import token_model
from vizkit.methods.base import AttributionMethod


class TransformerAttribution(AttributionMethod):
    """An attribution method for timm's ViT, DeiT, EVA and BEiT (patch tokens and attention)."""

    target_kinds = frozenset({"class"})

    def check(self, model):
        if not token_model(model):
            raise ConfigError(f"{self.name} explains vision transformers (a timm ViT, DeiT, EVA, BEiT: patch tokens and attention); "
                              f"{type(model).__name__} has none: use gradcam or another method")

    def require_attention(self, attentions: list) -> None:
        if not attentions:
            raise ConfigError(f"{self.name} found no scaled_dot_product_attention call in the forward: the model computes attention "
                              f"by hand (timm's fused_attn=False, or TIMM_FUSED_ATTN=0), where its probabilities cannot be read")


def class_token_map(flow: torch.Tensor, prefix: int, height: int, width: int, size: tuple[int, int]) -> torch.Tensor:
    """[B,1,H,W]: the class token's row of a [B, N, N] token relevance over the patch tokens (a model
    without a class token: the mean row), on the patch grid, upsampled bilinearly to ``size``."""
    relevance = flow[:, 0, prefix:] if prefix else flow.mean(1)
    grid = relevance.reshape(-1, 1, height, width)
    return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)
