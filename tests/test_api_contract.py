"""The Python API's side of the plugin contract, for every registered method (built-ins and the RISE
plugin alike): a model handed over in train mode is used in eval mode and given back as it was
(modes, BatchNorm statistics, weights, hooks), and bad batches, targets and normalizations are
refused with a message that says what would be right."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vizkit
from conftest import model_state
from vizkit.core.errors import ConfigError
from vizkit.methods.base import AdversarialMethod, AttributionMethod, InspectionMethod, OptimizationMethod
from vizkit.methods.registry import discover

QUICK = {  # fields that keep each call short; everything else is the method's default
    "integrated_gradients": {"steps": 4}, "smoothgrad": {"samples": 2}, "rise": {"masks": 16},
    "occlusion": {"window": 32, "stride": 32}, "pgd": {"steps": 2}, "deepfool": {"steps": 2},
    "class_model": {"steps": 2}, "feature_viz": {"steps": 2}, "inversion": {"steps": 2}, "deep_dream": {"steps": 3},
    "neural_style": {"steps": 1}, "fooling_images": {"steps": 2}, "top_patches": {"k": 1},
    "gradient_shap": {"samples": 2}, "smoothgradcam_plus_plus": {"samples": 2},
    "scorecam": {"batch_size": 64}, "ablationcam": {"batch_size": 64},
    "cw": {"steps": 2, "binary_search_steps": 1}, "apgd": {"steps": 2}, "fab": {"steps": 2}, "square": {"queries": 10},
    "autoattack": {"steps": 2, "queries": 10},
}
TARGETS = {"feature_viz": "channel:layer3:5"}


@pytest.fixture(scope="module")
def pixels(embedded_samples):
    return embedded_samples[:2]


def call(method, model, pixels, targets=TARGETS):
    """The method's verb on the model and two sample images; the result as tensors."""
    space = vizkit.core.pixels.PixelSpace.for_model(model)
    if isinstance(method, AttributionMethod):
        return [method.attribute(model, space.from_pixels(pixels))]
    if isinstance(method, AdversarialMethod) and not isinstance(method, OptimizationMethod) and method.name != "fooling_images":
        return [method.attack(model, space.from_pixels(pixels))]
    if isinstance(method, OptimizationMethod) or method.name == "fooling_images":
        target = targets.get(method.name)
        images = pixels if getattr(method, "needs_images", False) else None
        return [method.optimize(model, target, images).images]
    assert isinstance(method, InspectionMethod)
    return [picture.float() if isinstance(picture, torch.Tensor) else torch.as_tensor(picture).float()
            for picture in method.inspect(model, pixels if method.needs_data else None).pictures.values()]


@pytest.fixture(scope="module")
def vit():
    """A two-block ViT at the samples' 128 px (dropout in every block, so train mode would show)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=128, num_classes=6, drop_rate=0.1,
                             attn_drop_rate=0.1, proj_drop_rate=0.1).eval()


@pytest.mark.parametrize("name", sorted(discover()))
def test_a_model_in_train_mode_is_used_in_eval_mode_and_given_back_as_it_was(embedded, vit, pixels, name):
    """On the embedded CNN, or on a ViT for a method that explains transformers only."""
    method = vizkit.create_method(name, **QUICK.get(name, {}))
    try:
        getattr(method, "check", lambda model: None)(embedded)
        given_back(method, embedded, embedded.fc.weight, pixels)
    except ConfigError:
        given_back(method, vit, vit.head.weight, pixels, FAMILY_TARGETS["vit"])


def given_back(method, model, last, pixels, targets=TARGETS):
    """The method in train mode (one weight frozen by the user) computes what it does in eval mode and
    leaves modes, requires_grad, hooks, weights and statistics as they were."""
    expected = call(method, model.eval(), pixels, targets)
    model.train()
    last.requires_grad_(False)
    before = model_state(model)
    weights = {key: value.clone() for key, value in model.state_dict().items()}  # BatchNorm statistics too
    try:
        got = call(method, model, pixels, targets)
        assert model_state(model) == before
        assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())
    finally:
        model.eval()
        last.requires_grad_(True)
    for one, other in zip(got, expected):  # the same computation as in eval mode, not batch statistics
        torch.testing.assert_close(one, other, rtol=0, atol=0)


FAMILY_TARGETS = {"vit": {"feature_viz": "channel:blocks.1:5"}, "convnext": {"feature_viz": "channel:stages.2:5"}}


@pytest.fixture(scope="module")
def convnext():
    """timm's tiny ConvNeXt (GELU, channels-last LayerNorm inside its blocks), stochastic depth on."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_convnext", pretrained=False, num_classes=6, drop_path_rate=0.2).eval()


# methods that refuse a family, after a forward, naming what they have no rule for (LRP: LayerNorm, attention)
REFUSED_FAMILIES = {("lrp", "vit"), ("lrp", "convnext")}


