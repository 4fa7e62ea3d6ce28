"""The four attribution methods through the Python API ``create_method(name, **fields).attribute(model, x,
target)``: shapes, occlusion's windows, fill and batching, config validation, and every target form."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vizkit
from tiny_models import RegionModel, assert_maps_close, normalized_batch, pixel_batch, single_thread, tiny_relu_net, timm_model
from vizkit.core.errors import ConfigError
from vizkit.methods.attribution.occlusion import window_starts
from vizkit.core.models import find_layer

METHODS = ("saliency", "guided_backprop", "deconvnet", "occlusion")
GRADIENT_METHODS = ("saliency", "guided_backprop", "deconvnet")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def tiny():
    return tiny_relu_net("module_inplace")


def manual_input_gradient(score_fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(score_fn(x).sum(), x)
    return gradient


def manual_class_saliency(model, x, indices) -> torch.Tensor:
    indices = torch.as_tensor(indices).view(-1, 1)
    gradient = manual_input_gradient(lambda t: model(t).gather(1, indices), x)
    return gradient.abs().amax(1, keepdim=True)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("method", METHODS)
def test_map_shape(method, tiny):
    x = pixel_batch(3, 24, 32)
    maps = vizkit.create_method(method, window=8, stride=4) if method == "occlusion" else vizkit.create_method(method)
    result = maps.attribute(tiny, x, [0, 1, 2])
    assert result.shape == (3, 1, 24, 32)
    assert result.dtype == torch.float32 and not result.requires_grad
    assert torch.isfinite(result).all() and result.abs().max() > 0


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_reduce_none_keeps_colour_channels(method, tiny):
    x = pixel_batch(2, 20)
    result = vizkit.create_method(method, reduce="none").attribute(tiny, x, 1)
    assert result.shape == (2, 3, 20, 20)


@pytest.mark.parametrize(
    "reduce, from_channels",
    [
        ("max_abs", lambda g: g.abs().amax(1, keepdim=True)),
        ("abs_sum", lambda g: g.abs().sum(1, keepdim=True)),
        ("sum", lambda g: g.sum(1, keepdim=True)),
    ],
)
def test_channel_reductions(reduce, from_channels, tiny):
    x = pixel_batch(2, 20)
    full = vizkit.create_method("saliency", reduce="none").attribute(tiny, x, 1)
    torch.testing.assert_close(vizkit.create_method("saliency", reduce=reduce).attribute(tiny, x, 1), from_channels(full))


def test_input_must_be_a_batch(tiny):
    with pytest.raises(ConfigError, match=r"expected an input batch \[B,C,H,W\]"):
        vizkit.create_method("saliency").attribute(tiny, pixel_batch(1, 16)[0], 0)


# ---------------------------------------------------------------- occlusion: windows and exact values


def expected_occlusion(x: torch.Tensor, fill: float, rows: slice, cols: slice, window: int, stride: int) -> torch.Tensor:
    """RegionModel with score=logit: a window's drop is the sum of (x - fill) over region ∩ window."""
    batch, _, height, width = x.shape
    region = torch.zeros(height, width, dtype=torch.bool)
    region[rows, cols] = True
    total = torch.zeros(batch, 1, height, width, dtype=torch.float64)
    count = torch.zeros(height, width, dtype=torch.float64)
    for y in window_starts(height, window, stride):
        for x0 in window_starts(width, window, stride):
            mask = torch.zeros(height, width, dtype=torch.bool)
            mask[y : y + window, x0 : x0 + window] = True
            drop = ((x.double() - fill) * (mask & region)).sum((1, 2, 3))
            total += drop.view(-1, 1, 1, 1) * mask
            count += mask
    return (total / count).float()


def test_occlusion_map_is_nonzero_only_where_windows_meet_the_region():
    rows, cols, window, stride = slice(10, 16), slice(4, 9), 6, 4
    model = RegionModel(rows, cols, scale=1 / 90)  # logit_0 = mean of the region: softmax not saturated
    x = torch.full((1, 3, 32, 32), 0.9)
    result = vizkit.create_method("occlusion", window=window, stride=stride, fill=0.5).attribute(model, x, 0)
    touching = torch.zeros(32, 32, dtype=torch.bool)
    for y in window_starts(32, window, stride):
        for x0 in window_starts(32, window, stride):
            if y < rows.stop and y + window > rows.start and x0 < cols.stop and x0 + window > cols.start:
                touching[y : y + window, x0 : x0 + window] = True
    assert touching.any() and not touching.all()
    assert (result[0, 0] > 0).equal(touching)
    assert (result[0, 0][~touching] == 0).all()


