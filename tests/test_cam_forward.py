"""Score-CAM and Ablation-CAM, the CAMs that weigh channels by forwards of their own
(``vizkit/methods/attribution/scorecam.py``, ``ablationcam.py``).

* Differential: against pytorch-grad-cam 1.5.7's ``ScoreCAM`` and ``AblationCAM`` on random-weight
  timm models (BatchNorm gammas redrawn, ``tiny_models.reinit_batchnorm``): resnet18 and vgg11_bn, two
  images with different targets, compared after pytorch-grad-cam's own per-image min-max scaling
  (``min_max``; the argument of ``test_differential_attribution``'s Grad-CAM comparison holds for any
  CAM). Both libraries run ``BATCH`` rows a forward and ``BATCH`` divides the channel count, so every
  forward sees the same rows in both and the weights are the same floats; the tolerance
  (``assert_min_max_close``) is 1e-5 of the [0, 1] map plus the rounding of the K-term sum, derived
  there. Measured (torch 2.14, 1 and 2 threads): <= 2.9e-6 on the CNNs (tolerance >= 1.5e-5), 1.0e-5
  on test_vit's LayerNorm output, whose map cancels (tolerance 4e-4).
* Other layouts: Score-CAM against pytorch-grad-cam with its ``reshape_transform`` on a vision
  transformer's tokens and an NHWC stage (MambaOut); Ablation-CAM against its definition computed one
  channel per forward there (the patch tokens' embedding dimension, the last axis, set to 0); a
  channels-last copy of a layer gives the channels-first layer's map exactly.
* Channel and neuron targets: Ablation-CAM equals its definition (bit for bit, one row a forward); a
  target that is off (S = 0) gives a zero map, not NaN.
* batch_size: 1 and 7 give the same maps within 1e-5 of their scale (only the grouping of rows into
  forwards changes, moving the scores by the convolutions' rounding: <= 7e-7 measured).
* Bounded memory: every forward after the clean one(s) holds at most ``batch_size`` rows, and no
  tensor is larger than ``batch_size`` times the largest tensor of a one-image forward, whatever the
  channel count (pytorch-grad-cam's ScoreCAM, which builds all K masked inputs at once, breaks that
  bound: the check has teeth).
* The model is left as it was (hooks, modes, parameters, gradients), also when a forward raises
  midway, and a user's mistake is one line.
"""
from __future__ import annotations

import copy
import functools
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vizkit
from tiny_models import assert_maps_close, normalized_batch, reinit_batchnorm, timm_model
from vizkit.core.errors import ConfigError
from vizkit.core.models import find_layer

pgc = pytest.importorskip("pytorch_grad_cam")

METHODS = ("scorecam", "ablationcam")
PEERS = {"scorecam": "ScoreCAM", "ablationcam": "AblationCAM"}
TARGETS = [3, 7]
BATCH = 32  # rows per forward, both libraries; divides every compared layer's channel count


@functools.lru_cache(maxsize=None)
def cached_model(name: str) -> nn.Module:
    if name == "vgg11_bn":
        # vgg11_bn's features; its head's hidden width 4096 -> 64 (mlp_ratio=1/64), so that a forward
        # at 32 px costs the features, not a 7x7 convolution to 4096 channels
        import timm

        torch.manual_seed(0)
        return reinit_batchnorm(timm.create_model("vgg11_bn", pretrained=False, num_classes=10, mlp_ratio=1 / 64))
    if name == "test_vit":  # no BatchNorm to redraw
        import timm

        torch.manual_seed(0)
        return timm.create_model("test_vit", pretrained=False, num_classes=10).eval()
    return timm_model(name)


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] (the map must not be constant)."""
    flat = maps.flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    assert (high - low).min() > 0, "a constant map: min-max scaling is undefined"
    return ((flat - low) / (high - low)).view_as(maps)


def pytorch_grad_cam(method: str, model: nn.Module, layer: str, x: torch.Tensor, targets, reshape_transform=None) -> torch.Tensor:
    """pytorch-grad-cam's map as [B,1,H,W], on a deep copy (AblationCAM swaps the layer out while it
    runs), ``BATCH`` rows per forward; its hooks released explicitly."""
    from pytorch_grad_cam.ablation_layer import AblationLayer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    clone = copy.deepcopy(model)
    kwargs = {"reshape_transform": reshape_transform}
    if method == "ablationcam":  # a fresh ablation layer: the default argument is one instance shared by every call
        kwargs.update(batch_size=BATCH, ablation_layer=AblationLayer())
    cam = getattr(pgc, PEERS[method])(clone, target_layers=[find_layer(clone, layer)], **kwargs)
    cam.batch_size = BATCH  # ScoreCAM reads it if set (else 16)
    try:
        maps = cam(x.clone(), targets=[ClassifierOutputTarget(c) for c in targets])
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(maps).unsqueeze(1)


# ---------------------------------------------------------------- against pytorch-grad-cam


def attribute_with_terms(method: str, model: nn.Module, x: torch.Tensor, targets, **fields):
    """vizkit's maps, and per input S = max over pixels of sum_k |w_k A_k| (the size of the terms the
    map sums, upsampled as the map) and the channel count K, read from the method's own weights."""
    cam = vizkit.create_method(method, **fields)
    terms = {}
    weights = cam.weights

    def recording(inputs):
        w = weights(inputs)
        terms.update(size=(w * inputs.activation).abs().sum(1, keepdim=True), channels=inputs.activation.shape[1])
        return w

    cam.weights = recording
    maps = cam.attribute(model, x, targets)
    size = F.interpolate(terms["size"], size=x.shape[-2:], mode="bilinear", align_corners=False).flatten(1).amax(1)
    return maps, size, terms["channels"]


