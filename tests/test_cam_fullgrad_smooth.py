"""FullGrad and Smooth Grad-CAM++ (``vizkit/methods/attribution/fullgrad.py``, ``smoothgradcam_plus_plus.py``)
on random-weight timm models (BatchNorm gammas redrawn, ``tiny_models.reinit_batchnorm``): resnet18 and
VGG-11-BN at 64 px, two images with different class targets.

* FullGrad against pytorch-grad-cam 1.5.7's ``FullGrad`` (its own choice of layers: vizkit's default),
  after pytorch-grad-cam's final per-image min-max scaling (``min_max``): within 1e-5 of the [0, 1]
  scale or the float32 bound of summing the per-channel maps (``fullgrad_tolerance``), at 1 and 2
  threads; the authors' per-layer rescaling and ``eps=0`` give other maps (the comparison has teeth).
  Its pieces are complete: the input's and the biases' gradient terms, plus the classifier's own bias
  (a Linear, not among the bias layers), sum to the logit. ViT tokens and an NHWC Linear are read as
  the hand-made reshapes read them.
* Smooth Grad-CAM++ against torchcam 0.5.0's ``SmoothGradCAMpp`` on the same noise (for one input,
  ``torch.manual_seed(seed)`` before torchcam draws what vizkit's generator draws: the noisy inputs are
  checked bit for bit): torchcam's map is its documented formula evaluated on vizkit's own averaged
  gradient powers and the last noisy copy's capture; where the gradient is constant over positions and
  there is no noise, the two definitions meet and the maps are equal; elsewhere they differ. One
  noiseless sample is Grad-CAM++ exactly (so pytorch-grad-cam's ``GradCAMPlusPlus``, see
  tests/test_cam_gradient.py). The noise is the method's own: the global RNG is untouched and the maps
  do not depend on ``batch_size`` or on which inputs share a batch.
* Both: ``vizkit.create_method(NAME).attribute(model, x, targets)`` with the defaults; the model left
  as it was (hooks, modes, flags, gradients, statistics), also when a call raises midway; bad fields
  and layers refused in one line.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vizkit
from tiny_models import (differential_model, assert_maps_close, assert_untouched, normalized_batch, rounding,
                         single_thread, state)
from vizkit.core.errors import ConfigError
from vizkit.core.targets import resolve_target
from vizkit.methods.attribution.cam import layers_activations_and_gradients
from vizkit.methods.attribution.fullgrad import default_bias_layers, layer_bias, rescale

pgc = pytest.importorskip("pytorch_grad_cam")

U = 2.0**-24  # float32's unit roundoff
SIZE = 64
# model -> two layers for Smooth Grad-CAM++ (an inner one where the gradient varies over positions, the
# last feature stage, where resnet18's gradient is the same everywhere: a global pool and a linear head
# follow it), targets
CASES = {
    "resnet18": (("layer3", "layer4"), [3, 7]),
    "vgg11_bn": (("features.20", "features.28"), [2, 5]),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """The numerically sensitive comparisons at one and two intra-op threads (torch's reductions split
    their work by thread, so the rounding differs)."""
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(1)


cached_model = differential_model  # built once, shared by the tests: never modified


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(model, input, layers, targets, the copy the peers run on)."""
    model = cached_model(request.param)
    layers, targets = CASES[request.param]
    return model, normalized_batch(model, len(targets), SIZE, seed=5), layers, targets, copy.deepcopy(model)


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] (the map must not be constant)."""
    flat = maps.flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    assert (high - low).min() > 0, "a constant map: min-max scaling is undefined"
    return ((flat - low) / (high - low)).view_as(maps)


# ---------------------------------------------------------------- FullGrad


def pgc_fullgrad(clone, x, targets) -> torch.Tensor:
    """pytorch-grad-cam's ``FullGrad`` on ``clone`` (a copy: it calls ``backward()``), hooks released."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = pgc.FullGrad(clone, target_layers=[])
    try:
        maps = cam(x.clone(), targets=[ClassifierOutputTarget(c) for c in targets])
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(maps).unsqueeze(1)


