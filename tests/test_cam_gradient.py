"""Grad-CAM++, XGrad-CAM, HiResCAM, Layer-CAM and Eigen-CAM against pytorch-grad-cam 1.5.7's classes of
the same name, on a random-weight timm resnet18 (64 px) and VGG-11-BN (96 px), each at two layers, two
images with different classes (``ClassifierOutputTarget``); Layer-CAM with two layers; both layouts the
base reads (a ViT's tokens, a channels-last stage); and the model left as it was, also when a method
raises midway.

How the maps compare. pytorch-grad-cam returns, per layer, minmax(resize(minmax(relu(cam)))) and for
several layers minmax(mean over layers of that): it min-max scales the layer's map (with a 1e-7 in the
denominator), resizes with cv2 (bilinear with half-pixel centres: torch's ``align_corners=False``,
checked below to rounding), then scales the mean once more. A bilinear resize is linear with weights
summing to 1, so it commutes with a positive affine map and the final scaling undoes the first: one
layer's result is minmax(vizkit's map), up to the relative 1e-7 / range. vizkit's multi-layer Layer-CAM
is the mean before that final scaling (its docstring), so the same holds for it. Maps are compared after
``min_max`` within 1e-5 of their [0, 1] scale (``assert_maps_close``), or the float32 bound of
``tolerance`` where that is larger; the measured differences are in each test's docstring.

Eigen-CAM's sign: pytorch-grad-cam keeps the one its SVD returns, vizkit fixes one (see
``vizkit.methods.attribution.eigencam``), so each image's map is compared with pytorch-grad-cam's for
the sign pytorch-grad-cam's projection has.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vizkit
from tiny_models import assert_maps_close, assert_untouched, differential_model, normalized_batch, single_thread, state
from vizkit.core.errors import ConfigError
from vizkit.core.models import find_layer
from vizkit.core.targets import resolve_target
from vizkit.methods.attribution.eigencam import first_component

pgc = pytest.importorskip("pytorch_grad_cam")

U = 2.0**-24  # float32's unit roundoff

PEERS = {  # vizkit's name -> pytorch-grad-cam's class
    "gradcam_plus_plus": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
}
GRADIENT_CAMS = [name for name in PEERS if name != "eigencam"]
# model -> input size, the two layers (the second the default: the last feature stage), targets. resnet18's
# layer4 (2x2) feeds a global average pool and a linear head, so its gradient is the same at every position
# and Grad-CAM, XGrad-CAM and HiResCAM coincide there; layer3 (4x4) and VGG's layers (12x12 and 3x3, whose
# head pools 3x3 up to 7x7 and convolves) tell them apart.
CASES = {
    "resnet18": (64, ("layer3", "layer4"), [3, 7]),
    "vgg11_bn": (96, ("features.20", "features.28"), [2, 5]),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


cached_model = differential_model  # built once, shared by the tests: never modified


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(model, input, layers, targets, the copy pytorch-grad-cam runs on)."""
    model = cached_model(request.param)
    size, layers, targets = CASES[request.param]
    return model, normalized_batch(model, len(targets), size, seed=5), layers, targets, copy.deepcopy(model)


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] (the map must not be constant)."""
    flat = maps.flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    assert (high - low).min() > 0, "a constant map: min-max scaling is undefined"
    return ((flat - low) / (high - low)).view_as(maps)


def peer(method: str, clone, layers, x, targets, reshape_transform=None):
    """pytorch-grad-cam's class for ``method`` on ``layers`` of ``clone`` (a copy: it calls ``backward()``,
    filling parameter ``.grad``): its maps ``[B,1,H,W]`` and the activations it stored. Its hooks are
    released explicitly (its ``__exit__`` swallows IndexError). As tests/test_differential_attribution.py's
    ``pytorch_grad_cam`` helper, for any class and several layers."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = getattr(pgc, PEERS[method])(clone, target_layers=[find_layer(clone, layer) for layer in layers],
                                      reshape_transform=reshape_transform)
    try:
        maps = cam(x.clone(), targets=[ClassifierOutputTarget(c) for c in targets])
        stored = [activation.clone() for activation in cam.activations_and_grads.activations]
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(maps).unsqueeze(1), stored