def region_sum_rounding(x: torch.Tensor, rows: slice, cols: slice) -> float:
    """How far float32 may round a RegionModel occlusion map from the float64 reference: each value is a
    difference of two float32 sums of n = C*h*w pixels (the logit with and without the window), each
    off by ~sqrt(n) * 2^-24 * sum|x| (the order of the sum depends on the CPU's SIMD width)."""
    region = x[:, :, rows, cols]
    return 2 * region[0].numel() ** 0.5 * 2.0**-24 * float(region.abs().flatten(1).sum(1).max())


def test_occlusion_logit_map_equals_hand_computation():
    """The tolerance is region_sum_rounding (1.4e-3 here, 2.3e-5 of the map's scale 61); measured
    1.0e-4, 14x inside it. The former rel=1e-5 of the scale (6e-4) was below that derived bound."""
    rows, cols = slice(3, 20), slice(11, 27)
    x = pixel_batch(2, 30, seed=4)
    result = vizkit.create_method("occlusion", window=8, stride=5, fill=0.2, score="logit").attribute(
        RegionModel(rows, cols), x, 0
    )
    expected = expected_occlusion(x, 0.2, rows, cols, 8, 5)
    torch.testing.assert_close(result, expected, rtol=0, atol=region_sum_rounding(x, rows, cols))


def test_window_starts_when_the_grid_does_not_fit():
    assert window_starts(30, 8, 5) == [0, 5, 10, 15, 20, 22]
    assert window_starts(64, 16, 8) == [0, 8, 16, 24, 32, 40, 48]  # fits: no extra window
    assert window_starts(30, 40, 5) == [0]  # window larger than the image: one window, the whole image


@settings(max_examples=200, deadline=None, database=None)
@given(length=st.integers(1, 80), window=st.integers(1, 90), data=st.data())
def test_windows_cover_every_pixel(length, window, data):
    stride = data.draw(st.integers(1, window), label="stride")  # stride <= window: no gaps by design
    starts = window_starts(length, window, stride)
    side = min(window, length)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert starts[-1] + side == length  # the last window is flush with the edge
    assert all(0 <= s and s + side <= length for s in starts)
    covered = set()
    for s in starts:
        covered.update(range(s, s + side))
    assert covered == set(range(length))


def test_stride_larger_than_window_is_refused_or_covered(tiny):
    with pytest.raises(ConfigError, match="stride.*larger than the window"):
        vizkit.create_method("occlusion", window=4, stride=8)


def test_occlusion_covers_every_pixel_when_the_grid_does_not_fit():
    """30 px, window 8, stride 5: every pixel, the last two rows and columns included, gets a finite,
    correct value (captum would leave uncovered pixels at 0/0). Tolerance: region_sum_rounding over
    2700 pixels (8.2e-3 against a scale of 102; measured 1.8e-4, 45x inside it)."""
    everything = slice(0, 30)
    x = pixel_batch(1, 30, seed=2)
    result = vizkit.create_method("occlusion", window=8, stride=5, fill=0.0, score="logit").attribute(
        RegionModel(everything, everything), x, 0
    )
    assert torch.isfinite(result).all() and (result > 0).all()
    expected = expected_occlusion(x, 0.0, everything, everything, 8, 5)
    torch.testing.assert_close(result, expected, rtol=0, atol=region_sum_rounding(x, everything, everything))


def test_window_larger_than_the_image_is_refused():
    """As captum refuses it: the map would be constant along the side the window covers whole."""
    x = pixel_batch(1, 12, seed=3)
    with pytest.raises(ConfigError, match=r"occlusion: the window \(40 px\) is larger than the input \(12x12\).*use window <= 12"):
        vizkit.create_method("occlusion", window=40, stride=8, fill=0.0, score="logit").attribute(RegionModel(slice(0, 12), slice(0, 12)), x, 0)
    full = vizkit.create_method("occlusion", window=12, stride=8, fill=0.0, score="logit").attribute(RegionModel(slice(0, 12), slice(0, 12)), x, 0)
    torch.testing.assert_close(full, x.sum().expand(1, 1, 12, 12), rtol=0, atol=1e-4 * float(x.abs().sum()))


# ---------------------------------------------------------------- occlusion: fill and batching

MEAN, STD = (0.2, 0.4, 0.6), (0.3, 0.2, 0.25)


def constant_image(value: float, mean, std, size: int = 16) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (torch.full((2, 3, size, size), value) - mean_t) / std_t


def test_fill_is_a_pixel_value_given_mean_std(tiny):
    x = constant_image(0.3, MEAN, STD)
    occlusion = lambda fill: vizkit.create_method("occlusion", window=6, stride=3, fill=fill).attribute(
        tiny, x, [0, 3], mean=MEAN, std=STD
    )
    other = occlusion(0.7)
    assert other.abs().max() > 1e-4
    assert occlusion(0.3).abs().max() <= 1e-6 * other.abs().max()