def fullgrad_tolerance(model, x, targets, maps: torch.Tensor) -> float:
    """1e-5 of the [0, 1] scale, or the float32 bound where larger.

    Both libraries compute the same per-channel maps from the same floats (the gradients, effective
    biases, products, minima, maxima and divisions are the same operations); what differs is the order of
    the sums (pytorch-grad-cam upsamples every channel and sums them in numpy, one after another, then
    the layers; vizkit sums a layer's channels, upsamples once, then sums the layers) and cv2's rounding
    against torch's in the bilinear resize (one or two ulps of each value). The maps are in [0, 1] and
    non-negative, so a float32 sum of n of them is within ~ sqrt(n) * u * its value (Higham & Mary's
    probabilistic bound, rounding errors of random sign): a layer's channel sum within sqrt(K) * u * S_l
    (K: the most channels a layer with more than one position has; a 1x1 layer's maps are exactly 0),
    all of them within sqrt(K) * u * M (M: the map's largest value), and the sum of the L + 1 layer maps
    within sqrt(L + 1) * u * M. The final min-max scaling by the map's range R doubles an error over R:
    2 * (sqrt(K) + sqrt(L + 1)) * u * kappa, kappa = M / R. Here K = 512, L = 20 (resnet18's batch
    norms) or 18 (VGG's convolutions and batch norms; its two 1x1 head convolutions add zeros) and kappa
    <= 6, so up to 2e-5."""
    layers = default_bias_layers(model)
    activations, _, _ = layers_activations_and_gradients(model, x, resolve_target(targets, model, x), layers, "test", gradient=False)
    channels = max([a.shape[1] for a in activations if a is not None and a.shape[-2:].numel() > 1], default=1)
    flat = maps.flatten(1)
    kappa = float((flat.amax(1) / (flat.amax(1) - flat.amin(1))).max())
    return max(1e-5, 2 * (channels**0.5 + (len(layers) + 1) ** 0.5) * U * kappa)


def test_fullgrad_equals_pytorch_grad_cam(case, threads):
    """Measured: max |difference| <= 2.8e-6 (resnet18) and 1.1e-6 (VGG) of the [0, 1] scale, 1 and 2
    threads; the tolerance is 1.8e-5 (resnet18, kappa 5.6) and 1e-5 (VGG)."""
    model, x, _, targets, clone = case
    got = vizkit.create_method("fullgrad").attribute(model, x, targets)
    assert got.shape == (2, 1, SIZE, SIZE) and got.min() >= 0
    assert_maps_close(min_max(got), pgc_fullgrad(clone, x, targets), rel=fullgrad_tolerance(model, x, targets, got))


def authors_fullgrad(model, x, targets) -> torch.Tensor:
    """The authors' code's post-processing (idiap/fullgrad-saliency ``_postProcess``): each layer's
    |b G| rescaled as one map over all its channels (eps 1e-6), upsampled with align_corners=True."""
    layers = default_bias_layers(model)
    _, gradients, input_gradient = layers_activations_and_gradients(model, x, resolve_target(targets, model, x), layers, "test",
                                                                    input_gradient=True)

    def post_process(terms):
        flat = terms.abs().flatten(1)
        flat = flat - flat.amin(1, keepdim=True)
        return (flat / (flat.amax(1, keepdim=True) + 1e-6)).view_as(terms)

    total = post_process(input_gradient * x).sum(1, keepdim=True)
    for layer, gradient in zip(layers, gradients):
        term = post_process(layer_bias(model.get_submodule(layer), layer).view(1, -1, 1, 1) * gradient)
        total = total + F.interpolate(term.sum(1, keepdim=True), size=x.shape[-2:], mode="bilinear", align_corners=True)  # linear: sum first
    return total


def test_fullgrad_the_comparison_tells_the_definitions_apart(case):
    """The authors' per-layer rescaling and the paper's eps=0 give maps that differ from the default's (so
    from pytorch-grad-cam's, which is within the tolerance of it) by more than three times the tolerance
    above (measured against pytorch-grad-cam: 0.20-0.24 and 0.9e-4-1.3e-4 of the [0, 1] scale)."""
    model, x, _, targets, _ = case
    default = vizkit.create_method("fullgrad").attribute(model, x, targets)
    tolerance = fullgrad_tolerance(model, x, targets, default)
    for other in (authors_fullgrad(model, x, targets), vizkit.create_method("fullgrad", eps=0.0).attribute(model, x, targets)):
        assert (min_max(other) - min_max(default)).abs().max() > 3 * tolerance