@pytest.mark.parametrize("family", ["vit", "convnext"])
@pytest.mark.parametrize("name", sorted(discover()))
def test_every_method_gives_a_vit_and_a_convnext_back_as_they_were(vit, convnext, pixels, family, name):
    model, last = (vit, vit.head.weight) if family == "vit" else (convnext, convnext.head.fc.weight)
    method = vizkit.create_method(name, **QUICK.get(name, {}))
    try:
        getattr(method, "check", lambda model: None)(model)
    except ConfigError as error:  # a transformer-only method on the ConvNeXt
        assert "\n" not in str(error) and "explains vision transformers" in str(error)
        return
    if (name, family) not in REFUSED_FAMILIES:
        given_back(method, model, last, pixels, FAMILY_TARGETS[family])
        return
    model.train()
    before = model_state(model)
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    try:
        with pytest.raises(ConfigError, match="has no rule for .*layer_norm") as error:
            call(method, model, pixels, FAMILY_TARGETS[family])
        assert "\n" not in str(error.value)
        assert model_state(model) == before
        assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())
    finally:
        model.eval()


@pytest.mark.parametrize("bad, message", [
    (lambda x: (x * 255).to(torch.uint8), r"the input batch is torch.uint8; give floats normalized as the model expects"),
    (lambda x: x.double(), r"the input batch is torch.float64 and the model's weights are torch.float32: use x.to\(torch.float32\)"),
    (lambda x: x[:0], r"the input batch is empty"),
    (lambda x: x[0], r"expected an input batch \[B,C,H,W\], got shape \(3, 128, 128\)"),
    (lambda x: x.index_put((torch.tensor([1]), torch.tensor([0]), torch.tensor([3]), torch.tensor([3])), torch.tensor(float("nan"))),
     r"the input batch holds 1 NaN or infinite value\(s\), in input\(s\) \[1\]"),
    (lambda x: x.numpy(), r"the input batch must be a torch.Tensor \[B,C,H,W\], got ndarray"),
])
@pytest.mark.parametrize("name", ["saliency", "pgd"])
def test_bad_batches_are_refused(embedded, pixels, name, bad, message):
    x = vizkit.core.pixels.PixelSpace.for_model(embedded).from_pixels(pixels)
    method = vizkit.create_method(name, **QUICK.get(name, {}))
    with pytest.raises(ConfigError, match=f"{name}: {message}"):
        (method.attribute if name == "saliency" else method.attack)(embedded, bad(x))


@pytest.mark.parametrize("target, message", [
    (2.7, "a class target must be a whole class index, got 2.7"),
    (True, "a class target must be a class index or name, got the boolean True"),
    ([1, 2.5], "a class target must be a whole class index, got 2.5"),
    (torch.tensor([True, False]), "got the boolean True"),
])
def test_class_targets_must_be_whole_numbers(embedded, pixels, target, message):
    x = vizkit.core.pixels.PixelSpace.for_model(embedded).from_pixels(pixels)
    with pytest.raises(ConfigError, match=message):
        vizkit.create_method("saliency").attribute(embedded, x, target)
    assert vizkit.create_method("saliency").attribute(embedded, x, 2.0).shape == (2, 1, 128, 128)  # a whole float is fine


def test_a_zero_std_is_refused(embedded, pixels):
    with pytest.raises(ConfigError, match="positive standard deviations.*a std of 0 divides by zero"):
        vizkit.create_method("saliency").attribute(embedded, pixels, mean=[0, 0, 0], std=[0, 1, 1])


def test_optimizations_and_inspections_take_pixels_in_the_unit_range(embedded, pixels):
    with pytest.raises(ConfigError, match=r"deep_dream: images are pixels in \[0, 1\]; these range from .* to 255 \(8-bit values\? divide by 255\)"):
        vizkit.create_method("deep_dream", steps=3).optimize(embedded, images=pixels * 255)
    with pytest.raises(ConfigError, match=r"top_patches: images are pixels in \[0, 1\]"):
        vizkit.create_method("top_patches").inspect(embedded, pixels - 0.5)


def plain_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_an_attack_on_a_plain_module_refuses_inputs_that_are_not_pixels():
    """torchvision users pass normalized inputs; taken as pixels and clamped to [0, 1], PGD with
    ε = 2/255 returned images 2.13 away from x."""
    normalized = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ConfigError, match=r"pgd: the model has no data config and no mean/std was given, so x is taken as pixels in \[0, 1\], "
                                          r"but it ranges from .*pass mean=\.\.\. and std=\.\.\."):
        vizkit.create_method("pgd", steps=2).attack(plain_net(), normalized)
    images = (torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) - 0.5) / 0.25  # pixels, normalized by the caller
    adversarial = vizkit.create_method("pgd", eps="2/255", steps=2).attack(plain_net(), images, mean=[0.5] * 3, std=[0.25] * 3)
    assert (adversarial - images).abs().max() <= 2 / 255 / 0.25 + 1e-5


