"""DeepLIFT (Rescale) and GradientSHAP against captum 0.9, on a random-weight timm resnet18 and VGG-11-BN
(BatchNorm gammas redrawn, eval mode, 64 px, two images with different classes); DeepLIFT's
summation-to-delta; and both leaving the model as it was, also when they raise midway.

DeepLIFT. vizkit's map equals captum's ``DeepLift`` (``reduce=none``, the same baseline tensor, a copy
with non-in-place ReLUs) in two documented relations (``vizkit.methods.attribution.deeplift``):
* captum as it is gives max pools their plain gradient (its ReLU hook reads the gradient before the
  pool's hook replaces it): equal to vizkit with its max-pool rule replaced by the plain pool;
* captum with its pool rule in effect (each pool reads a clone of its input, so the two hooks sit on
  different tensors) and its ``max_unpool2d`` replaced by a summing scatter (overlapping windows' shares
  added): equal to vizkit as it is.

GradientSHAP. captum draws from numpy's and torch's global RNGs; here its three draws
(``np.random.choice`` of the baselines, ``torch.normal`` noise, ``np.random.uniform`` coefficients) are
replaced by vizkit's own (``GradientShap.references`` / ``draws``), laid out in captum's input-major
order, and the maps must agree.

Tolerances are float32 bounds, not measurements. ``rounding(model, last)`` (tests/tiny_models.py) is a
value's relative float32 error after every dot product of the network (≈ Σ 6e-8·√fan-in: resnet18
4.3e-5, VGG 3.6e-5). Measured on CPU (torch 2.14, captum 0.9; 1 and 2 threads): the DeepLIFT maps
equal captum's bit for bit, the GradientSHAP maps too but once (2 threads, resnet18, batch_size 3:
3e-7 of the map's scale, where vizkit's batches are not captum's).
"""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vizkit
from tiny_models import (differential_model, assert_maps_close, assert_untouched as assert_untouched_as_every_method, captum_copy,
                         normalized_batch, RELU_STYLES, rounding, single_thread, state, timm_model,
                         tiny_relu_net)
from vizkit.core.errors import ConfigError
from vizkit.core.pixels import PixelSpace
from vizkit.probes import rescale
from vizkit.probes.baselines import pixel_baseline

captum_attr = pytest.importorskip("captum.attr")
deep_lift = pytest.importorskip("captum.attr._core.deep_lift")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*did not already require gradients.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*Setting forward, backward hooks.*:UserWarning"),
]

MODELS = ("resnet18", "vgg11_bn")
TARGETS = [3, 7]
U = 2.0**-24  # float32's unit roundoff


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@functools.cache
def cached_model(name: str) -> nn.Module:
    if name == "resnet18_silu":  # every ReLU a SiLU: Rescale on a smooth activation
        return timm_model("resnet18", act_layer="silu")
    return differential_model(name)


def float32_rounding(model: nn.Module) -> float:
    """``rounding`` through the model's last convolution or linear layer."""
    last = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))][-1]
    return rounding(model, last)