def assert_min_max_close(got: torch.Tensor, expected: torch.Tensor, size: torch.Tensor, channels: int) -> None:
    """min_max(got) = expected within 1e-5 of the [0, 1] map, plus what float32 leaves between two
    equal-weight maps. With the same scores in both libraries (``BATCH`` divides K), the weights are the
    same floats and so are the products w_k A_k; the K-term sums (numpy's, torch's) differ in order,
    each off by about sqrt(K) u sum_k |w_k A_k| (u = 2^-24; worst case (K-1) u). The min-max divides
    that by the map's range R and, with the shifted min and max, at most doubles it, twice over for two
    sums: 4 sqrt(K) u S / R. That term is large where the map cancels (a LayerNorm's output, signed and
    zero-mean over channels: S/R ~ 210 on test_vit, 4e-4); on these CNNs S/R is 2 to 21 (1e-5 to 8e-5)."""
    flat = got.flatten(1)
    spread = flat.amax(1) - flat.amin(1)
    tolerance = 1e-5 + 4 * channels**0.5 * 2.0**-24 * size / spread
    error = (min_max(got) - expected).abs().flatten(1).amax(1)
    assert torch.all(error <= tolerance), (error, tolerance)


CASES = {
    # model: (layer, input size). One forward per input and channel, in each library: ~1 s each here
    "resnet18": ("layer3", 32),  # 256 channels at 2x2
    "vgg11_bn": ("features.6", 32),  # the second stage's ReLU: 128 channels at 16x16 (a 256-channel stage: 2x longer)
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_equals_pytorch_grad_cam_after_min_max(name, method):
    model = cached_model(name)
    layer, size = CASES[name]
    x = normalized_batch(model, 2, size, seed=6)
    got, terms, channels = attribute_with_terms(method, model, x, TARGETS, layer=layer, batch_size=BATCH)
    assert_min_max_close(got, pytorch_grad_cam(method, model, layer, x, TARGETS), terms, channels)


def tokens_to_grid(tensor: torch.Tensor, side: int = 10) -> torch.Tensor:
    """pytorch-grad-cam's ViT ``reshape_transform`` for test_vit (160 px, 16 px patches, one class token)."""
    return tensor[:, 1:].reshape(tensor.shape[0], side, side, tensor.shape[2]).permute(0, 3, 1, 2)


def nhwc_to_nchw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2)


@pytest.mark.parametrize(("name", "layer", "size", "reshape"), [
    ("test_vit", "blocks.5.norm1", 160, tokens_to_grid),  # tokens: 64 channels over a 10x10 grid
    ("test_mambaout", "stages.3", 96, nhwc_to_nchw),  # an NHWC stage: 64 channels, 3x3
], ids=["vit-tokens", "mambaout-nhwc"])
def test_scorecam_on_other_layouts_equals_pytorch_grad_cam_with_its_reshape_transform(name, layer, size, reshape):
    model = cached_model(name)
    x = normalized_batch(model, 2, size, seed=6)
    got, terms, channels = attribute_with_terms("scorecam", model, x, TARGETS, layer=layer, batch_size=BATCH)
    assert_min_max_close(got, pytorch_grad_cam("scorecam", model, layer, x, TARGETS, reshape_transform=reshape), terms, channels)


