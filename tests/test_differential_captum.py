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
from tiny_models import assert_maps_close, captum_copy, normalized_batch, rounding, single_thread, timm_model

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
# vizkit and captum differentiate the same forward of the same batch: the maps are equal bit for bit
# (measured, both models, 1 thread), on any CPU; rel=1e-5 of the map's largest value is slack only.


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


def occlusion_tolerance(model, x, expected, softmax):
    """The two run the occluded inputs in different batches (captum 16 at a time), so each score may
    round differently: a logit by ≤ rounding(model) × max|logit| (Σ 6e-8·√fan-in over every conv and the
    fc), a probability by half that (softmax's Jacobian rows sum to ≤ 2p(1 − p) ≤ 1/2); a map value is a
    difference of two scores. Relative to the map's largest value, as assert_maps_close takes it.
    Derived: resnet18 6.3e-3 (softmax), 2.5e-4 (logit); test_resnet 5.9e-4, 1.2e-4. Measured: ≤ 1.3e-6
    apart (each ≤ 2.8e-6 from a float64 model's), ≥ 90× inside."""
    with torch.no_grad():
        logit = float(model(x).abs().max())
    return 2 * rounding(model, "fc") * logit * (0.5 if softmax else 1.0) / float(expected.abs().max())


def test_occlusion_equals_captum_on_softmax(model, x):
    expected = captum_occlusion(lambda t: model(t).softmax(1), model, x)
    # captum's map is per channel, constant across channels for a window spanning all of them
    torch.testing.assert_close(expected, expected[:, :1].expand_as(expected))
    got = vizkit.create_method("occlusion", window=WINDOW, stride=STRIDE, fill=FILL).attribute(model, x, TARGETS)
    assert_maps_close(got, expected[:, :1], rel=occlusion_tolerance(model, x, expected, softmax=True))


def test_occlusion_logit_score_equals_captum_on_logits(model, x):
    expected = captum_occlusion(model, model, x)
    got = vizkit.create_method("occlusion", window=WINDOW, stride=STRIDE, fill=FILL, score="logit").attribute(
        model, x, TARGETS
    )
    assert_maps_close(got, expected[:, :1], rel=occlusion_tolerance(model, x, expected, softmax=False))