def test_fill_uses_the_models_own_normalization():
    model = timm_model("test_resnet")  # timm data config: mean = std = 0.5
    cfg = model.pretrained_cfg
    x = constant_image(0.3, cfg["mean"], cfg["std"], size=32)
    occlusion = lambda fill: vizkit.create_method("occlusion", window=16, stride=16, fill=fill).attribute(model, x, [1, 2])
    other = occlusion(0.9)
    assert other.abs().max() > 1e-3
    # filling with the image's own value changes the input only by the rounding of two float32
    # normalizations of 0.3 (one ulp apart at most), so each map value is a difference of two
    # probabilities ≤ 1 that agree to a few float32 ulps: 8·eps bounds it (measured: 0 on one CPU,
    # exactly eps on another), 1e4× below the effect of a real fill
    assert occlusion(0.3).abs().max() <= 8 * torch.finfo(torch.float32).eps


def test_batch_size_does_not_change_the_map(tiny):
    """A convolution's rounding depends on its batch size and the CPU: in float32 the maps differed by
    3e-7 here (5 ulps of a probability; a 1e-6 bound was fitted to that), so the batching is checked
    in float64, where probabilities through this 5-layer net (reductions of <= 72 terms, |logits| < 10)
    round at < 5 * sqrt(72) * 1.1e-16 * 10 = 5e-14: atol 1e-12 (measured 2.5e-16)."""
    model, x = copy.deepcopy(tiny).double(), pixel_batch(2, 32, seed=6).double()
    maps = [
        vizkit.create_method("occlusion", window=8, stride=4, batch_size=b).attribute(model, x, [2, 4])
        for b in (1, 7, 64)
    ]
    assert maps[0].dtype == torch.float64 and maps[0].abs().max() > 1e-3
    torch.testing.assert_close(maps[1], maps[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(maps[2], maps[0], rtol=0, atol=1e-12)


def test_occlusion_on_a_float64_model(tiny):
    x = pixel_batch(2, 16, seed=8)
    occlusion = vizkit.create_method("occlusion", window=8, stride=4)
    expected = occlusion.attribute(tiny, x, [0, 1])
    got = occlusion.attribute(tiny_relu_net("module_inplace").double(), x.double(), [0, 1])
    assert got.dtype == torch.float64  # like the gradient methods, which keep the input's dtype
    torch.testing.assert_close(got.float(), expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"window": 0}, "window must be a positive integer, got 0"),
        ({"stride": -1}, "stride must be a positive integer, got -1"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"window": 2.5}, "window must be a positive integer, got 2.5"),
        ({"fill": 2}, r"fill is a pixel value in \[0, 1\], got 2"),
        ({"fill": -0.1}, r"fill is a pixel value in \[0, 1\]"),
        ({"score": "prob"}, "score must be one of probability, logit, got 'prob'"),
    ],
)
def test_occlusion_rejects_bad_values(fields, message):
    with pytest.raises(ConfigError, match=f"occlusion: {message}"):
        vizkit.create_method("occlusion", **fields)


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="occlusion: unknown field") as error:
        vizkit.create_method("occlusion", windw=3)
    assert "windw" in str(error.value)
    assert "window" in str(error.value).split("fields are:")[1]


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_unknown_reduction_is_refused(method):
    with pytest.raises(ConfigError, match=f"{method}: reduce must be one of max_abs, abs_sum, sum, none, got 'mean'"):
        vizkit.create_method(method, reduce="mean")


def test_unknown_method_suggests_close_names():
    with pytest.raises(ConfigError, match="unknown method 'saliancy'") as error:
        vizkit.create_method("saliancy")
    assert "saliency" in str(error.value).split("closest:")[1]


# ---------------------------------------------------------------- channel and neuron targets


@pytest.fixture(scope="module")
def resnet18():
    return timm_model("resnet18")


@pytest.fixture(scope="module")
def resnet_x(resnet18):
    return normalized_batch(resnet18, 2, 64, seed=7)


def manual_layer_saliency(model, x, layer, select) -> torch.Tensor:
    """|d select(layer output) / dx|, max over colours; the output is cloned inside the hook, so an
    in-place op that later overwrites it (timm's ``x += shortcut; act2(x)``) cannot change it."""
    captured = []
    handle = find_layer(model, layer).register_forward_hook(lambda module, inputs, output: captured.append(output.clone()))

    def score(t):
        captured.clear()
        model(t)
        return select(captured[0])

    try:
        gradient = manual_input_gradient(score, x)
    finally:
        handle.remove()
    return gradient.abs().amax(1, keepdim=True)