def ablation_by_definition(x, score, module: nn.Module, grid, zero) -> torch.Tensor:
    """Ablation-CAM written from the paper, one input and one channel per forward: ``score(row, one)``
    is the target's score of input ``row`` given as ``one`` ([1,3,H,W]), ``grid(output)`` the layer's
    output as [1,K,h,w], ``zero(output, k)`` sets channel k to 0 in the output's own layout."""
    maps = []
    for row in range(len(x)):
        one = x[row : row + 1]
        with torch.no_grad():
            captured = []
            handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.clone()))
            try:
                clean = score(row, one)
            finally:
                handle.remove()
            activation = grid(captured[0]).float()
            weights = []
            for k in range(activation.shape[1]):
                handle = module.register_forward_hook(lambda _m, _i, out: zero(out.clone(), k))
                try:
                    weights.append((clean - score(row, one)) / clean)
                finally:
                    handle.remove()
        cam = (torch.stack(weights).view(1, -1, 1, 1) * activation).sum(1, keepdim=True).clamp_min(0)
        maps.append(F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False))
    return torch.cat(maps)


def class_score(model, targets):
    return lambda row, one: model(one)[0, targets[row]]


def zero_token_channel(out, k):
    out[:, 1:, k] = 0  # the patch tokens only: the class token has no place in A_k
    return out


def zero_last_axis(out, k):
    out[..., k] = 0
    return out


@pytest.mark.parametrize(("name", "layer", "size", "grid", "zero"), [
    ("test_vit", "blocks.5.norm1", 160, tokens_to_grid, zero_token_channel),
    ("test_mambaout", "stages.3", 96, nhwc_to_nchw, zero_last_axis),
], ids=["vit-tokens", "mambaout-nhwc"])
def test_ablationcam_on_other_layouts_equals_its_definition(name, layer, size, grid, zero):
    """pytorch-grad-cam's AblationLayerVit also overwrites the class token and writes (min - 1e7), not 0,
    where the layer's minimum is not 0 (a LayerNorm's output): not a reference here. One input per
    forward in both (batch_size=1), so the scores are the same floats but for the clean S, which vizkit
    reads from the two-image forward of its capture."""
    model = cached_model(name)
    x = normalized_batch(model, 2, size, seed=6)
    got = vizkit.create_method("ablationcam", layer=layer, batch_size=1).attribute(model, x, TARGETS)
    assert_maps_close(got, ablation_by_definition(x, class_score(model, TARGETS), find_layer(model, layer), grid, zero))


class Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


@pytest.mark.parametrize("method", METHODS)
def test_a_channels_last_layer_equals_the_channels_first_one(method):
    """test_resnet with its layer3 output passed through NHWC and back: the NHWC step, read with
    layout=nhwc (and, for Ablation-CAM, zeroed along its last axis), gives layer3's map."""
    model = cached_model("test_resnet")
    nhwc = copy.deepcopy(model)
    nhwc.layer3 = nn.Sequential(OrderedDict(block=nhwc.layer3, nhwc=Permute(0, 2, 3, 1), nchw=Permute(0, 3, 1, 2)))
    x = normalized_batch(model, 2, 64, seed=6)
    expected = vizkit.create_method(method, layer="layer3", batch_size=BATCH).attribute(model, x, TARGETS)
    got = vizkit.create_method(method, layer="layer3.nhwc", layout="nhwc", batch_size=BATCH).attribute(nhwc, x, TARGETS)
    assert_maps_close(got, expected)


# ---------------------------------------------------------------- targets other than a class


def zero_channel(out, k):
    out[:, k] = 0
    return out


def layer_output_of(module: nn.Module, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.clone()))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    return captured[0]


