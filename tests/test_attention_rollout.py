"""Attention rollout (Abnar & Zuidema 2020) on a timm ViT: equal to the rollout written out by explicit
matrix products on a 2-block, 2-head model, the model left untouched, refusals in one line."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vizkit
from vizkit.core.errors import ConfigError


def tiny_vit(**kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_heads=2, embed_dim=8, img_size=8, patch_size=4,
                             num_classes=3, **kwargs).eval()


def attention_by_hand(model, x):
    """Each block's attention probabilities [B, heads, N, N] from its own weights: q kᵀ · scale, softmax."""
    maps = []
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for block in model.blocks:
            normed = block.norm1(h)
            batch, tokens, _ = normed.shape
            qkv = block.attn.qkv(normed).reshape(batch, tokens, 3, block.attn.num_heads, block.attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = qkv[0], qkv[1]
            maps.append((q @ k.transpose(-2, -1) * block.attn.scale).softmax(-1))
            h = block(h)
    return maps


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rollout_equals_the_explicit_matrix_products(fusion):
    model = tiny_vit()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    first, second = attention_by_hand(model, x)
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}[fusion]
    eye = torch.eye(5)
    steps = []
    for attention in (first, second):
        step = 0.5 * fuse(attention) + 0.5 * eye
        steps.append(step / step.sum(-1, keepdim=True))
    flow = torch.bmm(steps[1], steps[0])  # Â₂ · Â₁
    expected = F.interpolate(flow[:, 0, 1:].reshape(2, 1, 2, 2), size=(8, 8), mode="bilinear", align_corners=False)
    got = vizkit.create_method("attention_rollout", head_fusion=fusion).attribute(model, x, [0, 1], mean=(0.5,) * 3, std=(0.5,) * 3)
    # 5x5 products of float32 probabilities: a few ulps of values ≤ 1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got.std() > 0


def test_discard_ratio_keeps_the_class_token_and_the_model_is_untouched():
    model = tiny_vit()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    flags = [block.attn.fused_attn for block in model.blocks]
    state = {name: value.clone() for name, value in model.state_dict().items()}
    plain = vizkit.create_method("attention_rollout").attribute(model, x, [1], mean=(0.5,) * 3, std=(0.5,) * 3)
    sparse = vizkit.create_method("attention_rollout", discard_ratio=0.6).attribute(model, x, [1], mean=(0.5,) * 3, std=(0.5,) * 3)
    assert torch.isfinite(sparse).all() and not torch.allclose(plain, sparse)
    assert [block.attn.fused_attn for block in model.blocks] == flags and not model.training
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


def test_rollout_refuses_what_it_cannot_read():
    with pytest.raises(ConfigError, match="attention_rollout explains vision transformers"):
        vizkit.create_method("attention_rollout").attribute(vizkit.load_model("embedded"), torch.rand(1, 3, 128, 128), [1])
    by_hand = tiny_vit()
    for block in by_hand.blocks:
        block.attn.fused_attn = False
    with pytest.raises(ConfigError, match="found no scaled_dot_product_attention call"):
        vizkit.create_method("attention_rollout").attribute(by_hand, torch.randn(1, 3, 8, 8), [1], mean=(0.5,) * 3, std=(0.5,) * 3)
    for fields, message in [({"head_fusion": "median"}, "head_fusion must be one of mean, max, min"), ({"discard_ratio": 1.0}, "discard_ratio must be in")]:
        with pytest.raises(ConfigError, match=message):
            vizkit.create_method("attention_rollout", **fields)
