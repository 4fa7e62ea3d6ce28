"""Gradient-weighted attention (Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability for
Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021; the generic-attention successor of
"Transformer Interpretability Beyond Attention Visualization", CVPR 2021).

With A_l block l's attention probabilities [B, heads, N, N] and ∇A_l = dS/dA_l, S the target class's
logit:

    Ā_l = mean over heads of ( ∇A_l ⊙ A_l )^+        (clamped after the product, then averaged)
    R   = I;   for l = 1..L (first block first):   R = R + Ā_l · R

The map is the class token's row of R over the patch tokens (a model without a class token: the mean
row of the patch tokens), reshaped to the patch grid at the input's size and upsampled bilinearly, as
attention rollout's. This is the reference code's ``avg_heads`` and ``apply_self_attention_rules``
(hila-chefer/Transformer-MM-Explainability, its ViT notebook).

Unlike rollout it explains a class: each head's attention is weighted by the target logit's gradient
and only positive contributions are kept, the residual enters as the identity added to each update
(no ½ averaging, no row normalization), and there is no head_fusion or discard_ratio. The
probabilities and their gradients come from ``vizkit.probes.attention.attention_with_gradients``, which
leaves the model untouched (its attention written out as timm's unfused path: the output equal to the
fused one up to float32 rounding); one forward and one backward, and only the attention maps'
gradients are requested (no weight gradient).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vizkit.core.errors import ConfigError
from vizkit.core.models import token_grid
from vizkit.methods.attribution.transformer import TransformerAttribution, class_token_map
from vizkit.probes.attention import attention_with_gradients


@dataclass
class GradientWeightedAttentionConfig:
    """No fields: the paper's rule has no parameters."""


def relevance(attentions: list[torch.Tensor], gradients: list[torch.Tensor]) -> torch.Tensor:
    """[B, N, N]: R after every block's update (first block first); ``gradients`` are overwritten."""
    result = None
    for attention, gradient in zip(attentions, gradients):
        weighted = gradient.mul_(attention).clamp_min_(0).mean(1)  # the gradient is ours alone: reused in place
        if result is None:  # I + Ā₁ · I
            result = weighted
            result.diagonal(dim1=-2, dim2=-1).add_(1)
        else:
            result = torch.baddbmm(result, weighted, result)
    return result


class GradientWeightedAttention(TransformerAttribution):
    name = "gradient_weighted_attention"
    description = "gradient-weighted attention: positive gradient x attention, averaged over heads, propagated through the blocks (Chefer et al. 2021)"
    Config = GradientWeightedAttentionConfig

    def compute(self, model, x, target, pixels):
        self.check(model)
        # x requires a gradient so that the forward builds a graph even when every weight is frozen;
        # only the maps' gradients are requested, so neither x nor a weight gets one
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            with attention_with_gradients() as attentions:
                score = target.score(model, x)
            self.require_attention(attentions)
            prefix, height, width = token_grid(model, x.shape[-2:])
            tokens = prefix + height * width
            odd = next((a for a in attentions if a.shape[-2:] != (tokens, tokens)), None)
            if odd is not None:  # e.g. an attention-pooling head's latent query: not self-attention over the tokens
                raise ConfigError(f"{self.name} propagates relevance through self-attention over all {tokens} tokens, and this model "
                                  f"also attends {odd.shape[-2]}x{odd.shape[-1]} (an attention-pooling head): use attention_rollout or gradcam")
            gradients = torch.autograd.grad(score.sum(), attentions, allow_unused=True)
        gradients = [torch.zeros_like(a) if g is None else g for a, g in zip(attentions, gradients)]  # a block the score does not reach
        flow = relevance([a.detach() for a in attentions], gradients)
        return class_token_map(flow, prefix, height, width, x.shape[-2:])