@pytest.mark.parametrize("kind", ["channel", "neuron"])
def test_ablationcam_of_a_channel_or_neuron_target_equals_its_definition(kind):
    """S: layer4's most active channel summed over positions, or its largest value; layer2 ablated."""
    model = cached_model("test_resnet")
    x = normalized_batch(model, 1, 64, seed=6)
    channel = int(layer_output_of(model.layer4, model, x)[0].sum((1, 2)).argmax())
    y, x_ = divmod(int(layer_output_of(model.layer4, model, x)[0, channel].argmax()), 2)  # layer4 is 2x2 at 64 px
    target = f"channel:layer4:{channel}" if kind == "channel" else f"neuron:layer4:{channel}:{y}:{x_}"

    def score(_row, one):
        value = layer_output_of(model.layer4, model, one)[0, channel]
        return value.sum() if kind == "channel" else value[y, x_]

    got = vizkit.create_method("ablationcam", layer="layer2", batch_size=1).attribute(model, x, target)  # one row a forward, as the definition
    assert_maps_close(got, ablation_by_definition(x, score, model.layer2, lambda out: out, zero_channel))


def test_ablationcam_of_a_target_that_is_off_is_zero_not_nan():
    """S = 0 (a ReLU neuron that is off): (S - S_k) / S is undefined; the weights and the map are 0."""
    model = cached_model("test_resnet")
    x = normalized_batch(model, 1, 64, seed=6)
    channel, y, x_ = (int(i) for i in (layer_output_of(model.layer4, model, x)[0] == 0).nonzero()[0])
    got = vizkit.create_method("ablationcam", layer="layer2").attribute(model, x, f"neuron:layer4:{channel}:{y}:{x_}")
    assert torch.equal(got, torch.zeros_like(got))


def test_scorecam_of_a_channel_target_runs_and_differs_from_a_class_target():
    model = cached_model("test_resnet")
    x = normalized_batch(model, 2, 64, seed=6)
    method = vizkit.create_method("scorecam", layer="layer2", batch_size=BATCH)
    channel = method.attribute(model, x, "channel:layer4:5")
    assert torch.isfinite(channel).all() and channel.abs().max() > 0
    assert (min_max(channel) - min_max(method.attribute(model, x, TARGETS))).abs().max() > 0.05


# ---------------------------------------------------------------- batch_size and memory


@pytest.mark.parametrize("method", METHODS)
def test_maps_do_not_depend_on_batch_size(method):
    """test_resnet's layer4 has 96 channels: with 7 rows a forward, a chunk straddles the two images."""
    model = cached_model("test_resnet")
    x = normalized_batch(model, 2, 64, seed=6)
    one, seven = (vizkit.create_method(method, layer="layer4", batch_size=size).attribute(model, x, TARGETS) for size in (1, 7))
    assert_maps_close(seven, one)


