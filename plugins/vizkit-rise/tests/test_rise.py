"""Tests of the RISE plugin, through vizkit's public API (the plugin must be installed:
``pip install -e plugins/vizkit-rise``)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import vizkit
from vizkit.core.errors import ConfigError
from vizkit.methods.registry import get

SIZE = 32


class LeftHalf(nn.Module):
    """Two classes: the class-0 logit is weight x the mean pixel of the image's left half, class 1's is
    weight / 2 (so that for an image of ones under masks that keep half of it, neither saturates)."""

    def __init__(self, weight: float = 10.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x):
        left = x[..., : x.shape[-1] // 2].mean((1, 2, 3))
        return torch.stack([self.weight * left, torch.full_like(left, self.weight / 2)], 1)


class Constant(nn.Module):
    """Logits that ignore the input: the probability of every class is fixed."""

    def __init__(self, logits) -> None:
        super().__init__()
        self.register_buffer("fixed", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.fixed.expand(x.shape[0], -1) + 0 * x.sum((1, 2, 3)).unsqueeze(1)


@pytest.fixture(scope="module")
def resnet():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()


@pytest.fixture(scope="module")
def cnn():
    """A small convolutional classifier: cheaper than a ResNet where only the bookkeeping is tested."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, SIZE, SIZE, generator=generator)


def test_registered_as_a_plugin():
    assert vizkit.list_methods()["rise"] == "attribution"
    entry = get("rise")
    assert entry.distribution.startswith("vizkit-rise")
    assert type(vizkit.create_method("rise")).__module__ == "vizkit_rise.rise"


def test_shape_finite_and_seeded(resnet, images):
    method = vizkit.create_method("rise", masks=16, cells=4)
    state = torch.random.get_rng_state()
    first = method.attribute(resnet, images, target=[1, 3])
    assert torch.equal(state, torch.random.get_rng_state()), "the global RNG must not be used"
    assert first.shape == (2, 1, SIZE, SIZE)
    assert first.dtype == torch.float32 and torch.isfinite(first).all()
    assert not first.requires_grad
    again = method.attribute(resnet, images, target=[1, 3])
    assert torch.equal(first, again)
    other = vizkit.create_method("rise", masks=16, cells=4, seed=1).attribute(resnet, images, target=[1, 3])
    assert not torch.allclose(first, other)


def test_independent_of_batching(cnn, images):
    """One mask set per call, shared by the batch: neither batch_size nor batching changes a map.
    Different batch sizes may round the CNN differently: each probability by ≤ ½ × Σ6e-8·√fan-in (1e-6)
    × max|logit| (0.2) = 1e-7, over keep (0.5), plus the 12-term sum's 12·6e-8 × max S (0.32): ≈ 4.4e-7,
    inside the default atol 1e-5 (20×); measured 6e-8."""
    maps = vizkit.create_method("rise", masks=12, batch_size=32).attribute(cnn, images, target=2)
    small = vizkit.create_method("rise", masks=12, batch_size=5).attribute(cnn, images, target=2)
    alone = vizkit.create_method("rise", masks=12, batch_size=32).attribute(cnn, images[1:], target=2)
    torch.testing.assert_close(small, maps)
    torch.testing.assert_close(alone[0], maps[1])


def test_keep_one_is_the_clean_probability(cnn, images):
    """With every cell kept, each mask is all ones: S = P_c(I) at every pixel. Bound: the batch's
    rounding of P (≤ 1e-7, as above) plus the 8-term mean's 8·6e-8·P: ≈ 2e-7 against the allowed
    1e-5·P + 1e-6 ≈ 2.7e-6; measured 1.5e-8."""
    maps = vizkit.create_method("rise", masks=8, keep=1.0).attribute(cnn, images, target=[0, 4])
    with torch.no_grad():
        probability = cnn(images).softmax(1)[[0, 1], [0, 4]]
    torch.testing.assert_close(maps, probability.view(2, 1, 1, 1).expand_as(maps), rtol=1e-5, atol=1e-6)


