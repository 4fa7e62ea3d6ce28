"""Gradient-weighted attention (Chefer, Gur & Wolf 2021) on a timm ViT: equal to the rule written out
by explicit matrix products through a hand-written forward of a 2-block, 2-head model, class-specific,
the model and its output untouched, refusals in one line."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vizkit
from test_attention_rollout import tiny_vit
from vizkit.core.errors import ConfigError
from vizkit.probes.attention import attention_with_gradients

NORMALIZED = {"mean": (0.5,) * 3, "std": (0.5,) * 3}


def conditioned_vit(**kwargs):
    """tiny_vit with every linear layer redrawn at unit gain: timm's 0.02-std init gives logits ~0.06 and
    gradient-weighted attention ~1e-7 beside the identity, too small for a comparison to mean anything."""
    model = tiny_vit(**kwargs)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / layer.in_features ** 0.5)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.1)
    return model


def forward_by_hand(model, x):
    """The tiny ViT's logits and each block's attention probabilities [B, heads, N, N], every block
    written out with explicit matrix products, so the probabilities are nodes of the logits' graph."""
    h = model._pos_embed(model.patch_embed(x))  # patch and position embedding: not what is under test
    maps = []
    for block in model.blocks:
        attn = block.attn
        normed = F.layer_norm(h, (h.shape[-1],), block.norm1.weight, block.norm1.bias, block.norm1.eps)
        batch, tokens, width = normed.shape
        qkv = F.linear(normed, attn.qkv.weight, attn.qkv.bias).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        probabilities = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
        maps.append(probabilities)
        mixed = (probabilities @ v).transpose(1, 2).reshape(batch, tokens, width)
        h = h + F.linear(mixed, attn.proj.weight, attn.proj.bias)
        normed = F.layer_norm(h, (width,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
        hidden = F.gelu(F.linear(normed, block.mlp.fc1.weight, block.mlp.fc1.bias))
        h = h + F.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias)
    # timm normalizes the tokens before a class-token pool, the pooled mean after an average pool (fc_norm)
    if model.num_prefix_tokens:
        pooled = F.layer_norm(h, (h.shape[-1],), model.norm.weight, model.norm.bias, model.norm.eps)[:, 0]
    else:
        pooled = F.layer_norm(h.mean(1), (h.shape[-1],), model.fc_norm.weight, model.fc_norm.bias, model.fc_norm.eps)
    return F.linear(pooled, model.head.weight, model.head.bias), maps


@pytest.mark.parametrize("tokens", ["class_token", "no_class_token"])
def test_the_map_equals_the_rule_by_explicit_matrix_products(tokens):
    model = conditioned_vit() if tokens == "class_token" else conditioned_vit(class_token=False, global_pool="avg")
    prefix = int(model.num_prefix_tokens)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 1])
    with torch.enable_grad():
        logits, (first, second) = forward_by_hand(model, x)
        with torch.no_grad():  # the hand-written forward is the model's: fused and explicit attention agree to rounding
            # logits O(1) after ~30 float32 ops, each adding ≤ 1 unit roundoff (6e-8) relative, in another order: ≲ 2e-6
            torch.testing.assert_close(logits, model(x), rtol=0, atol=1e-5)
        grad_first, grad_second = torch.autograd.grad(logits.gather(1, classes.view(-1, 1)).sum(), (first, second))
    weighted = [(g * a).clamp(min=0).mean(1) for g, a in ((grad_first, first.detach()), (grad_second, second.detach()))]
    relevance = torch.eye(4 + prefix).expand(2, -1, -1)
    for step in weighted:  # first block first: R ← R + Ā·R
        relevance = relevance + torch.bmm(step, relevance)
    rows = relevance[:, 0, prefix:] if prefix else relevance.mean(1)
    expected = F.interpolate(rows.reshape(2, 1, 2, 2), size=(8, 8), mode="bilinear", align_corners=False)
    got = vizkit.create_method("gradient_weighted_attention").attribute(model, x, classes.tolist(), **NORMALIZED)
    # the two computations (the probe's written-out attention vs. the hand-written model) differ by rounding
    # only: a gradient comes through ~30 float32 ops of forward and backward, each adding ≤ 1 unit roundoff
    # (6e-8) relative, and the map sums such terms times probabilities ≤ 1 (plus 4x4/5x5 products of
    # them): ≲ 2e-6 of the map's largest value; 4e-6 leaves a factor 2
    scale = expected.abs().max()
    assert (expected - expected.mean()).abs().max() > 0.01 * scale  # not the identity's flat 1/N alone
    torch.testing.assert_close(got, expected, rtol=0, atol=4e-6 * float(scale))


def test_the_probe_keeps_the_forward_and_the_maps_get_gradients():
    model = tiny_vit()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(x)
    with torch.enable_grad(), attention_with_gradients() as maps:
        probed = model(x.requires_grad_(True))
    # the attention written out instead of the fused kernel: the same logits up to float32 rounding of
    # activations of order 1 through two blocks (~30 roundings of 6e-8 each)
    torch.testing.assert_close(probed, plain, rtol=0, atol=1e-5)
    assert len(maps) == 2 and all(m.requires_grad and m.shape == (2, 2, 5, 5) for m in maps)
    assert all(g is not None and g.abs().sum() > 0 for g in torch.autograd.grad(probed[:, 0].sum(), maps))


def test_classes_differ_and_the_model_is_untouched():
    model = tiny_vit()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    flags = [block.attn.fused_attn for block in model.blocks]
    state = {name: value.clone() for name, value in model.state_dict().items()}
    method = vizkit.create_method("gradient_weighted_attention")
    zero, two = (method.attribute(model, x, [c], **NORMALIZED) for c in (0, 2))
    assert torch.isfinite(zero).all() and torch.isfinite(two).all() and not torch.allclose(zero, two)
    assert [block.attn.fused_attn for block in model.blocks] == flags and not model.training
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_it_refuses_what_it_cannot_read():
    with pytest.raises(ConfigError, match="gradient_weighted_attention explains vision transformers") as refused:
        vizkit.create_method("gradient_weighted_attention").attribute(vizkit.load_model("embedded"), torch.rand(1, 3, 128, 128), [1])
    assert "\n" not in str(refused.value) and "use gradcam or another method" in str(refused.value)
    by_hand = tiny_vit()
    for block in by_hand.blocks:
        block.attn.fused_attn = False
    with pytest.raises(ConfigError, match="found no scaled_dot_product_attention call") as refused:
        vizkit.create_method("gradient_weighted_attention").attribute(by_hand, torch.randn(1, 3, 8, 8), [1], **NORMALIZED)
    assert "\n" not in str(refused.value)


def test_a_vit_tiny_gives_a_map_of_the_input_size():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    got = vizkit.create_method("gradient_weighted_attention").attribute(model, x)  # each input's predicted class
    assert got.shape == (2, 1, 64, 64) and torch.isfinite(got).all() and (got != 0).any()