def baseline_tensor(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """vizkit's baseline ``name`` for ``x`` in the model's input space, as a plain tensor for captum."""
    pixels = PixelSpace.for_model(model)
    return pixels.from_pixels(pixel_baseline(name, pixels.to_pixels(x))).contiguous()


# ---------------------------------------------------------------- DeepLIFT against captum


class CloneInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def pools_reading_a_clone(model: nn.Module) -> nn.Module:
    """captum_copy with every ``nn.MaxPool2d`` behind a module that clones its input: the ReLU before it
    and the pool then hook different tensors, and captum's pool rule takes effect."""
    clone = captum_copy(model)
    for parent in list(clone.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.Sequential(CloneInput(), child))
    return clone


def summing_unpool(values, indices, kernel_size, stride, padding, output_size):
    """``max_unpool2d`` that adds the values of windows sharing an argmax instead of keeping one."""
    batch, channels, height, width = output_size
    planes = torch.zeros(batch, channels, height * width, dtype=values.dtype)
    return planes.scatter_add_(2, indices.flatten(2), values.flatten(2)).view(output_size)


def summing_maxpool2d(module, inputs, outputs, grad_input, grad_output, eps=1e-10):
    return deep_lift.maxpool(module, F.max_pool2d, summing_unpool, inputs, outputs, grad_input, grad_output, eps=eps)


def captum_deeplift(model, x, baseline, monkeypatch=None):
    """captum's map; with ``monkeypatch``, with its pool rule in effect and its unpooling summing."""
    if monkeypatch is None:
        return captum_attr.DeepLift(captum_copy(model)).attribute(x.clone(), baselines=baseline, target=TARGETS).detach()
    monkeypatch.setitem(deep_lift.SUPPORTED_NON_LINEAR, nn.MaxPool2d, summing_maxpool2d)
    return captum_attr.DeepLift(pools_reading_a_clone(model)).attribute(x.clone(), baselines=baseline, target=TARGETS).detach()


class PlainMaxPool:
    """In place of vizkit's max-pool rule: the pool differentiated plainly (what captum as it is does)."""

    @staticmethod
    def apply(x, keywords, eps):
        return F.max_pool2d(x, **keywords)


# vizkit and captum run the same forward (inputs and baselines in one batch of 2B) and the same float32
# operations backward, multipliers computed in captum's order, (g·Δout)/Δin: equal bit for bit where
# autograd sums in the same order. Slack for a backward that sums in another order: each map value,
# a chain of the network's dot products, within float32_rounding of exact in either, hence 2x that
# (of the map's scale).


@pytest.mark.parametrize("baseline", ["gray", "blur"])
@pytest.mark.parametrize("name", MODELS)
def test_deeplift_equals_captum_with_its_pool_rule_in_effect(name, baseline, monkeypatch):
    model = cached_model(name)
    x = normalized_batch(model, 2, 64, seed=5)
    expected = captum_deeplift(model, x, baseline_tensor(model, x, baseline), monkeypatch)
    got = vizkit.create_method("deeplift", reduce="none", baseline=baseline).attribute(model, x, TARGETS)
    assert_maps_close(got, expected, rel=2 * float32_rounding(model))


@pytest.mark.parametrize("name", MODELS)
def test_captum_as_it_is_equals_deeplift_with_plain_max_pools(name, monkeypatch):
    model = cached_model(name)
    x = normalized_batch(model, 2, 64, seed=5)
    expected = captum_deeplift(model, x, baseline_tensor(model, x, "gray"))
    rule = vizkit.create_method("deeplift", reduce="none").attribute(model, x, TARGETS)
    monkeypatch.setattr(rescale, "_MaxPool", PlainMaxPool)
    got = vizkit.create_method("deeplift", reduce="none").attribute(model, x, TARGETS)
    assert_maps_close(got, expected, rel=2 * float32_rounding(model))
    assert (rule - expected).abs().max() > 0.01 * expected.abs().max()  # the pool rule matters here


def test_deeplift_default_is_captums_channel_sum(monkeypatch):
    model = cached_model("resnet18")
    x = normalized_batch(model, 2, 64, seed=5)
    expected = captum_deeplift(model, x, baseline_tensor(model, x, "gray"), monkeypatch).sum(1, keepdim=True)
    got = vizkit.create_method("deeplift").attribute(model, x, TARGETS)
    assert got.shape == (2, 1, 64, 64)
    assert_maps_close(got, expected, rel=2 * float32_rounding(model))


# ---------------------------------------------------------------- summation-to-delta


def completeness_bound(model, x, maps, gap, scores, reference_scores) -> torch.Tensor:
    """The float32 bound on |sum DL - (S(x) - S(x'))| / |S(x) - S(x')| for a network of linear operations,
    elementwise activations and max pools, where summation-to-delta is exact in exact arithmetic: the two
    scores each within float32_rounding of exact, the terms DL_i (each a chain of the same dot
    products) within float32_rounding of theirs, and the sum of n = C*H*W terms within sqrt(n)·u of
    sum |DL_i| (Higham's probabilistic bound)."""
    magnitude = maps.abs().flatten(1).sum(1)
    rho = float32_rounding(model)
    n = maps[0].numel()
    return (rho * (scores.abs() + reference_scores.abs() + magnitude) + n**0.5 * U * magnitude) / gap.abs()


@pytest.mark.parametrize("baseline", ["gray", "black", "blur", "uniform"])
@pytest.mark.parametrize("name", [*MODELS, "resnet18_silu"])
def test_deeplift_sums_to_the_score_difference(name, baseline):
    """Measured: completeness errors <= 3e-5, 100-10000x inside the bound (float64: <= 1.2e-13)."""
    model = cached_model(name)
    x = normalized_batch(model, 2, 64, seed=5)
    explained = vizkit.create_method("deeplift", reduce="none", baseline=baseline).explain(model, x, TARGETS)
    with torch.no_grad():
        rows = torch.arange(2)
        scores = model(x)[rows, TARGETS]
        reference_scores = model(baseline_tensor(model, x, baseline))[rows, TARGETS]
    gap = scores - reference_scores
    bound = completeness_bound(model, x, explained.maps, gap, scores, reference_scores)
    assert torch.all(explained.details["completeness_error"] <= bound), (explained.details, bound)
    independent = (explained.maps.flatten(1).sum(1) - gap).abs() / gap.abs()
    assert torch.all(independent <= bound), (independent, bound)


@pytest.mark.parametrize("name", ["resnet18", "resnet18_silu"])
def test_where_an_input_equals_its_baseline_the_rules_fall_back_to_the_derivative(name):
    """Inputs gray (the baseline) on their left half: every unit that sees only that half has Δin = 0
    exactly, where Δout/Δin is 0/0 and ReLU, SiLU and the max pool pass their derivative instead. The map
    stays finite, 0 where x = x', and sums to the score difference."""
    model = cached_model(name)
    x = normalized_batch(model, 2, 64, seed=5)
    x[..., :32] = baseline_tensor(model, x, "gray")[..., :32]
    explained = vizkit.create_method("deeplift", reduce="none").explain(model, x, TARGETS)
    assert torch.isfinite(explained.maps).all() and explained.maps.abs().max() > 0
    assert torch.all(explained.maps[..., :32] == 0)
    with torch.no_grad():
        rows = torch.arange(2)
        scores = model(x)[rows, TARGETS]
        reference_scores = model(baseline_tensor(model, x, "gray"))[rows, TARGETS]
    bound = completeness_bound(model, x, explained.maps, scores - reference_scores, scores, reference_scores)
    assert torch.all(explained.details["completeness_error"] <= bound)


@pytest.mark.parametrize("method", ["deeplift", "gradient_shap"])
def test_the_default_target_is_the_predicted_class(method):
    model = cached_model("resnet18")
    x = normalized_batch(model, 2, 64, seed=5)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    fields = {"samples": 2} if method == "gradient_shap" else {}
    assert torch.equal(vizkit.create_method(method, **fields).attribute(model, x),
                       vizkit.create_method(method, **fields).attribute(model, x, predicted))


def test_deeplift_sums_to_a_channels_difference():
    """A channel target: S is the sum of layer3's channel 5 (after its last ReLU)."""
    model = cached_model("resnet18")
    x = normalized_batch(model, 2, 64, seed=5)
    explained = vizkit.create_method("deeplift").explain(model, x, "channel:layer3:5")
    assert explained.maps.abs().max() > 0
    assert explained.details["completeness_error"].max() < 1e-3


def test_every_relu_spelling_gives_the_same_map():
    """Modules, in-place modules and functional ReLUs of every spelling (tiny_models.TinyReLUNet, with
    F.max_pool2d): the same operations, so the same map bit for bit, summing to the score difference."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    explained = [vizkit.create_method("deeplift", reduce="none", baseline="black").explain(tiny_relu_net(style), x, [1, 4],
                                                                                          mean=[0.5] * 3, std=[0.25] * 3)
                 for style in RELU_STYLES]
    assert explained[0].maps.abs().max() > 0
    for other in explained[1:]:
        assert torch.equal(other.maps, explained[0].maps)
    assert explained[0].details["completeness_error"].max() < 1e-4


# ---------------------------------------------------------------- GradientSHAP against captum

SAMPLES, STDEV, SEED = 4, 0.1, 3
SHAP_BASELINES = ["black", "gray", "uniform", "uniform"]


def drawn(method, model, x):
    """vizkit's baselines and per-sample draws for ``x``, as its ``compute`` makes them."""
    generator = torch.Generator().manual_seed(method.config.seed)
    references = method.references(x, PixelSpace.for_model(model), generator)
    return references, list(method.draws(generator, x))


def by_hand(method, model, x, targets):
    """The definition evaluated directly from the draws: the mean of the terms (x~ - x')·∇S and of their
    magnitudes, [B,C,H,W] each."""
    references, draws = drawn(method, model, x)
    terms = []
    for index, alpha, noise in draws:
        noisy = x + noise * method.config.stdev
        reference = references[index].expand_as(x)
        scaled = (alpha * noisy + (1 - alpha) * reference).requires_grad_(True)
        (gradient,) = torch.autograd.grad(model(scaled)[torch.arange(x.shape[0]), targets].sum(), scaled)
        terms.append((noisy - reference) * gradient)
    terms = torch.stack(terms)
    return terms.mean(0), terms.abs().mean(0)


def shap_tolerance(model, magnitude) -> torch.Tensor:
    """Per element: each term's gradient, evaluated in another batch, within float32_rounding of exact in
    either computation (2x), and the sum of SAMPLES terms within SAMPLES·u, of the mean |term|."""
    return (2 * float32_rounding(model) + SAMPLES * U) * magnitude


@pytest.mark.parametrize("batch_size", [3, 8])
@pytest.mark.parametrize("name", MODELS)
def test_gradient_shap_equals_captum_given_the_same_draws(name, batch_size, monkeypatch):
    model = cached_model(name)
    x = normalized_batch(model, 2, 64, seed=5)
    method = vizkit.create_method("gradient_shap", reduce="none", samples=SAMPLES, stdev=STDEV, seed=SEED,
                                  baselines=SHAP_BASELINES, batch_size=batch_size)
    got = method.attribute(model, x, TARGETS)
    references, draws = drawn(method, model, x)
    # captum's rows are input-major: row b * n + k is input b's k-th sample
    order = [k for _ in range(x.shape[0]) for k in range(SAMPLES)]
    monkeypatch.setattr(np.random, "choice", lambda count, size: np.array([draws[k][0] for k in order]))
    standard_normal = torch.cat([draws[k][2] for k in order])
    monkeypatch.setattr(torch, "normal", lambda mean, std: std * standard_normal)
    monkeypatch.setattr(np.random, "uniform", lambda low, high, size: np.array([float(draws[k][1]) for k in order]))
    expected = captum_attr.GradientShap(model).attribute(x.clone(), baselines=torch.cat(references), n_samples=SAMPLES,
                                                         stdevs=STDEV, target=TARGETS)
    monkeypatch.undo()
    _, magnitude = by_hand(method, model, x, TARGETS)
    assert expected.abs().max() > 0
    assert torch.all((got - expected).abs() <= shap_tolerance(model, magnitude))


def test_gradient_shap_with_a_per_input_baseline_is_its_definition():
    """blur depends on the input (captum's baseline distribution cannot express it): against the formula."""
    model = cached_model("resnet18")
    x = normalized_batch(model, 2, 64, seed=5)
    method = vizkit.create_method("gradient_shap", reduce="none", samples=SAMPLES, stdev=STDEV, seed=SEED, baselines=["blur", "black"])
    expected, magnitude = by_hand(method, model, x, TARGETS)
    got = method.attribute(model, x, TARGETS)
    assert {draw[0] for draw in drawn(method, model, x)[1]} == {0, 1}
    assert torch.all((got - expected).abs() <= shap_tolerance(model, magnitude))


def test_gradient_shap_map_of_an_input_depends_on_neither_batch_nor_batch_size():
    model = cached_model("resnet18")
    x = normalized_batch(model, 2, 64, seed=5)
    fields = dict(reduce="none", samples=SAMPLES, stdev=STDEV, seed=SEED, baselines=SHAP_BASELINES)
    together = vizkit.create_method("gradient_shap", batch_size=8, **fields).attribute(model, x, TARGETS)
    alone = vizkit.create_method("gradient_shap", batch_size=1, **fields).attribute(model, x[1:], TARGETS[1:])
    _, magnitude = by_hand(vizkit.create_method("gradient_shap", **fields), model, x[1:], TARGETS[1:])
    assert torch.all((alone - together[1:]).abs() <= shap_tolerance(model, magnitude))


def test_gradient_shap_draws_from_its_own_generator():
    model = cached_model("resnet18")
    x = normalized_batch(model, 1, 64, seed=5)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    maps = [vizkit.create_method("gradient_shap", samples=2, seed=seed).attribute(model, x, 3) for seed in (0, 0, 1)]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    assert torch.equal(maps[0], maps[1]) and not torch.equal(maps[0], maps[2])


def test_gradient_shap_noise_leaves_the_other_draws_alone():
    model = cached_model("resnet18")
    x = normalized_batch(model, 1, 64, seed=5)
    quiet, noisy = (drawn(vizkit.create_method("gradient_shap", samples=3, stdev=stdev), model, x) for stdev in (0.0, 0.5))
    assert all(torch.equal(a, b) for a, b in zip(quiet[0], noisy[0]))
    assert [(i, float(a)) for i, a, _ in quiet[1]] == [(i, float(a)) for i, a, _ in noisy[1]]


# ---------------------------------------------------------------- the model left as it was


class Wrapped(nn.Module):
    """resnet18 with, optionally, something DeepLIFT cannot take, or a forward that fails midway."""

    def __init__(self, model: nn.Module, extra: str = "", fail_at_call: int = 0) -> None:
        super().__init__()
        self.net = model
        self.extra = extra
        self.fail_at_call = fail_at_call
        self.calls = 0
        self.pretrained_cfg = model.pretrained_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        features = self.net.forward_features(x)
        if self.calls == self.fail_at_call:
            raise RuntimeError("the forward failed midway")
        if self.extra == "adaptive_max":  # a max pool with no rule (an identity here: 2x2 to 2x2)
            features = F.adaptive_max_pool2d(features, features.shape[-2:])
        if self.extra == "unpaired":  # a ReLU on the whole batch folded into one row
            features = torch.relu(features.reshape(1, -1, *features.shape[2:])).reshape(features.shape)
        return self.net.forward_head(features)


def spare(**fields) -> nn.Module:
    model = Wrapped(copy.deepcopy(cached_model("resnet18")), **fields)
    model.net.conv1.weight.requires_grad_(False)  # a frozen layer stays frozen, the rest trainable
    return model.train()  # modes are restored, and BatchNorm's statistics are not touched


def assert_untouched(model, before):
    assert_untouched_as_every_method(model, before)
    assert all(not hasattr(m, name) for m in model.modules() for name in ("input", "output"))
    # no rule outlives the call: a ReLU differentiates as a ReLU again
    assert torch.relu(torch.ones(1, requires_grad=True)).grad_fn.name() == "ReluBackward0"


METHODS = {"deeplift": {}, "gradient_shap": {"samples": 3, "batch_size": 2}}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_leaves_the_model_untouched(method):
    model = spare()
    before = state(model)
    x = normalized_batch(model.net, 2, 64, seed=5)
    maps = vizkit.create_method(method, **METHODS[method]).attribute(model, x, TARGETS)
    assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all() and maps.abs().max() > 0
    assert_untouched(model, before)


@pytest.mark.parametrize(("method", "fields", "error", "match"), [
    ("deeplift", {"extra": "adaptive_max"}, ConfigError, "deeplift has no rule for adaptive_max_pool2d"),
    ("deeplift", {"extra": "unpaired"}, ConfigError, "applies ReLU to a tensor whose first dimension is not that batch"),
    ("deeplift", {"fail_at_call": 1}, RuntimeError, "failed midway"),
    ("gradient_shap", {"fail_at_call": 2}, RuntimeError, "failed midway"),  # after one pass's forward and backward
], ids=["adaptive-max-pool", "unpaired", "deeplift-fails", "gradient_shap-fails"])
def test_a_method_raising_midway_leaves_the_model_untouched(method, fields, error, match):
    model = spare(**fields)
    before = state(model)
    x = normalized_batch(model.net, 2, 64, seed=5)
    with pytest.raises(error, match=match) as raised:
        vizkit.create_method(method, **METHODS[method]).attribute(model, x, TARGETS)
    assert "\n" not in str(raised.value)
    assert_untouched(model, before)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(("method", "fields", "match"), [
    ("deeplift", {"baseline": "purple"}, "unknown baseline 'purple'"),
    ("deeplift", {"baseline": "/no/such/image.png"}, "no such file"),
    ("deeplift", {"eps": -1.0}, "eps must be a non-negative number"),
    ("deeplift", {"reduce": "mean"}, "reduce must be one of"),
    ("gradient_shap", {"samples": 0}, "samples must be a positive integer"),
    ("gradient_shap", {"batch_size": True}, "batch_size must be a positive integer"),
    ("gradient_shap", {"stdev": -0.1}, "stdev must be a non-negative number"),
    ("gradient_shap", {"baselines": []}, "baselines must be a non-empty list"),
    ("gradient_shap", {"baselines": "black"}, "baselines must be a non-empty list"),
    ("gradient_shap", {"baselines": ["black", "purple"]}, "unknown baseline 'purple'"),
])
def test_a_bad_field_is_a_one_line_config_error(method, fields, match):
    with pytest.raises(ConfigError, match=match) as raised:
        vizkit.create_method(method, **fields)
    assert "\n" not in str(raised.value)