def test_constant_probability_gives_constant_map():
    """E[M] = keep, so S -> c everywhere for a model whose target probability is a constant c."""
    model = Constant([0.0, 1.0, 2.0])
    c = torch.tensor([0.0, 1.0, 2.0]).softmax(0)[2].item()
    x = torch.rand(1, 3, SIZE, SIZE)
    maps = vizkit.create_method("rise", masks=4000, keep=0.3, batch_size=256).attribute(model, x, target=2)
    assert abs(maps.mean().item() - c) < 0.02 * c
    assert (maps - c).abs().max().item() < 0.15 * c


def test_map_follows_the_evidence():
    """Only the left half drives class 0: RISE puts more saliency there than on the right half."""
    x = torch.ones(1, 3, SIZE, SIZE)
    model = LeftHalf(weight=30.0)
    maps = vizkit.create_method("rise", masks=2000, batch_size=256).attribute(model, x, target=0)
    left, right = maps[..., : SIZE // 2], maps[..., SIZE // 2 :]
    assert left.mean() > right.mean() + 0.04  # ~0.07 in expectation
    # away from the middle, where masks' cells straddle both halves, every left column beats every right one
    columns = maps.mean((0, 1, 2))
    assert columns[: SIZE // 4].min() > columns[-SIZE // 4 :].max()
    # for class 1 the evidence is reversed: showing the left half lowers its probability
    reversed_maps = vizkit.create_method("rise", masks=2000, batch_size=256).attribute(model, x, target=1)
    assert reversed_maps[..., : SIZE // 2].mean() < reversed_maps[..., SIZE // 2 :].mean() - 0.04


def test_masks_follow_the_paper():
    """Grid cells are kept with probability keep; masks are smooth, in [0, 1], with mean ~ keep."""
    method = vizkit.create_method("rise", masks=2000, cells=5, keep=0.25, seed=3)
    grids, offsets = method._draw(SIZE, SIZE, torch.device("cpu"))
    assert grids.shape == (2000, 1, 5, 5) and set(grids.unique().tolist()) <= {0.0, 1.0}
    assert abs(grids.mean().item() - 0.25) < 0.01
    cell = math.ceil(SIZE / 5)
    assert offsets.min() >= 0 and offsets.max() == cell - 1  # shifts cover [0, cell)
    masks = method._masks(grids, offsets, SIZE, SIZE)
    assert masks.shape == (2000, 1, SIZE, SIZE)
    assert masks.min() >= 0 and masks.max() <= 1
    assert abs(masks.mean().item() - 0.25) < 0.01
    # bilinear: neighbouring pixels differ by at most one cell's slope
    assert (masks.diff(dim=-1).abs().max() <= 1 / cell + 1e-6) and (masks.diff(dim=-2).abs().max() <= 1 / cell + 1e-6)


def test_fill_and_normalization():
    """Masking happens in pixel space: with fill = the image's own pixel value nothing changes.
    Σ P·M_i / (16·keep) against P·mean(M)/keep: the two 16-term sums round by ≤ 16·6e-8 ≈ 1e-6
    relative, inside rtol 1e-5."""
    model = LeftHalf()
    pixels = torch.full((1, 3, SIZE, SIZE), 0.5)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    maps = vizkit.create_method("rise", masks=16, fill=0.5).attribute(model, x, target=0, mean=mean, std=std)
    with torch.no_grad():
        probability = model(x).softmax(1)[0, 0]
    # with a uniform image and fill equal to it, every masked image is the image: S = P_c(I) * mean(M)/keep
    method = vizkit.create_method("rise", masks=16, fill=0.5)
    grids, offsets = method._draw(SIZE, SIZE, torch.device("cpu"))
    expected = probability * method._masks(grids, offsets, SIZE, SIZE).mean(0, keepdim=True) / 0.5
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "fields",
    [{"masks": 0}, {"masks": -3}, {"cells": 0}, {"batch_size": 0}, {"keep": 1.5}, {"keep": 0.0}, {"fill": -0.1}, {"masks": 2.5}],
)
def test_config_validation(fields):
    with pytest.raises(ConfigError):
        vizkit.create_method("rise", **fields)


def test_rejects_other_target_kinds(cnn, images):
    with pytest.raises(ConfigError, match="rise cannot explain a channel target"):
        vizkit.create_method("rise", masks=4).attribute(cnn, images, target="channel:0:0")