def test_fullgrad_pieces_sum_to_the_logit(case):
    """FullGrad's completeness on a ReLU network in eval mode: S(x) = g . x + sum_l b_l . sum_ij G_l + the
    classifier's bias, with the batch norms' effective biases, so the default layers and their biases
    miss nothing but the head's Linear (whose term has no positions). Tolerance: the forward's float32
    error relative to the magnitudes it sums (``tiny_models.rounding`` up to the classifier: 4.3e-5
    resnet18, 3.6e-5 VGG), as much again for the backward, times sum |terms|; measured <= 8.3e-7 of it."""
    model, x, _, targets, _ = case
    layers = default_bias_layers(model)
    target = resolve_target(targets, model, x)
    _, gradients, input_gradient = layers_activations_and_gradients(model, x, target, layers, "test", input_gradient=True)
    terms = [(input_gradient * x).flatten(1).sum(1)]
    terms += [(layer_bias(model.get_submodule(layer), layer).view(1, -1, 1, 1) * gradient).flatten(1).sum(1)
              for layer, gradient in zip(layers, gradients)]
    terms.append(model.get_classifier().bias.detach()[torch.tensor(targets)])
    with torch.no_grad():
        score = target.score(model, x)
    magnitude = torch.stack(terms).abs().sum(0)
    classifier = next(name for name, module in model.named_modules() if module is model.get_classifier())
    torch.testing.assert_close(torch.stack(terms).sum(0), score, rtol=0, atol=2 * rounding(model, classifier) * float(magnitude.max()))