@pytest.mark.parametrize(
    "target, layer, select",
    [
        ("channel:layer1:3", "layer1", lambda a: a[:, 3].sum((1, 2))),
        ("neuron:layer2.0:1:2:2", "layer2.0", lambda a: a[:, 1, 2, 2]),
        # bn2's output is overwritten in place by the residual add and the ReLU that follow
        ("channel:layer1.0.bn2:5", "layer1.0.bn2", lambda a: a[:, 5].sum((1, 2))),
        ("neuron:layer3.1.bn2:4:1:3", "layer3.1.bn2", lambda a: a[:, 4, 1, 3]),
    ],
)
def test_saliency_of_a_layer_target_equals_manual_autograd(target, layer, select, resnet18, resnet_x):
    got = vizkit.create_method("saliency").attribute(resnet18, resnet_x, target)
    assert_maps_close(got, manual_layer_saliency(resnet18, resnet_x, layer, select), rel=1e-5)


@pytest.mark.parametrize(
    "target, message",
    [
        ("channel:layer1:64", "channel 64 is out of range"),
        ("neuron:layer2.0:1:8:0", r"neuron \(8, 0\) is out of range"),
        ("channel:layer5:0", "layer 'layer5' not found"),
    ],
)
def test_layer_target_out_of_range(target, message, resnet18, resnet_x):
    with pytest.raises(ConfigError, match=message):
        vizkit.create_method("saliency").attribute(resnet18, resnet_x, target)


@pytest.mark.parametrize("target", ["channel:act2:0", "neuron:act2:0:1:1"])
def test_occlusion_refuses_layer_targets(target, tiny):
    with pytest.raises(ConfigError, match=r"occlusion cannot explain a (channel|neuron) target.*takes: class"):
        vizkit.create_method("occlusion").attribute(tiny, pixel_batch(1, 16), target)


# ---------------------------------------------------------------- class target forms


@pytest.fixture(scope="module")
def two_predictions(tiny):
    """Two inputs the tiny model predicts differently, so 'predicted' is not one index for both."""
    for seed in range(50):  # noise images differ too little after pooling: give each a colour cast
        cast = torch.randn(2, 3, 1, 1, generator=torch.Generator().manual_seed(seed)) * 2
        x = pixel_batch(2, 20, seed=seed) + cast
        with torch.no_grad():
            predicted = tiny(x).argmax(1)
        if predicted[0] != predicted[1]:
            return x, predicted.tolist()
    raise AssertionError("no pair of inputs with different predictions")


@pytest.mark.parametrize(
    "target", [3, [3, 3], (3, 3), torch.tensor([3, 3]), "class:3", " class:3 "], ids=repr
)
def test_one_class_for_the_batch(target, tiny, two_predictions):
    x, _ = two_predictions
    got = vizkit.create_method("saliency").attribute(tiny, x, target)
    torch.testing.assert_close(got, manual_class_saliency(tiny, x, [3, 3]))


@pytest.mark.parametrize("target", [torch.tensor(3), np.int64(3)], ids=repr)
def test_scalar_index_of_another_type_is_one_class_for_the_batch(target, tiny, two_predictions):
    x, _ = two_predictions
    got = vizkit.create_method("saliency").attribute(tiny, x, target)
    torch.testing.assert_close(got, manual_class_saliency(tiny, x, [3, 3]))


@pytest.mark.parametrize("target", [[1, 4], torch.tensor([1, 4]), np.array([1, 4])], ids=repr)
def test_one_class_per_input(target, tiny, two_predictions):
    x, _ = two_predictions
    got = vizkit.create_method("saliency").attribute(tiny, x, target)
    torch.testing.assert_close(got, manual_class_saliency(tiny, x, [1, 4]))


@pytest.mark.parametrize("target", [None, "predicted"])
def test_predicted_class_is_each_inputs_argmax(target, tiny, two_predictions):
    x, predicted = two_predictions
    got = vizkit.create_method("saliency").attribute(tiny, x, target)
    torch.testing.assert_close(got, manual_class_saliency(tiny, x, predicted))


@pytest.mark.parametrize("method", METHODS)
def test_default_target_equals_explicit_prediction(method, tiny, two_predictions):
    x, predicted = two_predictions
    fields = {"window": 10, "stride": 5} if method == "occlusion" else {}
    attribution = vizkit.create_method(method, **fields)
    torch.testing.assert_close(attribution.attribute(tiny, x), attribution.attribute(tiny, x, predicted))


def test_wrong_number_of_class_targets(tiny):
    with pytest.raises(ConfigError, match="got 3 class targets for a batch of 2"):
        vizkit.create_method("saliency").attribute(tiny, pixel_batch(2, 16), [0, 1, 2])


@pytest.mark.parametrize("target", [5, [0, -1], "class:7"], ids=repr)
def test_class_index_beyond_the_models_classes(target, tiny):
    with pytest.raises(ConfigError, match=r"out of range: the model has 5 classes \(0\.\.4\)"):
        vizkit.create_method("saliency").attribute(tiny, pixel_batch(2, 16), target)