def test_cv2_resize_is_torch_bilinear_with_half_pixel_centres():
    """What the comparisons assume: pytorch-grad-cam's ``cv2.resize`` (INTER_LINEAR) of a float32 map is
    ``F.interpolate(..., "bilinear", align_corners=False)`` up to rounding, at this file's ratios and an
    uneven one (measured <= 1.8e-7 on [0, 1) maps: one or two float32 ulps)."""
    cv2 = pytest.importorskip("cv2")
    generator = torch.Generator().manual_seed(0)
    for low, high in [((2, 2), (64, 64)), ((4, 4), (64, 64)), ((3, 3), (96, 96)), ((12, 12), (96, 96)), ((5, 3), (37, 50))]:
        cam = torch.rand(low, generator=generator)
        expected = torch.from_numpy(cv2.resize(cam.numpy(), high[::-1]))
        got = F.interpolate(cam[None, None], size=high, mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(got, expected, rtol=0, atol=4e-7)


# ---------------------------------------------------------------- the gradient CAMs, one layer


def conditioning(method: str, model, x, targets, layer: str) -> tuple[float, float, int]:
    """(kappa, R, K) of vizkit's map at ``layer``, from its own capture: the map's terms t_k = w_k A_k
    (``[B,K,h,w]``), R the smallest range of the rectified map at the layer's resolution, kappa the
    largest max_ij sum_k |t_k[i, j]| / R (how much the channel sum cancels)."""
    cam = vizkit.create_method(method, layer=layer)
    inputs = cam.capture(model, x, resolve_target(targets, model, x), layer)
    terms = cam.weights(inputs) * inputs.activation
    rectified = terms.sum(1).clamp_min(0).flatten(1)
    ranges = rectified.amax(1) - rectified.amin(1)
    return float((terms.abs().sum(1).flatten(1).amax(1) / ranges).max()), float(ranges.min()), terms.shape[1]


def tolerance(method: str, model, x, targets, layer: str) -> float:
    """The comparison's tolerance, relative to the [0, 1] maps: 1e-5, or the float32 bound where larger.

    The activation and gradient are the same tensors in both libraries (checked bit for bit while this
    file was written), and the weights agree to ~1e-7. What differs is the sum over the K channels of
    t_k = w_k A_k: pytorch-grad-cam's numpy sums them in float32 one after another (a reduction over a
    non-contiguous axis), torch in its own order. A float32 sum of K terms is within ~ sqrt(K) * u *
    sum_k |t_k| of the exact one (Higham & Mary's probabilistic bound for recursive summation, constant
    ~1: rounding errors of random sign; the worst case K * u is not approached), and min-max scaling by
    the map's range R moves a [0, 1] map by at most twice an error over R. Hence 2 * sqrt(K) * u * kappa
    (``conditioning``): here K = 512 (resnet18, VGG) or 64 and kappa <= 22, so up to 6e-5."""
    kappa, _, channels = conditioning(method, model, x, targets, layer)
    return max(1e-5, 2 * channels**0.5 * U * kappa)


@pytest.mark.parametrize("method", GRADIENT_CAMS)
@pytest.mark.parametrize("which", [0, 1], ids=["inner", "last"])
def test_gradient_cam_equals_pytorch_grad_cam(case, method, which):
    """Measured (CPU, 1 and 2 threads): max |difference| <= 4.6e-6 of the [0, 1] scale (Grad-CAM++ at
    VGG's features.28, kappa 5.6, its bound 1.5e-5), the others <= 1.4e-6."""
    model, x, layers, targets, clone = case
    expected, _ = peer(method, clone, [layers[which]], x, targets)
    got = vizkit.create_method(method, layer=layers[which]).attribute(model, x, targets)
    assert_maps_close(min_max(got), expected, rel=tolerance(method, model, x, targets, layers[which]))


@pytest.mark.parametrize("method", list(PEERS))
def test_the_default_layer_is_the_last_feature_stage(case, method):
    model, x, layers, targets, _ = case
    got = vizkit.create_method(method).attribute(model, x, targets)
    assert torch.equal(got, vizkit.create_method(method, layer=layers[1]).attribute(model, x, targets))


def test_the_gradient_cams_differ_where_the_gradient_varies(case):
    """Guard for the comparisons above: at the inner layer the four weightings give four maps."""
    model, x, layers, targets, _ = case
    maps = [min_max(vizkit.create_method(name, layer=layers[0]).attribute(model, x, targets)) for name in ["gradcam", *GRADIENT_CAMS]]
    for i, first in enumerate(maps):
        for second in maps[i + 1:]:
            assert (first - second).abs().max() > 0.01


def test_gradcam_plus_plus_eps_is_pytorch_grad_cams_and_matters():
    """The default eps (1e-6) is what makes the maps equal; at resnet18's layer4 (median g^2 = 3e-5) the
    paper's eps=0 gives another map (measured: max |difference| 8e-3 of the [0, 1] scale). A negative eps
    is refused."""
    model = cached_model("resnet18")
    x = normalized_batch(model, 2, 64, seed=5)
    maps = [min_max(vizkit.create_method("gradcam_plus_plus", eps=eps).attribute(model, x, [3, 7])) for eps in (1e-6, 0.0)]
    assert (maps[0] - maps[1]).abs().max() > 1e-3
    assert torch.isfinite(maps[1]).all()
    with pytest.raises(ConfigError, match="eps"):
        vizkit.create_method("gradcam_plus_plus", eps=-1.0)


# ---------------------------------------------------------------- Layer-CAM, several layers


def test_layercam_two_layers_equals_pytorch_grad_cam(case):
    """pytorch-grad-cam with ``target_layers=[inner, last]``. Each layer's scaled map carries its own float32
    error (``tolerance``), the mean at most the larger, and the final min-max doubles it; pytorch-grad-cam's
    1e-7 in each layer's scaling changes that layer's map by a relative 1e-7 / R (R: its range in the
    score's units), added. Measured: max |difference| <= 1.6e-6 of the [0, 1] scale (R >= 0.3 here)."""
    model, x, layers, targets, clone = case
    expected, _ = peer("layercam", clone, list(layers), x, targets)
    got = vizkit.create_method("layercam", layers=list(layers)).attribute(model, x, targets)
    assert 0 <= got.min() and got.max() <= 1  # unitless
    rel = 2 * max(tolerance("layercam", model, x, targets, layer) for layer in layers)
    rel += 1e-7 / min(conditioning("layercam", model, x, targets, layer)[1] for layer in layers)
    assert_maps_close(min_max(got), expected, rel=rel)


def test_layercam_scales_each_layer_before_upsampling():
    """On VGG (a 3x3 map with an interior pixel) scaling each layer after upsampling, instead of before
    as pytorch-grad-cam does, gives another map (measured: 0.023 of the [0, 1] scale), so the comparison
    above tells the two apart."""
    model = cached_model("vgg11_bn")
    size, layers, targets = CASES["vgg11_bn"]
    x = normalized_batch(model, len(targets), size, seed=5)
    after = torch.stack([min_max(vizkit.create_method("layercam", layer=layer).attribute(model, x, targets)) for layer in layers]).mean(0)
    before = vizkit.create_method("layercam", layers=list(layers)).attribute(model, x, targets)
    assert (min_max(after) - min_max(before)).abs().max() > 1e-3


def test_layercam_checks_every_layer_and_its_fields():
    model = cached_model("resnet18")
    method = vizkit.create_method("layercam", layers=["layer3", "layer9"])
    with pytest.raises(ConfigError, match="layer9"):
        method.check(model)
    vizkit.create_method("layercam", layers=["layer3", "layer4"]).check(model)
    with pytest.raises(ConfigError, match="distinct"):
        vizkit.create_method("layercam", layers=["layer3", "layer3"])
    with pytest.raises(ConfigError, match="not both"):
        vizkit.create_method("layercam", layer="layer4", layers=["layer3"])
    with pytest.raises(ConfigError, match="list"):
        vizkit.create_method("layercam", layers="layer3")


def test_layercam_one_layer_in_layers_keeps_the_scores_units(case):
    model, x, layers, targets, _ = case
    got = vizkit.create_method("layercam", layers=[layers[0]]).attribute(model, x, targets)
    assert torch.equal(got, vizkit.create_method("layercam", layer=layers[0]).attribute(model, x, targets))


# ---------------------------------------------------------------- Eigen-CAM


def eigencam_for_peers_sign(got, stored, x):
    """vizkit's Eigen-CAM map ``got``, min-max scaled, for the sign pytorch-grad-cam's SVD chose, and the
    tolerance. pytorch-grad-cam's raw projection (``get_2d_projection`` on the activation it stored)
    gives that sign per image: where it agrees with vizkit's convention ``got`` is taken as it is,
    elsewhere vizkit's component negated, rectified and upsampled.

    Tolerance: pytorch-grad-cam's SVD runs in float32 (vizkit's in float64). The first singular vector
    of a backward-stable SVD is off by ~ u * sigma_1 / (sigma_1 - sigma_2) (Wedin's bound, u = 2^-24)
    times a small constant, 8 here (the measured one is <= 0.4); random weights keep the first two
    singular values close (sigma_2 / sigma_1 up to 0.97, a factor 30), so that is added to 1e-5."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    centred = stored.flatten(2).transpose(1, 2).double()
    singular = torch.linalg.svdvals(centred - centred.mean(1, keepdim=True))
    rel = 1e-5 + 8 * U * float((singular[:, 0] / (singular[:, 0] - singular[:, 1])).max())
    ours = first_component(stored)  # [B,1,h,w], vizkit's sign
    theirs = torch.from_numpy(get_2d_projection(stored.numpy())).unsqueeze(1)
    signs = torch.sign((ours * theirs).flatten(1).sum(1)).view(-1, 1, 1, 1)
    assert_maps_close(ours * signs, theirs, rel=rel)  # the same component, up to its sign
    total = stored.sum(1, keepdim=True)  # vizkit's sign: the map correlates with the channels' (centred) sum
    assert ((ours * (total - total.mean((2, 3), keepdim=True))).flatten(1).sum(1) >= 0).all()
    negated = F.interpolate((-ours).clamp_min(0), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return torch.where(signs > 0, min_max(got), min_max(negated)), rel


@pytest.mark.parametrize("which", [0, 1], ids=["inner", "last"])
def test_eigencam_equals_pytorch_grad_cam_for_its_sign(case, which):
    """Measured: max |difference| <= 4.8e-7 of the [0, 1] scale; pytorch-grad-cam's sign was the other one
    on one image of eight (resnet18's layer4), whose map then is vizkit's for -v."""
    model, x, layers, targets, clone = case
    expected, (stored,) = peer("eigencam", clone, [layers[which]], x, targets)
    got = vizkit.create_method("eigencam", layer=layers[which]).attribute(model, x, targets)
    scaled, rel = eigencam_for_peers_sign(got, stored, x)
    assert_maps_close(scaled, expected, rel=rel)


def test_eigencam_does_not_depend_on_the_target(case):
    model, x, layers, targets, _ = case
    method = vizkit.create_method("eigencam")
    first = method.attribute(model, x, targets)
    assert torch.equal(first, method.attribute(model, x, [0, 1]))
    assert torch.equal(first, method.attribute(model, x))  # the predicted classes
    assert torch.equal(first, method.attribute(model, x, f"channel:{layers[1]}:3"))


# ---------------------------------------------------------------- layouts: a ViT's tokens, a channels-last stage


def vit_tokens(tensor, height: int = 10, width: int = 10):
    """pytorch-grad-cam's ViT ``reshape_transform`` for test_vit at 160 px (one class token, 10x10 patches)."""
    return tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2)).permute(0, 3, 1, 2)