def test_a_batch_norms_bias_is_its_effective_one():
    """In eval mode a batch norm is (gamma / sqrt(var + eps)) z + b, b = beta - mean gamma / sqrt(var + eps)."""
    norm = cached_model("resnet18").layer3[0].bn1
    z = torch.randn(2, norm.num_features, 3, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        linear = z * (norm.weight / torch.sqrt(norm.running_var + norm.eps)).view(1, -1, 1, 1)
        torch.testing.assert_close(norm(z), linear + layer_bias(norm, "bn1").view(1, -1, 1, 1))


def test_fullgrad_layers_add_their_terms():
    """FullGrad(L) = input term + sum over L of each layer's term, so the difference of two lists that
    share one layer's term is that term, and the default list written out is the default."""
    model = cached_model("resnet18")
    x = normalized_batch(model, 2, SIZE, seed=5)

    def fullgrad(*layers):
        return vizkit.create_method("fullgrad", layers=list(layers)).attribute(model, x, [3, 7])

    maps = [fullgrad("layer1.0.bn1", "layer3.1.bn2"), fullgrad("layer1.0.bn1"), fullgrad("layer3.1.bn2", "layer4.0.bn1"), fullgrad("layer4.0.bn1")]
    first, second = maps[0] - maps[1], maps[2] - maps[3]
    # each map adds two or three upsampled layer maps, each addition rounding by <= u * M (M: the largest
    # value), and the two differences subtract four such maps
    torch.testing.assert_close(first, second, rtol=0, atol=8 * U * float(torch.stack(maps).max()))
    assert first.max() > 0.1  # a term of 512 channels in [0, 1]
    assert torch.equal(fullgrad(*default_bias_layers(model)), vizkit.create_method("fullgrad").attribute(model, x, [3, 7]))


def test_fullgrad_on_a_channel_target_drops_the_layers_after_it():
    """A channel target stops the forward at its layer: the default bias layers after it never run (their
    bias does not reach the score) and contribute nothing."""
    model = cached_model("resnet18")
    x = normalized_batch(model, 2, SIZE, seed=5)
    got = vizkit.create_method("fullgrad").attribute(model, x, "channel:layer2:5")
    before = [layer for layer in default_bias_layers(model) if layer.startswith(("bn1", "layer1", "layer2"))]
    assert torch.equal(got, vizkit.create_method("fullgrad", layers=before).attribute(model, x, "channel:layer2:5"))
    with pytest.raises(ConfigError, match="layer 'layer3.0.bn1' runs never"):
        vizkit.create_method("fullgrad", layers=[*before, "layer3.0.bn1"]).attribute(model, x, "channel:layer2:5")


def vit_tokens(tensor, model, size):
    """pytorch-grad-cam's ViT ``reshape_transform``: the class token dropped, the rest on the patch grid."""
    side = size // 16
    return tensor[:, model.num_prefix_tokens:].reshape(tensor.shape[0], side, side, tensor.shape[-1]).permute(0, 3, 1, 2)


@pytest.mark.parametrize(("name", "layer", "reshape"), [
    ("test_vit", "blocks.0.mlp.fc2", lambda t, model, size: vit_tokens(t, model, size)),
    ("test_convnext", "stages.0.blocks.0.mlp.fc1", lambda t, model, size: t.permute(0, 3, 1, 2)),  # NHWC inside an NCHW model
], ids=["tokens", "nhwc"])
def test_fullgrad_reads_each_layout_as_its_reshape(name, layer, reshape):
    """A Linear's term over a ViT's patch tokens and inside a ConvNeXt block (channels last, told apart by
    its bias's channel count) is the term of the hand-made reshape of its gradient. timm initializes
    Linear biases to 0 and ConvNeXt's layer scale to 1e-6, so the copy gets random biases and a unit scale."""
    model = copy.deepcopy(cached_model(name)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            if isinstance(getattr(module, "gamma", None), nn.Parameter):
                module.gamma.fill_(1.0)
    size = 64
    x = normalized_batch(model, 2, size, seed=5)
    first = default_bias_layers(model)[0]  # the patch embedding's / stem's convolution
    got = vizkit.create_method("fullgrad", layers=[first, layer]).attribute(model, x, [3, 5])
    got = got - vizkit.create_method("fullgrad", layers=[first]).attribute(model, x, [3, 5])
    _, (gradient,), _ = layers_activations_and_gradients(model, x, resolve_target([3, 5], model, x), [layer], "test")
    term = rescale((layer_bias(model.get_submodule(layer), layer).view(1, -1, 1, 1) * reshape(gradient, model, size)).abs(), 1e-7)
    expected = F.interpolate(term.sum(1, keepdim=True), size=(size, size), mode="bilinear", align_corners=False)
    assert_maps_close(got, expected, rel=1e-5)


def test_fullgrad_on_a_vit_equals_pytorch_grad_cam():
    """The default on a ViT is its patch embedding's convolution (NCHW): measured <= 7.7e-7 of the scale."""
    model = cached_model("test_vit").eval()
    x = normalized_batch(model, 2, 64, seed=5)
    got = vizkit.create_method("fullgrad").attribute(model, x, [3, 5])
    assert default_bias_layers(model) == ["patch_embed.proj"]
    assert_maps_close(min_max(got), pgc_fullgrad(copy.deepcopy(model), x, [3, 5]), rel=fullgrad_tolerance(model, x, [3, 5], got))


# ---------------------------------------------------------------- Smooth Grad-CAM++


def torchcam_map(clone, x_one, layer: str, target: int, seed: int, samples: int, std: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """torchcam's ``SmoothGradCAMpp`` map for one input, unnormalized, at the layer's resolution, after
    ``torch.manual_seed(seed)`` (restored after), and the inputs its model saw (the clean one first)."""
    from torchcam.methods import SmoothGradCAMpp

    seen = []
    handle = clone.register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0].detach().clone()))
    state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        with SmoothGradCAMpp(clone, layer, num_samples=samples, std=std, input_shape=tuple(x_one.shape[1:])) as extractor:
            clone(x_one)
            (cam,) = extractor(class_idx=[target], normalized=False)
    finally:
        handle.remove()
        torch.set_rng_state(state)
    return cam, seen


