"""LRP (vizkit.methods.attribution.lrp) against zennit, the rules' reference, and its contract.

zennit runs on a copy (``benchmarks/peers.py``' adapter, the one the benchmark rows time) with its
canonizers: ``SequentialMergeBatchNorm`` (timm's blocks register each conv right before its BatchNorm, so
it pairs them) and, for timm's ``BasicBlock``, a ``Sum`` module in place of the skip addition (zennit's
torchvision canonizer, rewritten for timm's block), its ReLUs not in place.
The differential models have BatchNorm eps = 0: zennit's canonizer folds with eps but leaves it in the
BatchNorm it sets to the identity, which then scales by (1 + eps)^-1/2 (1e-4 of the map on VGG-11 with
timm's 1e-5); vizkit folds exactly (tested on its own below).
"""
from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vizkit
from tiny_models import (differential_model, assert_maps_close, assert_untouched, normalized_batch, rounding,
                         single_thread, state, timm_model, tiny_relu_net)
from vizkit.core.errors import ConfigError
from vizkit.core.pixels import PixelSpace
from vizkit.core.targets import resolve_target
from vizkit.methods.attribution.lrp import COMPOSITES
from vizkit.probes.lrp_rules import AffineRule, lrp_rules

zennit = pytest.importorskip("zennit")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peers import zennit_lrp  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*backward hooks.*:UserWarning")

# model -> input size (VGG at 224: its head's 7x7 convolution then sees 7x7 features and timm does not
# resize them with a function, which zennit would leave to the gradient), composites compared
CASES = {
    "resnet18": (64, list(COMPOSITES)),
    "vgg11_bn": (224, ["epsilon_plus", "epsilon_gamma_box"]),
}
TARGETS = [3, 7]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@functools.cache
def cached_model(name: str, bn_eps: float | None = 0.0) -> nn.Module:
    model = copy.deepcopy(differential_model(name))
    if bn_eps is not None:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = bn_eps
    return model


def zennit_relevance(model, x, targets, composite: str) -> torch.Tensor:
    """zennit's relevance at the input (the benchmarks' adapter: canonizers, the logit as output relevance)."""
    bounds = {}
    if composite == "epsilon_gamma_box":
        pixels = PixelSpace.for_model(model)
        bounds = {"low": pixels.from_pixels(torch.zeros(1, 3, 1, 1)), "high": pixels.from_pixels(torch.ones(1, 3, 1, 1))}
    run, _ = zennit_lrp(model, composite, **bounds)
    return run(x.clone(), torch.tensor(targets))


def tolerance(model) -> float:
    """Relative to the map's scale: the float32 rounding of the forward (``rounding``: each affine layer's
    dot product, ~6e-8·√fan-in, summed to the head), twice: the relevance pass runs each layer's rule
    through the same arithmetic once more (measured: 2e-7 on resnet18, 8e-7 on VGG-11, against 8.7e-5 and 7.2e-5)."""
    return 2 * rounding(model, "fc" if hasattr(model, "fc") else "head.fc")


@pytest.mark.parametrize(("name", "composite"), [(name, c) for name, (_, composites) in CASES.items() for c in composites])
def test_each_composite_equals_zennit(name, composite):
    model = cached_model(name)
    x = normalized_batch(model, len(TARGETS), CASES[name][0], seed=5)
    expected = zennit_relevance(model, x, TARGETS, composite)
    got = vizkit.create_method("lrp", composite=composite, reduce="none").attribute(model, x, TARGETS)
    assert_maps_close(got, expected, rel=tolerance(model))
    assert not torch.allclose(got[0], got[1])


def test_zennits_dashed_names_and_rule_overrides_name_the_same_rules():
    model = cached_model("resnet18")
    x = normalized_batch(model, 2, 64, seed=5)

    def lrp(**fields):
        return vizkit.create_method("lrp", reduce="none", **fields).attribute(model, x, TARGETS)

    flat = lrp(composite="epsilon_plus_flat")
    assert torch.equal(lrp(composite="epsilon-plus", first="flat"), flat)
    assert torch.equal(lrp(composite="epsilon-plus-flat", conv="alpha1beta0"), flat)
    assert not torch.allclose(lrp(composite="epsilon_plus"), flat)
    assert not torch.allclose(lrp(composite="epsilon_plus", linear="zplus"), lrp(composite="epsilon_plus"))