def channels_last(tensor):
    return tensor.permute(0, 3, 1, 2)


@pytest.mark.parametrize("method", list(PEERS))
@pytest.mark.parametrize(("name", "layer", "reshape"), [("test_vit", "blocks.4.norm1", vit_tokens), ("test_mambaout", "stages.3", channels_last)],
                         ids=["tokens", "nhwc"])
def test_each_layout_equals_pytorch_grad_cam_with_its_reshape_transform(method, name, layer, reshape):
    """Measured: max |difference| <= 1.2e-6 of the [0, 1] scale."""
    model = cached_model(name)
    x = normalized_batch(model, 2, 160, seed=5)
    expected, (stored,) = peer(method, copy.deepcopy(model), [layer], x, [3, 7], reshape_transform=reshape)
    got = vizkit.create_method(method, layer=layer).attribute(model, x, [3, 7])
    if method == "eigencam":
        got, rel = eigencam_for_peers_sign(got, stored, x)
    else:
        got, rel = min_max(got), tolerance(method, model, x, [3, 7], layer)
    assert_maps_close(got, expected, rel=rel)


# ---------------------------------------------------------------- the model left as it was


class Spare(torch.nn.Module):
    """resnet18 with a layer its forward never calls."""

    def __init__(self, model):
        super().__init__()
        self.net = model
        self.spare = torch.nn.Conv2d(512, 512, 1)

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def spare_model():
    model = Spare(copy.deepcopy(cached_model("resnet18")))
    model.pretrained_cfg = model.net.pretrained_cfg
    model.net.conv1.weight.requires_grad_(False)  # a frozen layer stays frozen, the rest trainable
    return model.train()  # modes are restored, and BatchNorm's statistics are not touched