@pytest.mark.parametrize("which", [0, 1], ids=["inner", "last"])
def test_smoothgradcam_plus_plus_is_torchcams_formula_on_the_same_noise(case, which):
    """torchcam's map is ReLU(sum_k w_k A_n,k), w_k = sum_ij D2 / (2 D2 + sum_ab D3 A + 1e-8) ReLU(g_n), with
    D2, D3 vizkit's averaged gradient powers (its ``capture``), A the clean activation, and A_n, g_n the
    last noisy copy's activation and gradient: the module docstring's relation. ``batch_size=1``, so every
    pass sees one input as torchcam's do and the gradients are the same floats. The noisy inputs are
    torchcam's bit for bit. Tolerance: the order of the channel sum, 2 sqrt(K) u sum_k |w_k A_n,k| (as
    tests/test_cam_gradient.py's); measured 0 at 1 and 2 threads (the same operations on the same floats,
    so one thread count is run here)."""
    model, x, layers, targets, clone = case
    layer, seed, samples, std = layers[which], 11, 4, 0.3
    method = vizkit.create_method("smoothgradcam_plus_plus", layer=layer, seed=seed, samples=samples, noise_std=std, batch_size=1)
    generator = torch.Generator().manual_seed(seed)
    noise = [torch.randn((1, *x.shape[1:]), generator=generator) for _ in range(samples)]
    for row, target in enumerate(targets):
        x_one, resolved = x[row:row + 1], resolve_target([target], model, x[row:row + 1])
        expected, seen = torchcam_map(clone, x_one, layer, target, seed, samples, std)
        assert all(torch.equal(seen[m + 1], x_one + std * noise[m]) for m in range(samples))
        ours = method.capture(model, x_one, resolved, layer)
        last = vizkit.create_method("gradcam", layer=layer).capture(model, x_one + std * noise[-1], resolved, layer)
        spread = (ours.gradient_3 * ours.activation).flatten(2).sum(-1)[..., None, None]  # sum_ab D3 A
        alpha = ours.gradient_2 / (2 * ours.gradient_2 + spread + 1e-8)
        weights = (alpha * last.gradient.clamp_min(0)).flatten(2).sum(-1)[..., None, None]
        terms = weights * last.activation
        bound = 2 * terms.shape[1] ** 0.5 * U * float(terms.abs().sum(1).max())
        torch.testing.assert_close(torch.nansum(terms, dim=1).clamp_min(0), expected, rtol=0, atol=bound)


def test_smoothgradcam_plus_plus_meets_torchcam_where_the_definitions_agree():
    """No noise and resnet18's layer4, whose gradient is the same at every position (a global pool and a
    linear head follow it): torchcam's sum_ab D3 A is vizkit's (sum_ab A) D3 there, and its last copy is
    the clean input, so with torchcam's eps (1e-8) the maps are equal (measured: <= 8.3e-7 of the [0, 1]
    scale; 1e-5 asserted). At layer3, where the gradient varies, the definitions differ (measured: 0.44
    and 0.52 of it)."""
    model = cached_model("resnet18")
    x = normalized_batch(model, 2, SIZE, seed=5)
    clone = copy.deepcopy(model)
    for layer, equal in (("layer4", True), ("layer3", False)):
        method = vizkit.create_method("smoothgradcam_plus_plus", layer=layer, noise_std=0.0, eps=1e-8)
        for row, target in enumerate([3, 7]):
            x_one = x[row:row + 1]
            inputs = method.capture(model, x_one, resolve_target([target], model, x_one), layer)
            ours = min_max(method.combine(inputs).clamp_min(0))[0]
            # torchcam's Normal refuses a zero std; 1e-20 of a standard normal leaves every input value as it is
            theirs, seen = torchcam_map(clone, x_one, layer, target, 0, 4, 1e-20)
            assert all(torch.equal(noisy, x_one) for noisy in seen)
            theirs = min_max(theirs[None])[0]
            if equal:
                assert_maps_close(ours, theirs, rel=1e-5)
            else:
                assert (ours - theirs).abs().max() > 0.05


def test_one_noiseless_sample_is_gradcam_plus_plus(case):
    """Bit for bit, at both layers: D1 = g, D2 = g^2, D3 = g^3 and A the same activation."""
    model, x, layers, targets, _ = case
    for layer in layers:
        smooth = vizkit.create_method("smoothgradcam_plus_plus", layer=layer, samples=1, noise_std=0.0)
        assert torch.equal(smooth.attribute(model, x, targets), vizkit.create_method("gradcam_plus_plus", layer=layer).attribute(model, x, targets))