def test_batchnorm_is_folded_exactly_and_the_model_is_untouched():
    """With timm's eps (1e-5) the folded forward gives the model's logits, and nothing on the model changes."""
    model = cached_model("resnet18", bn_eps=None)
    before = state(model)
    x = normalized_batch(model, 2, 64, seed=5)
    leaf = x.clone().requires_grad_(True)
    rules = {kind: AffineRule("epsilon") for kind in ("first", "conv", "linear")}
    with lrp_rules(rules.__getitem__, leaf, "lrp") as mode:
        folded = model(leaf)
    assert mode.folded == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    with torch.no_grad():
        plain = model(x)
    torch.testing.assert_close(folded.detach(), plain, rtol=0, atol=tolerance(model) * float(plain.abs().max()))
    assert_untouched(model, before)


def test_relevance_is_conserved_without_biases():
    """z+ and ε divide relevance without loss where no bias takes a share: the input's sums to the logit."""
    model = tiny_relu_net("module")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.zero_()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    explained = vizkit.create_method("lrp").explain(model, x, [0, 1])
    conserved = explained.details["relevance_conserved"]
    assert torch.allclose(conserved, torch.ones(2), atol=1e-4), conserved


@pytest.mark.parametrize("style", ["module_inplace", "functional"])
def test_relus_of_every_spelling_pass_relevance_alike(style):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    method = vizkit.create_method("lrp", composite="epsilon_gamma_box")
    expected = method.attribute(tiny_relu_net("module"), x, [0, 1])
    assert_maps_close(method.attribute(tiny_relu_net(style), x, [0, 1]), expected, rel=1e-6)


def test_a_channel_target_is_explained():
    model = cached_model("resnet18")
    x = normalized_batch(model, 2, 64, seed=5)
    target = resolve_target("channel:layer3:5", model, x)
    maps = vizkit.create_method("lrp").attribute(model, x, target)
    assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all() and maps.abs().max() > 0


class Gated(nn.Module):
    """A conv net with a squeeze-excitation gate: a multiplication LRP has no rule for."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = h * torch.sigmoid(self.gate(h.mean((2, 3), keepdim=True)))
        return self.fc(h.mean((2, 3)))


class PreActivation(nn.Module):
    """A BatchNorm that follows an addition, not a convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(torch.relu(self.bn(h + h.detach())).mean((2, 3)))


class Raising(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        self.conv(x)
        raise ConfigError("this model fails midway")


@pytest.mark.parametrize(("model", "says"), [
    (Gated(), "no rule for mul"),
    (PreActivation().eval(), r"no rule for batch_norm \(not right after a convolution\)"),
    (Raising(), "fails midway"),
    (nn.Sequential(nn.Flatten(), nn.Softmax(1)), "no rule for softmax"),
], ids=["gate", "preact-batchnorm", "raises", "softmax"])
def test_what_has_no_rule_is_refused_by_name_and_the_model_is_untouched(model, says):
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    before = state(model)
    with pytest.raises(ConfigError, match=says) as error:
        vizkit.create_method("lrp").attribute(model, x, [0, 1])
    assert "\n" not in str(error.value)
    assert_untouched(model, before)


def test_a_vision_transformer_is_refused_by_name():
    model = timm_model("test_vit")
    x = normalized_batch(model, 1, model.pretrained_cfg["input_size"][-1], seed=0)
    with pytest.raises(ConfigError, match="no rule for .*layer_norm"):
        vizkit.create_method("lrp").attribute(model, x, [0])


@pytest.mark.parametrize(("fields", "says"), [
    ({"composite": "epsilon_plux"}, "composite must be one of epsilon_plus.*; closest: epsilon_plus$"),
    ({"conv": "zbox"}, "first layer only"),
    ({"first": "gradient"}, "first must be one of epsilon"),
    ({"epsilon": -1.0}, "epsilon must be a non-negative number"),
])
def test_bad_fields_are_one_line(fields, says):
    with pytest.raises(ConfigError, match=says) as error:
        vizkit.create_method("lrp", **fields)
    assert "\n" not in str(error.value)
