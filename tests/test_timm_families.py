"""The optimization and inspection families on timm's other families: channel targets read in each
layout (ViT tokens, channels-last stages), defaults read from the model, a fixed input size kept,
top_patches cropping a token's own patch, filters showing a ViT's patch embedding."""
from __future__ import annotations

import warnings

import pytest
import torch

import vizkit
from vizkit.core.errors import ConfigError
from vizkit.core.targets import resolve_target
from vizkit.probes import default_layers

MEAN_STD = {"mean": (0.5,) * 3, "std": (0.5,) * 3}


def timm_model(name: str, **kwargs):
    import timm

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.fixture(scope="module")
def vit():
    return timm_model("test_vit", num_classes=5)  # 160 px fixed input, 16 px patches, 1 class token, 64 dims


def state_of(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_untouched(model, state):
    assert not model.training and all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_a_channel_of_a_token_layer_is_its_embedding_dimension_over_the_patch_tokens(vit):
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    tokens = {}
    handle = vit.blocks[2].register_forward_hook(lambda module, inputs, output: tokens.setdefault("out", output.detach()))
    with torch.no_grad():
        vit(x)
    handle.remove()
    patches = tokens["out"][:, 1:, 7]  # the class token (position 0) is not in the image
    with torch.no_grad():
        summed = resolve_target("channel:blocks.2:7", vit, x).score(vit, x)
        neuron = resolve_target("neuron:blocks.2:7:3:4", vit, x).score(vit, x)
    # the same values added in another order: ~sqrt(100) roundings of values of this size
    torch.testing.assert_close(summed, patches.sum(1), rtol=0, atol=10 * 6e-8 * float(patches.abs().sum(1).max()))
    assert torch.equal(neuron, patches.reshape(2, 10, 10)[:, 3, 4])  # row 3, column 4 of the 10x10 patch grid
    with pytest.raises(ConfigError, match="channel 64 is out of range: layer 'blocks.2' has 64 channels"):
        resolve_target("channel:blocks.2:64", vit, x).score(vit, x)


def test_a_channel_of_a_channels_last_model_is_its_last_axis():
    model = timm_model("test_mambaout", num_classes=5)  # output_fmt NHWC: stages are [B, H, W, C]
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    outputs = {}
    hooks = [model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: outputs.setdefault(name, o.detach()))
             for name in ("stages.1", "stem")]
    with torch.no_grad():
        model(x)
        for hook in hooks:
            hook.remove()
        for name in ("stages.1", "stem"):  # a feature_info stage, and a module of an NHWC model
            got = resolve_target(f"channel:{name}:5", model, x).score(model, x)
            torch.testing.assert_close(got, outputs[name][..., 5].sum((1, 2)), rtol=0, atol=1e-5 * float(outputs[name][..., 5].abs().sum()))


def test_defaults_come_from_the_model():
    embedded = vizkit.load_model("embedded")
    probe = torch.rand(1, 3, 128, 128)
    # the embedded model keeps the defaults its tests and documentation were written for
    assert default_layers.first_activation(embedded, probe) == "conv1.2"
    assert default_layers.dream_layer(embedded) == "layer3" and default_layers.content_layer(embedded) == "layer2"
    assert default_layers.style_layers(embedded) == ["act1", "layer1", "layer2", "layer3"]
    assert default_layers.scan_layer(embedded) == "layer3"  # 71 px of 128; layer4's field is 167 px
    vit = timm_model("vit_tiny_patch16_224")
    assert default_layers.first_activation(vit, torch.rand(1, 3, 224, 224)) == "blocks.0.mlp.act"
    assert default_layers.style_layers(vit) == ["blocks.0", "blocks.3", "blocks.7", "blocks.10"]
    assert default_layers.dream_layer(vit) == "blocks.10" and default_layers.scan_layer(vit) == "blocks.11.norm1"
    with pytest.raises(ConfigError, match="none of SwinTransformer's stages has one vizkit can trace"):
        default_layers.scan_layer(timm_model("swin_tiny_patch4_window7_224"))