@pytest.mark.parametrize(("name", "layer"), [("test_vit", "blocks.1.norm1"), ("test_mambaout", "stages.3")], ids=["tokens", "nhwc"])
def test_smoothgradcam_plus_plus_reads_each_layout(name, layer):
    """One noiseless sample is Grad-CAM++ on a ViT's tokens and an NHWC stage too (Grad-CAM++ there is
    compared with pytorch-grad-cam in tests/test_cam_gradient.py); with noise the map is finite and not 0."""
    model = cached_model(name).eval()
    x = normalized_batch(model, 2, 64, seed=5)
    smooth = vizkit.create_method("smoothgradcam_plus_plus", layer=layer, samples=1, noise_std=0.0)
    assert torch.equal(smooth.attribute(model, x, [3, 5]), vizkit.create_method("gradcam_plus_plus", layer=layer).attribute(model, x, [3, 5]))
    noisy = vizkit.create_method("smoothgradcam_plus_plus", layer=layer, relu=False).attribute(model, x, [3, 5])
    assert torch.isfinite(noisy).all() and noisy.abs().max() > 0


def test_smoothgradcam_plus_plus_does_not_depend_on_batch_size_or_company():
    """Each input's map is the same alone or beside another, at any batch_size: only the grouping of rows
    into passes changes, which moves the gradients by the convolutions' rounding (measured: batch_size 3
    and 8 equal to 1 bit for bit, alone against beside another <= 5.7e-7 of the map's scale); 1e-5 of it
    asserted, as for Score-CAM's batch_size (tests/test_cam_forward.py)."""
    model = cached_model("resnet18")
    x = normalized_batch(model, 2, SIZE, seed=5)
    reference = vizkit.create_method("smoothgradcam_plus_plus", layer="layer3", batch_size=1).attribute(model, x, [3, 7])
    for batch_size in (3, 8):
        got = vizkit.create_method("smoothgradcam_plus_plus", layer="layer3", batch_size=batch_size).attribute(model, x, [3, 7])
        assert_maps_close(got, reference, rel=1e-5)
    alone = vizkit.create_method("smoothgradcam_plus_plus", layer="layer3").attribute(model, x[1:], [7])
    assert_maps_close(alone, reference[1:], rel=1e-5)


def test_smoothgradcam_plus_plus_noise_is_its_own():
    """The global RNG is neither read nor advanced; the seed field picks the noise."""
    model = cached_model("resnet18")
    x = normalized_batch(model, 2, SIZE, seed=5)
    method = vizkit.create_method("smoothgradcam_plus_plus", layer="layer3")
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = method.attribute(model, x, [3, 7])
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    assert torch.equal(method.attribute(model, x, [3, 7]), first)
    other = vizkit.create_method("smoothgradcam_plus_plus", layer="layer3", seed=1).attribute(model, x, [3, 7])
    assert (min_max(other) - min_max(first)).abs().max() > 1e-3


# ---------------------------------------------------------------- both: the API, fields, the model left as it was

METHODS = ("fullgrad", "smoothgradcam_plus_plus")


@pytest.mark.parametrize("name", METHODS)
def test_create_method_attribute_with_the_defaults(name):
    model = cached_model("resnet18")
    x = normalized_batch(model, 2, SIZE, seed=5)
    maps = vizkit.create_method(name).attribute(model, x, [3, 7])
    assert maps.shape == (2, 1, SIZE, SIZE) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps.flatten(1).amax(1) > 0).all()
    predicted = vizkit.create_method(name).attribute(model, x)  # each input's predicted class
    assert predicted.shape == maps.shape and torch.isfinite(predicted).all()


@pytest.mark.parametrize(("name", "fields", "message"), [
    ("fullgrad", {"layers": "layer3.0.bn1"}, "layers is a list of layer names"),
    ("fullgrad", {"layers": ["layer3.0.bn1", "layer3.0.bn1"]}, "distinct layers"),
    ("fullgrad", {"layout": "hwc"}, "layout must be one of"),
    ("fullgrad", {"eps": -1e-7}, "eps must be a number >= 0"),
    ("smoothgradcam_plus_plus", {"samples": 0}, "samples must be a positive integer"),
    ("smoothgradcam_plus_plus", {"batch_size": 2.5}, "batch_size must be a positive integer"),
    ("smoothgradcam_plus_plus", {"noise_std": -0.1}, "noise_std must be a number >= 0"),
    ("smoothgradcam_plus_plus", {"noise_std": float("nan")}, "noise_std must be a number >= 0"),
    ("smoothgradcam_plus_plus", {"seed": "one"}, "seed must be an integer"),
    ("smoothgradcam_plus_plus", {"eps": -1.0}, "eps must be a number >= 0"),
])
def test_bad_fields_are_one_line(name, fields, message):
    with pytest.raises(ConfigError, match=message) as error:
        vizkit.create_method(name, **fields)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("layer", "message"), [
    ("layer4", "layer 'layer4' is a Sequential; a bias layer is a Conv2d, BatchNorm2d, Linear, LayerNorm or GroupNorm"),
    ("layer4.0.conv1", "layer 'layer4.0.conv1' \\(Conv2d\\) has no bias per channel"),
    ("layer9", "layer 'layer9' not found"),
])
def test_fullgrad_refuses_a_layer_without_a_bias_before_any_work(layer, message):
    model = cached_model("resnet18")
    method = vizkit.create_method("fullgrad", layers=["layer3.0.bn1", layer])
    with pytest.raises(ConfigError, match=message) as error:
        method.check(model)
    assert "\n" not in str(error.value)


