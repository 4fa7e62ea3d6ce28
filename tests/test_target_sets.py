"""Several targets per input (issue 19): ``attribute_targets`` with ``top:K`` or a list equals one call per
target, shares its passes where the method can (counted forwards), and a run writes one map per input
and target, named after both."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import images_in
from tiny_models import normalized_batch, timm_model

import vizkit
from vizkit.cli.app import run
from vizkit.core.errors import ConfigError
from vizkit.core.target_sets import parse_target_set


pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = timm_model("test_resnet")  # random weights, 10 classes


@pytest.fixture
def resnet():
    return MODEL


@pytest.fixture
def x():
    return normalized_batch(MODEL, 3, 64, seed=5)


class ForwardCounter:
    def __init__(self, model):
        self.model, self.count = model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *_):
        self.handle.remove()


# the methods that share passes among the targets, and one that runs once per target (the default)
SHARED = {"saliency": {}, "input_x_gradient": {}, "guided_backprop": {}, "gradcam": {}, "gradcam_plus_plus": {}, "xgradcam": {},
          "eigencam": {}, "occlusion": {"window": 16, "stride": 16}, "occlusion_naive": {"window": 16, "stride": 16, "incremental": False}}
LOOPED = {"integrated_gradients": {"steps": 8}, "layercam": {}, "fullgrad": {}, "smoothgradcam_plus_plus": {"samples": 2}, "guided_gradcam": {}}
# the CAMs whose weighting runs forwards of their own share the activation only; deconvnet is guided backprop's code
SHARED |= {"hirescam": {}, "scorecam": {}, "ablationcam": {}, "deconvnet": {}}


def _method(name, fields):
    return vizkit.create_method("occlusion" if name == "occlusion_naive" else name, **fields)


@pytest.mark.parametrize("name", sorted(SHARED) + sorted(LOOPED))
def test_top_k_equals_one_call_per_class(resnet, x, name):
    """Map [b, k] of top:3 equals attribute() for input b's k-th most probable class. The tolerance is float32
    rounding of the batched backward (K cotangents summed in another order), relative to the map's scale."""
    method = _method(name, {**SHARED, **LOOPED}[name])
    many = method.attribute_targets(resnet, x, "top:3")
    top = resnet(x).topk(3, 1).indices
    separate = torch.stack([method.attribute(resnet, x, top[:, k]) for k in range(3)], 1)
    assert many.shape == (3, 3, 1, 64, 64)
    assert separate.abs().amax() > 0
    torch.testing.assert_close(many, separate, rtol=0, atol=1e-5 * float(separate.abs().amax()))


@pytest.mark.parametrize("name, fields", [("saliency", {}), ("gradcam", {"layer": "layer1"})])
def test_a_list_of_channels_from_one_forward(resnet, x, name, fields):
    method = vizkit.create_method(name, **fields)
    targets = ["channel:layer2:3", "neuron:layer2:5:2:2", "class:4"]
    with ForwardCounter(resnet) as counter:
        many = method.attribute_targets(resnet, x, targets)
    assert counter.count == 1
    separate = torch.stack([method.attribute(resnet, x, target) for target in targets], 1)
    torch.testing.assert_close(many, separate, rtol=0, atol=1e-5 * float(separate.abs().amax()))


@pytest.mark.parametrize("name, one_target_forwards", [("saliency", 1), ("gradcam", 1), ("occlusion", None), ("scorecam", None),
                                                       ("ablationcam", None)])
def test_the_targets_share_the_forwards(resnet, x, name, one_target_forwards):
    """top:5 costs the forwards of one target: the classes come from the method's own first forward."""
    method = _method(name, SHARED[name])
    with ForwardCounter(resnet) as one:  # Score-CAM and Ablation-CAM: every (input, channel) pair's forward scores all five
        method.attribute(resnet, x)
    with ForwardCounter(resnet) as five:
        method.attribute_targets(resnet, x, "top:5")
    assert five.count == one.count and (one_target_forwards is None or one.count == one_target_forwards)


