"""Every built-in method on every timm family (timm's 18 test architectures and five real ones, random
weights): an attribution method's finite, non-zero map of the input's size, the other families' finite
images with their default layers, or a one-line ConfigError; the model left as it was; and the
README's support matrix is exactly what this measures."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import support_matrix  # noqa: E402  (a script beside the package, as benchmarks/ is)

REAL = {"vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_100"}


@pytest.fixture(scope="module")
def outcomes():
    touched = []

    def check_untouched(name, model, before):
        if model.training or any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules()) \
                or any(p.grad is not None for p in model.parameters()) \
                or any(not torch.equal(value, before[key]) for key, value in model.state_dict().items()):
            touched.append(name)

    measured = support_matrix.measure(on_model=check_untouched)  # raises on a traceback, a NaN, an all-zero or misshapen map
    assert not touched, f"methods changed these models: {touched}"
    return measured


def test_the_matrix_covers_every_timm_test_architecture_and_the_real_ones():
    import timm

    models = {name for members in support_matrix.FAMILIES.values() for name, _ in members}
    assert set(timm.list_models("test_*")) | REAL == models  # a new timm test model joins the matrix


def test_every_method_gives_a_map_or_refuses_in_one_line(outcomes):
    methods = support_matrix.methods()
    assert {"gradcam", "guided_backprop", "attention_rollout", "gradient_weighted_attention"} <= set(methods)
    everything = methods + support_matrix.other_methods()
    assert len(outcomes) == len(everything) * sum(len(m) for m in support_matrix.FAMILIES.values())
    for outcome in outcomes:
        assert outcome.refusal is None or ("\n" not in outcome.refusal and outcome.refusal), outcome
    working = {(o.method, o.family) for o in outcomes if o.refusal is None}
    # what the issue promises: the CAMs and the rules everywhere, the transformer methods on ViTs
    for family in support_matrix.FAMILIES:
        for method in ("gradcam", "guided_gradcam", "guided_backprop", "deconvnet", "saliency", "integrated_gradients"):
            assert (method, family) in working, (method, family)
    # LRP refuses what it has no rule for (LayerNorm, attention, gates): it runs on ReLU networks, ResNets first
    assert ("lrp", "ResNet") in working
    assert all(o.refusal is None for o in outcomes if o.model in ("vit_tiny_patch16_224", "test_vit") and o.method != "lrp")
    # the defaults of every other family run on every architecture; top_patches' crops need a receptive
    # field vizkit can trace, which Swin's window partition does not give
    refused = {(o.method, o.model) for o in outcomes if o.method not in methods and o.refusal is not None}
    assert {method for method, _ in refused} <= {"top_patches"}, refused


def test_the_readme_shows_the_measured_matrix(outcomes):
    shown = support_matrix.readme_table(support_matrix.README.read_text())
    assert shown == support_matrix.render(outcomes), "README.md's support matrix is stale: run tools/support_matrix.py --write"