class Spare(nn.Module):
    """resnet18 with a layer its forward never calls, whose ``fail_at``-th forward raises (a failure
    midway: after earlier passes ran), or whose backward raises on reaching the input (``fail_backward``)."""

    def __init__(self, model):
        super().__init__()
        self.net = model
        self.spare = nn.Conv2d(512, 512, 1)
        self.calls, self.fail_at, self.fail_backward = 0, 0, False

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("a forward failed midway")
        return self.net(FailInBackward.apply(x) if self.fail_backward else x)


class FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("a backward failed midway")


@pytest.fixture
def spare_model():
    model = Spare(copy.deepcopy(cached_model("resnet18")))
    model.pretrained_cfg = model.net.pretrained_cfg
    model.net.conv1.weight.requires_grad_(False)  # a frozen layer stays frozen, the rest trainable
    return model.train()  # modes are restored, and BatchNorm's statistics are not touched


@pytest.mark.parametrize(("name", "fields"), [("fullgrad", {}), ("fullgrad", {"layers": ["net.layer3.0.bn1", "net.layer4.1.bn2"]}),
                                              ("smoothgradcam_plus_plus", {"layer": "net.layer3"})],
                         ids=["fullgrad", "fullgrad-layers", "smoothgradcam_plus_plus"])
def test_each_method_leaves_the_model_untouched(spare_model, name, fields):
    """FullGrad's default layers include ``spare``, which never runs: it is left out, not refused."""
    before = state(spare_model)
    x = normalized_batch(spare_model, 2, SIZE, seed=5)
    maps = vizkit.create_method(name, **fields).attribute(spare_model, x, [3, 7])
    assert maps.shape == (2, 1, SIZE, SIZE) and torch.isfinite(maps).all() and maps.max() > 0
    assert not x.requires_grad and x.grad is None
    assert_untouched(spare_model, before)


@pytest.mark.parametrize(("name", "fields", "failure", "message"), [
    ("fullgrad", {"layers": ["net.layer3.0.bn1", "spare"]}, None, "layer 'spare' runs never"),  # after the forward
    ("fullgrad", {"layers": ["net.layer3.0.bn1"], "layout": "nhwc"}, None, "adds a bias of 256 channels"),  # after the backward
    ("fullgrad", {}, "backward", "a backward failed midway"),
    ("smoothgradcam_plus_plus", {"layer": "spare"}, None, "layer 'spare' runs never"),
    ("smoothgradcam_plus_plus", {"layer": "net.layer3", "batch_size": 1}, 3, "a forward failed midway"),  # after a noisy pass
], ids=["fullgrad-never-runs", "fullgrad-layout", "fullgrad-backward", "smooth-never-runs", "smooth-third-forward"])
def test_a_call_that_raises_midway_leaves_the_model_untouched(spare_model, name, fields, failure, message):
    before = state(spare_model)
    x = normalized_batch(spare_model, 2, SIZE, seed=5)
    spare_model.fail_backward = failure == "backward"
    spare_model.fail_at = failure if isinstance(failure, int) else 0
    with pytest.raises((ConfigError, RuntimeError), match=message) as error:
        vizkit.create_method(name, **fields).attribute(spare_model, x, [3, 7])
    assert "\n" not in str(error.value)
    assert_untouched(spare_model, before)
