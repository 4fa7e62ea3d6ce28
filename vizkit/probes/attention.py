"""The attention probabilities of a transformer's forward, read without touching the model.

timm's attention calls ``F.scaled_dot_product_attention`` (its fused default), which never
materializes the probabilities. ``attention_maps()`` intercepts each call for the duration of one
forward with a ``TorchFunctionMode`` and computes the attention written out, as timm's own unfused
path (``fused_attn=False``) does: ``A = softmax(q kᵀ · scale + mask)`` from the call's ``q``, ``k``
and mask, recorded as ``[B, heads, N, N]`` in call order (block order), and ``A @ value`` returned in
place of the fused kernel's result. The model's output is therefore its unfused output, equal to the
fused one up to float32 rounding (a few ulps), and the probabilities are computed once, not once by
the kernel and again beside it (that was ~10 % of a ViT-S forward). No flag is flipped and no hook
registered, so nothing outlives the block. Dropout is not applied (an explanation is of the eval-mode
model). A model whose attention is written out by hand (``fused_attn=False``) makes no such call and
is refused by the caller.

``attention_with_gradients()`` computes ``A`` in the graph of ``q`` and ``k`` (gradient-weighted
attention needs ``d score / dA``): the backward runs through ``A @ value`` into ``A`` and on through
``q``, ``k`` and ``value`` to the blocks before, as through timm's unfused attention.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _AttentionMode(TorchFunctionMode):
    def __init__(self, gradients: bool = False, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.maps: list[torch.Tensor] = []
        self.gradients = gradients
        self.reduce = reduce
        self.buffer: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key = _query_key(*args, **kwargs)  # the call's own, positional or by name
        if not self.gradients and self.reduce is not None:
            # every block's maps are computed in one reused buffer: only what reduce keeps is new memory
            # (allocating and freeing [B, heads, N, N] per block cost the forward ~10 % in page faults)
            shape = (2, *query.shape[:-1], key.shape[-2])
            if self.buffer is None or self.buffer.shape != shape or self.buffer.device != query.device:
                self.buffer = torch.empty(shape, dtype=torch.float32, device=query.device)  # the logits, the probabilities
            probabilities = _probabilities(*args, **kwargs, buffer=self.buffer)
            self.maps.append(self.reduce(probabilities))
        else:
            probabilities = _probabilities(*args, **kwargs, differentiable=self.gradients)
            self.maps.append(probabilities)
        return (probabilities @ _values(probabilities, *args, **kwargs)).to(query.dtype)


def _query_key(query, key, *args, **kwargs):
    return query, key


def _values(probabilities, query, key, value, *args, enable_gqa=False, **kwargs):
    """``value`` as the probabilities weight it: float32, its heads repeated for grouped-query attention."""
    v = value.float()
    if enable_gqa and v.shape[-3] != probabilities.shape[-3]:
        v = v.repeat_interleave(probabilities.shape[-3] // v.shape[-3], dim=-3)
    return v


def _probabilities(query, key, value=None, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                   differentiable=False, buffer=None):
    """What ``scaled_dot_product_attention`` weights the values by, in float32; ``differentiable``: in
    the graph of ``query`` and ``key``; ``buffer``: ``[2, B, heads, N, N]`` float32 to compute the logits
    and the probabilities in, without a mask (no new memory: a view of ``buffer[1]`` is returned)."""
    q, k = (query.float(), key.float()) if differentiable else (query.detach().float(), key.detach().float())
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    factor = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    if buffer is not None and not differentiable and not is_causal and attn_mask is None:
        torch.matmul(q, k.transpose(-2, -1), out=buffer[0]).mul_(factor)
        return torch.softmax(buffer[0], -1, out=buffer[1])
    logits = q @ k.transpose(-2, -1) * factor
    if is_causal:
        logits = logits.masked_fill(torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).triu(1), float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask.float()
    return logits.softmax(-1)


@contextmanager
def attention_maps(reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[list[torch.Tensor]]:
    """Within the block, every attention's probabilities ``[B, heads, N, N]`` are appended to the list;
    ``reduce`` (e.g. a fusion of the heads) is applied to each as it is read, so that only what it
    keeps is held until the forward ends; it must return new memory, not a view (the maps it is given
    live in a buffer the next block overwrites)."""
    mode = _AttentionMode(reduce=reduce)
    with mode:
        yield mode.maps


@contextmanager
def attention_with_gradients() -> Iterator[list[torch.Tensor]]:
    """As ``attention_maps()``, but each recorded ``[B, heads, N, N]`` is in the forward's graph, so that
    ``torch.autograd.grad(score, maps)`` gives ``d score / dA`` for every block; the forward's output is
    unchanged. Only a forward whose input (or weights) requires a gradient builds that graph."""
    mode = _AttentionMode(gradients=True)
    with mode:
        yield mode.maps