def test_an_attribution_on_a_plain_module_warns_once_about_inputs_that_are_not_pixels(monkeypatch):
    import warnings

    from vizkit.core import validate

    monkeypatch.setattr(validate, "_warned", set())  # once per process: earlier tests may have had theirs
    normalized = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="deconvnet: the model has no data config"):
        vizkit.create_method("deconvnet").attribute(plain_net(), normalized, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vizkit.create_method("deconvnet").attribute(plain_net(), normalized, 0)  # said once is enough


def test_a_channel_of_a_layer_that_runs_twice_is_refused():
    from test_attribution_family import SharedConv  # its conv runs twice per forward

    with pytest.raises(ConfigError, match="layer 'conv' runs 2 times in one forward pass, so its output is ambiguous"):
        vizkit.create_method("saliency").attribute(SharedConv(), torch.rand(2, 3, 8, 8), "channel:conv:1")


def test_too_many_images_at_once_run_in_chunks_or_are_refused_before_the_first_step(monkeypatch):
    """class_model on an ImageNet model defaults to its 1,000 classes in one batch: ~69 GiB through a
    resnet18 at 224 px, once a 3.2 GB allocation that died with a traceback. The free memory is fixed
    at 4 GiB here so the test does not depend on the machine: class_model and fooling_images split the
    classes into chunks of as many as fit; feature_viz, whose diversity term couples its batch, and a
    single ``problem()`` are refused with the numbers."""
    import timm

    from vizkit.core import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 4 * 2**30)
    model = timm.create_model("resnet18", pretrained=False).eval()
    labels = vizkit.core.models.class_names(model)
    for name in ("class_model", "fooling_images"):
        method = vizkit.create_method(name, steps=1)
        chunks = method.problems(model)
        fitting = len(chunks[0].names)
        assert 1 < fitting < 1000 and all(len(chunk.names) <= fitting for chunk in chunks)
        assert [name for chunk in chunks for name in chunk.names] == [vizkit.core.models.class_label(labels, i) for i in range(1000)]
        with pytest.raises(ConfigError, match=rf"{name} would optimize 1000 images together, about \d+\.\d GiB \(\d+ MiB each\) "
                                              rf"with 4\.0 GiB free on cpu: about {fitting} fit; choose fewer"):
            method.problem(model)
    with pytest.raises(ConfigError, match=r"feature_viz would optimize 400 images together.*and feature_viz's images are optimized together"):
        vizkit.create_method("feature_viz", batch=400, steps=1).problems(model, "channel:layer3:5")


def test_chunks_give_the_images_one_batch_gives(embedded, pixels):
    """Each image's loss is its own (Adam per element): chunks of 4 give class_model's 6 images bit for
    bit; inversion's results keep their inputs' numbers across chunks."""
    whole = vizkit.create_method("class_model", steps=5).optimize(embedded)
    chunked = vizkit.create_method("class_model", steps=5, chunk_size=4).optimize(embedded)
    assert chunked.names == whole.names and torch.equal(chunked.images, whole.images)
    torch.testing.assert_close(torch.tensor(chunked.history.losses["total"]), torch.tensor(whole.history.losses["total"]), rtol=1e-5, atol=0)
    inversion = vizkit.create_method("inversion", layers=["conv1.2", "layer1"], steps=1, chunk_size=2)
    assert [problem.names for problem in inversion.problems(embedded, images=torch.cat([pixels, pixels[:1]]))] == [
        ["input0@conv1.2", "input0@layer1"], ["input1@conv1.2", "input1@layer1"], ["input2@conv1.2", "input2@layer1"]]
    with pytest.raises(ConfigError, match="chunk_size must be a whole number >= 0"):
        vizkit.create_method("class_model", chunk_size=-1)


def test_a_run_in_chunks_says_so_and_writes_every_image(vizkit_cli):
    run = vizkit_cli("method=class_model", "method.steps=3", "method.chunk_size=4", "image_checkpoint=true", "trainer.progress_bar=false")
    assert run.returncode == 0, run.stderr
    assert "class_model: optimizing 6 image(s) in 2 chunks of up to 4" in run.stdout + run.stderr
    results = run.results
    assert results["chunks"] == 2 and [image["name"] for image in results["images"]] == ["circle", "square", "triangle", "star", "cross", "hexagon"]
    assert sorted(p.name for p in (run.run_dir / "checkpoints").iterdir()) == ["image-0.ckpt", "image-1.ckpt"]
    assert (run.run_dir / "images" / "grid.png").is_file() and results["history"]["steps"] == [1, 2, 3]
