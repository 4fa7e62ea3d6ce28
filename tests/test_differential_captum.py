"""vizkit's attribution maps against captum's on random-weight timm ResNets (batch 2, eval mode).

Semantics aligned as documented in each vizkit method: saliency = captum ``Saliency(abs=True)`` then the
max over colour channels; guided backprop / deconvnet with ``reduce="none"`` = captum's
``GuidedBackprop`` / ``Deconvolution`` on a copy with non-in-place ReLUs; occlusion = captum's
``Occlusion`` over all channels on the softmax (or the raw logits), with the fill converted to the
model's normalization as baseline, where the window grid fits the image exactly.
"""
from __future__ import annotations

import pytest
import torch

import vizkit
from tiny_models import assert_maps_close, captum_copy, normalized_batch, single_thread, timm_model

captum_attr = pytest.importorskip("captum.attr")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*did not already require gradients.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*backward hooks on ReLU.*:UserWarning"),
]

MODELS = ("resnet18", "test_resnet")
TARGETS = [3, 7]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return timm_model(request.param)


@pytest.fixture(scope="module")
def x(model):
    return normalized_batch(model, 2, 64, seed=5)


def test_residual_branches_are_exercised(model, x):
    """Guard for the comparisons below: timm's zero-init of each block's last BN gamma is undone."""
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and all(bn.weight.abs().min() > 0.1 for bn in batchnorms)
    with torch.no_grad():
        logits = model(x)
    assert logits.std() > 1e-2 and not torch.allclose(logits[0], logits[1])


# ---------------------------------------------------------------- gradients


def test_saliency_equals_captum_abs_max(model, x):
    expected = captum_attr.Saliency(model).attribute(x.clone(), target=TARGETS, abs=True).amax(1, keepdim=True)
    got = vizkit.create_method("saliency").attribute(model, x, TARGETS)
    assert_maps_close(got, expected)


def test_saliency_without_reduction_equals_captum_signed(model, x):
    expected = captum_attr.Saliency(model).attribute(x.clone(), target=TARGETS, abs=False)
    got = vizkit.create_method("saliency", reduce="none").attribute(model, x, TARGETS)
    assert_maps_close(got, expected)


def test_guided_backprop_equals_captum(model, x):
    expected = captum_attr.GuidedBackprop(captum_copy(model)).attribute(x.clone(), target=TARGETS)
    got = vizkit.create_method("guided_backprop", reduce="none").attribute(model, x, TARGETS)
    assert_maps_close(got, expected)


def test_guided_backprop_default_is_captum_abs_max(model, x):
    expected = captum_attr.GuidedBackprop(captum_copy(model)).attribute(x.clone(), target=TARGETS)
    got = vizkit.create_method("guided_backprop").attribute(model, x, TARGETS)
    assert_maps_close(got, expected.abs().amax(1, keepdim=True))


def test_deconvnet_equals_captum_deconvolution(model, x):
    expected = captum_attr.Deconvolution(captum_copy(model)).attribute(x.clone(), target=TARGETS)
    got = vizkit.create_method("deconvnet", reduce="none").attribute(model, x, TARGETS)
    assert_maps_close(got, expected)


# ---------------------------------------------------------------- occlusion

# 64 px, window 16, stride 8: starts 0, 8, ..., 48 reach the edge exactly (7 x 7 windows)
WINDOW, STRIDE, FILL = 16, 8, 0.3


def normalized_fill(model, fill: float) -> torch.Tensor:
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return ((fill - mean) / std).expand(1, 3, 64, 64)


def captum_occlusion(forward, model, x):
    return captum_attr.Occlusion(forward).attribute(
        x.clone(),
        sliding_window_shapes=(3, WINDOW, WINDOW),
        strides=(3, STRIDE, STRIDE),
        baselines=normalized_fill(model, FILL),
        target=TARGETS,
        perturbations_per_eval=16,
    )


def test_occlusion_equals_captum_on_softmax(model, x):
    expected = captum_occlusion(lambda t: model(t).softmax(1), model, x)
    # captum's map is per channel, constant across channels for a window spanning all of them
    torch.testing.assert_close(expected, expected[:, :1].expand_as(expected))
    got = vizkit.create_method("occlusion", window=WINDOW, stride=STRIDE, fill=FILL).attribute(model, x, TARGETS)
    assert_maps_close(got, expected[:, :1], rel=1e-5)


def test_occlusion_logit_score_equals_captum_on_logits(model, x):
    expected = captum_occlusion(model, model, x)
    got = vizkit.create_method("occlusion", window=WINDOW, stride=STRIDE, fill=FILL, score="logit").attribute(
        model, x, TARGETS
    )
    assert_maps_close(got, expected[:, :1], rel=1e-5)