def test_a_method_without_a_shared_path_runs_once_per_target(resnet, x):
    method = vizkit.create_method("integrated_gradients", steps=4, batch_size=4)
    with ForwardCounter(resnet) as one:
        method.attribute(resnet, x, 1)
    with ForwardCounter(resnet) as two:
        method.attribute_targets(resnet, x, ["class:1", "class:2"])
    assert two.count == 2 * one.count


def test_a_cam_refuses_a_target_before_its_layer_as_for_one_target(resnet, x):
    """Alone, channel:layer2:3 stops the forward before layer4 and Grad-CAM there refuses; in a set it must too
    (its gradient at layer4 would be zero, a silently empty map)."""
    method = vizkit.create_method("gradcam")
    with pytest.raises(ConfigError, match="layer 'layer4' runs never"):
        method.attribute(resnet, x, "channel:layer2:3")
    with pytest.raises(ConfigError, match="before the target channel:layer2:3"):
        method.attribute_targets(resnet, x, ["class:1", "channel:layer2:3"])
    assert method.attribute_targets(resnet, x, ["class:1", "channel:layer4:3"]).shape == (3, 2, 1, 64, 64)


def test_top_k_is_in_order_of_probability(resnet, x):
    method = vizkit.create_method("gradcam")
    logits = resnet(x)
    order = logits.argsort(1, descending=True)[:, :2]
    many = method.attribute_targets(resnet, x, "top:2")
    torch.testing.assert_close(many[:, 1], method.attribute(resnet, x, order[:, 1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("value, message", [
    ("top:0", "K >= 1"), ("top:two", "whole number"), ([], "empty target list"), (["class:3", "class:3"], "more than once"),
    (["class:3", "top:2"], "stands alone"), (["class:3", 7], "target strings"), (["class:3", "chanel:x:1"], "cannot read target"),
])
def test_bad_target_sets_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_target_set(value)


def test_bad_target_sets_at_attribution(resnet, x):
    method = vizkit.create_method("occlusion")
    with pytest.raises(ConfigError, match="attribute_targets"):
        method.attribute(resnet, x, "top:3")
    with pytest.raises(ConfigError, match="more classes than the model has"):
        vizkit.create_method("gradcam").attribute_targets(resnet, x, "top:11")
    with pytest.raises(ConfigError, match="cannot explain a channel target"):
        method.attribute_targets(resnet, x, ["class:1", "channel:layer2:3"])
    with pytest.raises(ConfigError, match="layer 'layer9' not found"):
        vizkit.create_method("saliency").attribute_targets(resnet, x, ["class:1", "channel:layer9:3"])


def test_a_run_writes_one_map_per_input_and_target(compose, tmp_path):
    results = run(compose("data=shapes", "data.count=2", "method=gradcam", "target=top:2", "metrics=[pointing_game]"), tmp_path)
    records = results["inputs"]
    assert results["target"] == "top:2" and len(records) == 4
    timings = results["timings"]  # per input, not per map
    assert timings["seconds_per_input"] == pytest.approx(timings["method_seconds"] / 2)
    assert timings["inputs_per_second"] == pytest.approx(2 / timings["predict_seconds"], rel=1e-6)
    for record in records:
        rank, index = record["name"].split("__")[1].split("_class_")
        assert record["name"].startswith(record["input"] + "__") and int(index) == record["target"]["index"]
        assert record["target"]["index"] == record["top5"][int(rank.removeprefix("top")) - 1]["index"]
        assert record["png"] == f"images/{record['name']}.png" and (tmp_path / record["png"]).is_file()
        assert np.isfinite(record["metrics"]["pointing_game"])
    assert {f"{r['name']}/panel" for r in records} <= set(images_in(tmp_path))
    with np.load(tmp_path / "maps.npz") as maps:
        assert set(maps.files) == {r["name"] for r in records}


def test_a_run_with_a_target_list_names_each_map_after_its_target(compose, tmp_path):
    results = run(compose("data=shapes", "data.count=1", "method=saliency", "target=[class:star,channel:layer4:3]"), tmp_path)
    names = [r["name"].split("__")[1] for r in results["inputs"]]
    assert results["target"] == "[class:star,channel:layer4:3]" and names == ["class_star", "channel_layer4_3"]
    assert [r["target"]["kind"] for r in results["inputs"]] == ["class", "channel"]
