"""Tests of the Gini metric plugin, through vizkit's public API (the plugin must be installed:
``pip install -e plugins/vizkit-sparsity``)."""
from __future__ import annotations

import pytest
import torch

from vizkit.core.errors import ConfigError
from vizkit.metrics import METRICS, create_metric, discover
from vizkit.metrics.base import MetricInputs
from vizkit_sparsity import Gini, gini_index


def evaluate(maps: torch.Tensor) -> torch.Tensor:
    # the metric reads only the maps: no model, input or target is needed to compute it
    inputs = MetricInputs(model=None, x=None, maps=maps, target=None, pixels=None, method=None)
    return create_metric("gini").evaluate(inputs).values


def test_registered_as_a_plugin():
    assert METRICS["gini"] is Gini
    assert discover()["gini"].distribution.startswith("vizkit-sparsity")
    metric = create_metric("gini")
    assert type(metric).__module__ == "vizkit_sparsity.gini"
    assert (metric.better, metric.needs_masks, metric.needs_class) == ("higher", False, False)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([1.0, 1.0, 1.0, 1.0], 0.0),  # spread evenly
        ([0.0, 0.0, 0.0, 4.0], 0.75),  # all on one of N = 4: (N - 1) / N
        ([1.0, 2.0, 3.0, 4.0], 0.25),  # sum (2k - 5) c_k = -3 - 2 + 3 + 12 = 10; N * sum c = 40
        ([4.0, -3.0, 2.0, -1.0], 0.25),  # the same magnitudes, permuted and signed
        ([0.0, 0.0, 0.0, 0.0], 0.0),  # no magnitude to distribute
        ([0.0, 1.0], 0.5),  # (2*2 - 3) * 1 / (2 * 1)
    ],
)
def test_formula_on_hand_computed_maps(values, expected):
    maps = torch.tensor(values).view(1, 1, 1, -1)
    assert evaluate(maps).tolist() == pytest.approx([expected], abs=1e-7)


def test_one_value_per_input_over_every_channel():
    maps = torch.zeros(2, 2, 2, 2)
    maps[0] = 1.0  # 8 equal values
    maps[1, 1, 0, 0] = -5.0  # one of 8 values holds everything
    values = evaluate(maps)
    assert values.shape == (2,) and values.dtype == torch.float32
    assert values.tolist() == pytest.approx([0.0, 7 / 8])


def test_invariant_to_scale_order_and_sign():
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 1, 16, 16, generator=generator)
    reference = gini_index(maps)
    shuffled = maps.flatten(1)[:, torch.randperm(256, generator=generator)]
    torch.testing.assert_close(gini_index(37.5 * maps), reference)
    torch.testing.assert_close(gini_index(shuffled), reference)
    torch.testing.assert_close(gini_index(-maps), reference)
    assert ((reference > 0) & (reference < 1)).all()


def test_does_not_modify_the_maps():
    maps = torch.tensor([[[[3.0, -1.0], [0.0, 2.0]]]])
    before = maps.clone()
    evaluate(maps)
    assert torch.equal(maps, before)


def test_has_no_fields():
    with pytest.raises(ConfigError, match=r"gini: unknown field\(s\) steps; its fields are: \(none\)"):
        create_metric("gini", steps=4)
