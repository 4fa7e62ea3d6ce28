"""The attention probabilities of a transformer's forward, read without touching the model.

timm's attention calls ``F.scaled_dot_product_attention`` (its fused default), which never
materializes the probabilities. ``attention_maps()`` intercepts each call for the duration of one
forward with a ``TorchFunctionMode``: the call itself runs unchanged (the model's output is exactly
its own) and, beside it, ``softmax(q kᵀ · scale + mask)`` is computed from the same ``q``, ``k`` and
mask and recorded as ``[B, heads, N, N]``, in call order (block order). No flag is flipped and no hook
registered, so nothing outlives the block. Dropout is not applied (an explanation is of the eval-mode
model). A model whose attention is written out by hand (``fused_attn=False``) makes no such call and
is refused by the caller.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _AttentionMode(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.maps: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.maps.append(_probabilities(*args, **kwargs))
        return func(*args, **kwargs)


def _probabilities(query, key, value=None, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What ``scaled_dot_product_attention`` weights the values by, in float32."""
    q, k = query.detach().float(), key.detach().float()
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    logits = q @ k.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if is_causal:
        logits = logits.masked_fill(torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).triu(1), float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask.float()
    return logits.softmax(-1)


@contextmanager
def attention_maps() -> Iterator[list[torch.Tensor]]:
    """Within the block, every attention's probabilities ``[B, heads, N, N]`` are appended to the list."""
    mode = _AttentionMode()
    with mode:
        yield mode.maps