class LargestTensor(TorchDispatchMode):
    """The largest storage (bytes) any op produces while active: views count their base's."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.nbytes = max(self.nbytes, leaf.untyped_storage().nbytes())
        return out


def largest_tensor(run) -> int:
    with torch.no_grad(), LargestTensor() as mode:
        run()
    return mode.nbytes


@pytest.mark.parametrize("method", METHODS)
def test_memory_is_bounded_by_batch_size_not_channels(method):
    """Rows per forward, recorded by a pre-hook on the model: the capture's forward of the B inputs, the
    B*K (input, channel) pairs in chunks of batch_size, and Ablation-CAM's clean score of the B inputs.
    Largest tensor: at most batch_size times the largest tensor of one input's forward (the input
    included), whatever K; pytorch-grad-cam's ScoreCAM holds K masked inputs per image at once."""
    model = copy.deepcopy(cached_model("test_resnet"))
    x = normalized_batch(model, 2, 64, seed=6)
    size, channels, layer = 3, 96, "layer4"
    one_input = max(x[0].numel() * x.element_size(), largest_tensor(lambda: model(x[:1])))
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        method_object = vizkit.create_method(method, layer=layer, batch_size=size)
        peak = largest_tensor(lambda: method_object.attribute(model, x, TARGETS))
    finally:
        handle.remove()
    pairs = len(x) * channels
    chunks = [size] * (pairs // size) + ([pairs % size] if pairs % size else [])
    if method == "scorecam":
        assert rows == [len(x)] + chunks
    else:  # S, the two-row check, then the layers before the ablated one once per input of a chunk
        inputs_per_chunk = [len(set(range(start, start + n))) and len({pair // channels for pair in range(start, start + n)})
                            for start, n in zip(range(0, pairs, size), chunks)]
        assert rows == [len(x), len(x), 1] + [1] * sum(inputs_per_chunk)
    assert peak <= size * one_input, (peak, one_input)
    if method == "scorecam":
        theirs = largest_tensor(lambda: pytorch_grad_cam("scorecam", model, layer, x, TARGETS))
        assert theirs >= len(x) * channels * x[0].numel() * x.element_size() > size * one_input


class FixedBatch(nn.Module):
    """A net that reads its batch size at the start of its forward (``fixed``) or not: with ``fixed``
    the layers after ``body`` cannot take more rows than the input had."""

    def __init__(self, fixed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fixed = fixed
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(12 * 8 * 8, 5)

    def forward(self, x):
        batch = x.shape[0]
        h = self.body(self.stem(x))
        return self.fc(h.reshape(batch, -1) if self.fixed else h.flatten(1))


def test_ablationcam_runs_whole_forwards_where_the_layers_before_cannot_be_shared():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    shared, fixed = FixedBatch(fixed=False).eval(), FixedBatch(fixed=True).eval()
    rows: list[int] = []
    handle = fixed.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        got = vizkit.create_method("ablationcam", layer="body", batch_size=4).attribute(fixed, x, [1, 3])
    finally:
        handle.remove()
    assert rows[3:] == [4] * 6  # capture, S, the failed check; then 24 pairs, 4 whole rows a forward
    assert_maps_close(got, vizkit.create_method("ablationcam", layer="body", batch_size=4).attribute(shared, x, [1, 3]), rel=1e-5)


# ---------------------------------------------------------------- the model is left as it was


def hook_counts(model: nn.Module) -> list[int]:
    return [sum(len(value) for key, value in vars(module).items() if key.endswith("hooks") and isinstance(value, dict))
            for module in model.modules()]


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "training": [module.training for module in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": hook_counts(model),
        "patched": [name for name, module in model.named_modules() if "forward" in vars(module)],
        "global_hooks": len(nn.modules.module._global_forward_hooks) + len(nn.modules.module._global_forward_pre_hooks),
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("training", "requires_grad", "hooks", "patched", "global_hooks"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()


@pytest.fixture
def training_model():
    """A copy of test_resnet in train mode (BatchNorm would update its statistics if run so), with one
    module in eval mode to see that every module's own mode comes back."""
    model = copy.deepcopy(cached_model("test_resnet")).train()
    model.layer2.eval()
    return model


@pytest.mark.parametrize("method", METHODS)
def test_model_is_left_untouched(method, training_model):
    before = snapshot(training_model)
    x = normalized_batch(training_model, 2, 64, seed=6)
    vizkit.create_method(method, layer="layer4", batch_size=BATCH).attribute(training_model, x, TARGETS)
    assert_untouched(training_model, before)


@pytest.mark.parametrize("method", METHODS)
def test_model_is_left_untouched_when_a_forward_raises_midway(method, training_model):
    """The classifier raises on its 4th call: a chunk's forward (Ablation-CAM's hook installed: its
    capture, S and the two-row check came first)."""
    before = snapshot(training_model)
    x = normalized_batch(training_model, 2, 64, seed=6)
    calls = []

    def explode(_module, _args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")

    handle = training_model.get_classifier().register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            vizkit.create_method(method, layer="layer4", batch_size=BATCH).attribute(training_model, x, TARGETS)
    finally:
        handle.remove()
    assert_untouched(training_model, before)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("fields", "target", "message"), [
    ({"layer": "layer4"}, 99, "class index 99 is out of range"),
    ({"layer": "layer4"}, "channel:layer2:0", "layer 'layer4' runs never"),  # the score is read before layer4 runs
    ({"layer": "nope"}, TARGETS, "nope"),
], ids=["class-out-of-range", "layer-never-runs", "unknown-layer"])
def test_mistakes_are_one_line_and_leave_the_model_untouched(method, fields, target, message, training_model):
    before = snapshot(training_model)
    x = normalized_batch(training_model, 2, 64, seed=6)
    with pytest.raises(ConfigError, match=message) as error:
        vizkit.create_method(method, **fields).attribute(training_model, x, target)
    assert "\n" not in str(error.value)
    assert_untouched(training_model, before)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_size", [0, -1, True, 1.5])
def test_batch_size_must_be_a_positive_integer(method, batch_size):
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        vizkit.create_method(method, batch_size=batch_size)


def test_defaults_and_registry():
    for name in METHODS:
        method = vizkit.create_method(name)
        assert method.config.batch_size == 8 and method.config.layer == "" and method.needs_gradient is False
        assert name in vizkit.list_methods()