@pytest.mark.parametrize(("method", "fields"), [(name, {"layer": "net.layer3"}) for name in PEERS]
                         + [("layercam", {"layers": ["net.layer3", "net.layer4"]})], ids=[*PEERS, "layercam-two"])
def test_each_method_leaves_the_model_untouched(spare_model, method, fields):
    before = state(spare_model)
    x = normalized_batch(spare_model, 2, 64, seed=5)
    maps = vizkit.create_method(method, **fields).attribute(spare_model, x, [3, 7])
    assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all() and maps.max() > 0
    assert_untouched(spare_model, before)


@pytest.mark.parametrize(("method", "fields"), [(name, {"layer": "spare"}) for name in PEERS]
                         + [("layercam", {"layers": ["net.layer3", "spare"]})], ids=[*PEERS, "layercam-second"])
def test_a_layer_that_never_runs_is_one_line_and_leaves_the_model_untouched(spare_model, method, fields):
    """``layercam-second``: the first layer's forward and backward have run when the second refuses."""
    before = state(spare_model)
    x = normalized_batch(spare_model, 2, 64, seed=5)
    with pytest.raises(ConfigError, match="layer 'spare' runs never") as error:
        vizkit.create_method(method, **fields).attribute(spare_model, x, [3, 7])
    assert "\n" not in str(error.value)
    assert_untouched(spare_model, before)