def test_feature_viz_and_class_model_run_on_a_vit_at_its_fixed_size():
    vit = timm_model("test_vit3", num_classes=5)  # refuses any input but 160 px
    state = state_of(vit)
    method = vizkit.create_method("feature_viz", steps=12, transforms=["jitter:8", "scale:0.9,1.1"])
    result = method.optimize(vit, "channel:blocks.3:5", **MEAN_STD)
    assert result.images.shape == (1, 3, 160, 160)  # the model's own size, though jitter and scale change it each step
    first, last = result.history.first_and_last("objective")
    assert last > first
    grown = vizkit.create_method("class_model", steps=6).optimize(vit, "class:2", **MEAN_STD)
    assert grown.images.shape == (1, 3, 160, 160) and torch.isfinite(grown.images).all()
    assert_untouched(vit, state)


def test_the_image_methods_accept_token_layers_by_default(vit):
    state = state_of(vit)
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))  # not the model's 160: resized for it
    inverted = vizkit.create_method("inversion", steps=2).optimize(vit, images=images, **MEAN_STD)
    assert inverted.names == ["input0@blocks.0.mlp.act", "input1@blocks.0.mlp.act"]
    dreamed = vizkit.create_method("deep_dream", steps=2, octaves=1).optimize(vit, images=images, **MEAN_STD)
    styled = vizkit.create_method("neural_style", steps=2, style=["shapes:train:7"]).optimize(vit, images=images, **MEAN_STD)
    for result in (inverted, dreamed, styled):
        assert result.images.shape == images.shape and torch.isfinite(result.images).all() and result.stopped is None
    assert dreamed.metrics["activation_gain"].min() > 0
    assert_untouched(vit, state)


def test_top_patches_crops_a_tokens_own_patch_and_filters_show_the_patch_embedding(vit):
    images = torch.rand(4, 3, 160, 160, generator=torch.Generator().manual_seed(4))
    inspection = vizkit.create_method("top_patches", k=2, channels=[0, 3]).inspect(vit, images, **MEAN_STD)
    for record in inspection.records:
        for patch in record["patches"]:
            top, left, bottom, right = patch["box"]
            assert (bottom - top, right - left) == (16, 16) and top == 16 * patch["y"] and left == 16 * patch["x"]
    filters = vizkit.create_method("filters", scale=1).inspect(vit)
    assert "filters/patch_embed.proj/rgb|normalize=filter" in filters.tags.values()


@pytest.mark.parametrize("name", ["test_vit", "test_convnext"])
def test_adversarial_methods_move_a_vit_and_a_convnext_within_their_budget(name):
    model = timm_model(name, num_classes=5)
    state = state_of(model)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        clean = model((pixels - 0.5) / 0.5).argmax(1)
    for method, fields, budget in [("fgsm", {"eps": 0.03}, 0.03), ("pgd", {"eps": 0.03, "steps": 3}, 0.03), ("deepfool", {"steps": 5}, None)]:
        x = (pixels - 0.5) / 0.5  # attack takes and gives the model's input space
        adversarial = vizkit.create_method(method, **fields).attack(model, x, clean, **MEAN_STD) * 0.5 + 0.5
        assert adversarial.shape == pixels.shape and torch.isfinite(adversarial).all(), method
        assert not torch.equal(adversarial, pixels), method
        if budget is not None:  # the ball, up to float32 rounding of values ≤ 2 through the normalization
            assert (adversarial - pixels).abs().max() <= budget + 1e-6, method
        assert adversarial.min() >= -1e-6 and adversarial.max() <= 1 + 1e-6
        with torch.no_grad():
            losses = [torch.nn.functional.cross_entropy(model((p - 0.5) / 0.5), clean) for p in (pixels, adversarial)]
        assert losses[1] > losses[0], method  # away from the clean prediction
    assert_untouched(model, state)


def test_a_vit_run_with_metrics_on_its_grad_cam_maps(compose, tmp_path):
    """What builds on the Grad-CAM machinery works on a ViT as on a CNN: a streamed data-set run, the
    maps' metrics, guided Grad-CAM."""
    from vizkit.cli.app import run

    common = ("model.name=test_vit", "model.pretrained=false", "data=shapes", "data.count=2")
    results = run(compose(*common, "method=gradcam", "metrics=[deletion,pointing_game,mask_energy]",
                          "metrics.deletion.steps=4"), tmp_path / "gradcam")
    assert len(results["inputs"]) == 2
    for record in results["inputs"]:
        assert set(record["metrics"]) == {"deletion", "pointing_game", "mask_energy"}
        assert all(0 <= value <= 1 for value in record["metrics"].values())
    guided = run(compose(*common, "method=guided_gradcam"), tmp_path / "guided")
    assert len(guided["inputs"]) == 2 and (tmp_path / "guided" / "results.json").exists()
