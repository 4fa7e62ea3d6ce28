"""ROAD (road_morf, road_lerf), average drop and increase in confidence: the same removed pixels, imputed
images and scores as pytorch-grad-cam's ROAD (scores through the documented relation), equal to
torchcam's and pytorch-grad-cam's confidence metrics, exact on hand-made maps and probes, seeded,
harmless to the model, the inputs and the global RNG, and refusing bad configs in one line."""
from __future__ import annotations

import contextlib
import copy
import types
from functools import partial

import pytest
import torch
from torch import nn

import vizkit
from tiny_models import assert_untouched, pixel_batch, rounding, single_thread, state, timm_model
from vizkit.core.configured import configure
from vizkit.core.errors import ConfigError
from vizkit.core.pixels import PixelSpace
from vizkit.core.targets import ClassTarget
from vizkit.metrics.base import MetricInputs
from vizkit.metrics.confidence import AverageDrop, IncreaseInConfidence, explanation_images
from vizkit.metrics.road import PERCENTILES, RoadLerf, RoadMorf, removal_masks, road_images

CLASSES = 5
SIZE = 32
FLOAT32_UNIT = 2.0**-24  # float32's unit roundoff: one rounding is off by at most this, relatively
ALL = (RoadMorf, RoadLerf, AverageDrop, IncreaseInConfidence)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def resnet():
    return timm_model("test_resnet", num_classes=CLASSES)


@pytest.fixture(scope="module")
def space(resnet):
    return PixelSpace.for_model(resnet)


@pytest.fixture(scope="module")
def x(resnet, space):
    return space.from_pixels(pixel_batch(2, SIZE, seed=6))


@pytest.fixture(scope="module")
def target(resnet, x):
    """The first input's predicted class and the second's least likely one (p = 0.67 and 0.019): the
    saliency-weighted image lowers the first and raises the second (measured), so the confidence
    metrics are compared on a drop and on an increase."""
    with torch.no_grad():
        logits = resnet(x)
    return ClassTarget(torch.stack([logits[0].argmax(), logits[1].argmin()]))


@pytest.fixture(scope="module")
def saliency(resnet, x, target):
    return vizkit.create_method("saliency").attribute(resnet, x, target)


def on_grid(maps: torch.Tensor, steps: int = 4096) -> torch.Tensor:
    """Maps scaled to [0, 1] on a grid of 1/steps (a power of two): 1 - A is exact in float32, so
    pytorch-grad-cam's LeRF (which thresholds 1 - A) sees the same order and ties as our -A."""
    return torch.round(maps / maps.amax((1, 2, 3), keepdim=True) * steps) / steps


def with_ties(batch: int = 2) -> torch.Tensor:
    """Half zeros, the rest on a grid of 1/64: many ties, at the minimum and above it."""
    return on_grid(torch.relu(torch.randn(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(11))), 64)


def inputs(model, x, maps, target, space) -> MetricInputs:
    return MetricInputs(model, x, maps, target, space, None)


def probabilities(model, x, target) -> torch.Tensor:
    with torch.no_grad():
        return target.select(model(x).float().softmax(1))


def metric(cls, **fields):
    """Registry-free: the entry points are registered in pyproject.toml."""
    return configure(cls, cls.name, fields)


# ---------------------------------------------------------------- ROAD against pytorch-grad-cam


def peer_removed(most_relevant_first: bool, cam: torch.Tensor, percentile: float) -> torch.Tensor:
    """The pixels pytorch-grad-cam's ROAD removes at our ``percentile`` (its q = 100 - p is the share
    kept), read from its binary mask (1 = kept) through an imputer that returns the mask."""
    from pytorch_grad_cam.metrics.perturbation_confidence import RemoveLeastRelevantFirst, RemoveMostRelevantFirst

    remove = RemoveMostRelevantFirst if most_relevant_first else RemoveLeastRelevantFirst
    return remove(100 - percentile, lambda image, kept: kept)(None, cam) == 0


@pytest.mark.parametrize("most_relevant_first", [True, False], ids=["morf", "lerf"])
def test_removed_pixels_are_pytorch_grad_cams_ties_included(saliency, most_relevant_first):
    """The threshold repeats numpy's percentile arithmetic, so the masks are equal, not close. Raw
    saliency (arbitrary float32) for MoRF; for LeRF, maps on which the peer's 1 - A is exact. The
    tie rule, shown on a map that is half zeros: every pixel equal to the threshold goes."""
    ties = with_ties()
    maps = [on_grid(saliency), ties] + ([saliency] if most_relevant_first else [])
    for case in maps:
        ours = removal_masks(case, PERCENTILES, most_relevant_first)
        for b in range(case.shape[0]):
            for k, percentile in enumerate(PERCENTILES):
                assert torch.equal(ours[b, k], peer_removed(most_relevant_first, case[b, 0], percentile)), (b, percentile)
    zeros = ties[:, 0] == 0
    assert zeros.float().mean() > 0.4
    if most_relevant_first:
        assert bool(removal_masks(ties, [90.0], True).all())  # the 10th percentile is 0: every pixel is >= it
    else:
        assert torch.equal(removal_masks(ties, [10.0], False)[:, 0], zeros)  # 10 % asked, every 0 removed


def recording(model: nn.Module) -> nn.Module:
    """``model``, plus a list of every batch it was fed (to read the peer's imputed images)."""

    class Recording(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.seen: list[torch.Tensor] = []

        def forward(self, images):
            self.seen.append(images.detach().clone())
            return self.model(images)

    return Recording()


def draws_of(seed: int, batch: int, steps: int) -> list[list[torch.Tensor]]:
    """The documented noise: one N(0, 1) image per (input, percentile), input-major, from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(3, SIZE, SIZE, generator=generator) for _ in range(steps)] for _ in range(batch)]


@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")  # the peer's np.argwhere on a tensor
@pytest.mark.parametrize("most_relevant_first", [True, False], ids=["morf", "lerf"])
def test_road_equals_pytorch_grad_cam(resnet, x, saliency, target, space, monkeypatch, most_relevant_first):
    """pytorch-grad-cam's ROAD*Average at q = 100 - p, fed our noise (its torch.randn_like returns our
    draws at the removed pixels), on Grad-CAM-like maps (saliency on a grid in [0, 1]).

    Images: the same system assembled in the same order and solved by the same SuperLU call, the
    solution rounded to float32 the same way: equal bit for bit (measured: 0), so no tolerance.
    Scores: the peer returns p_c(x_q) - p_c(x) averaged, = our value - p_c(x). Its forwards batch
    other images together than ours, and a float32 forward's rounding depends on the batch: each
    logit vector is off by at most rounding(model, "fc") * |z| (the fan-in bound of tiny_models),
    which moves a softmax probability by at most half that per side; the two means of nine float32
    numbers <= 1 and the peer's differences add <= 20 roundings of 1. Measured: the removed shares are
    10.06 .. 90.04 % (ties on the grid), scores off by <= 1.8e-7 against a bound of 5e-5."""
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    maps = on_grid(saliency)
    seed, steps = 7, len(PERCENTILES)
    removed = removal_masks(maps, PERCENTILES, most_relevant_first)
    ours = torch.stack(list(road_images(x, removed, 0.01, seed))).view(2, steps, *x.shape[1:])
    draws = draws_of(seed, 2, steps)
    peer_order = iter([(b, k) for k in range(steps) for b in range(2)])  # percentiles outside, inputs inside

    def our_noise(like, *args, **kwargs):
        b, k = next(peer_order)
        noise = draws[b][k].flatten(1)[:, removed[b, k].flatten()]
        assert noise.shape == like.shape, "the peer imputes other pixels than ours"
        return noise

    monkeypatch.setattr(torch, "randn_like", our_noise)
    peer = (ROADMostRelevantFirstAverage if most_relevant_first else ROADLeastRelevantFirstAverage)([100 - p for p in PERCENTILES])
    model = recording(resnet)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in target.indices]
    theirs = torch.from_numpy(peer(x, maps[:, 0].numpy(), targets, model))
    monkeypatch.undo()
    assert next(peer_order, None) is None  # one noise draw per input and percentile

    peer_images = torch.stack(model.seen[1::2], 1)  # each percentile: the clean batch, then the imputed one
    torch.testing.assert_close(ours, peer_images, rtol=0, atol=0)
    result = metric(RoadMorf if most_relevant_first else RoadLerf, seed=seed, batch_size=5).evaluate(inputs(resnet, x, maps, target, space))
    with torch.no_grad():
        logit_norm = resnet(ours.flatten(0, 1)).norm(dim=1).max()
    tolerance = float(rounding(resnet, "fc") * logit_norm) + 20 * FLOAT32_UNIT
    torch.testing.assert_close(result.values - probabilities(resnet, x, target), theirs, rtol=0, atol=tolerance)


def test_road_value_is_the_mean_of_its_curve(resnet, x, saliency, target, space):
    percentiles = [25.0, 50.0, 75.0]
    result = metric(RoadMorf, percentiles=percentiles).evaluate(inputs(resnet, x, saliency, target, space))
    assert result.curve.shape == (2, 3) and result.curve_steps == (25.0, 50.0, 75.0)
    torch.testing.assert_close(result.values, result.curve.mean(1))


def test_linear_imputation_reproduces_a_ramp_inside_the_image():
    """A plane is the weighted mean of its 8 neighbours (the weights are symmetric), so a hole away from
    the border is filled with the plane itself. The float32 products on the right-hand side are off by
    one rounding each, and the solution is a weighted average of them (the system is a discrete
    Dirichlet problem), then rounded to float32: 2 roundings of the largest |value|."""
    rows = torch.arange(16.0).view(16, 1)
    columns = torch.arange(16.0).view(1, 16)
    image = torch.stack([0.25 * rows - 0.5 * columns + 1, rows / 8 + columns / 16, (-rows / 4).expand(16, 16)]).unsqueeze(0)
    maps = torch.zeros(1, 1, 16, 16)
    maps[..., 3:9, 4:11] = 1.0  # 42 of 256 pixels: 16 %, all tied, so 10 % removes the whole block
    removed = removal_masks(maps, [10.0], True)
    assert torch.equal(removed[0, 0], maps[0, 0] == 1)
    imputed = next(road_images(image, removed, 0.0, 0))
    torch.testing.assert_close(imputed, image[0], rtol=0, atol=2 * FLOAT32_UNIT * float(image.abs().max()))


def test_a_map_that_removes_every_pixel_leaves_zero_plus_noise(resnet, x, target, space):
    """A constant map ties every pixel: all are removed at every percentile, nothing is left to
    interpolate from (the peer's solve returns NaN), and the image is the input space's 0 plus noise."""
    constant = torch.ones(2, 1, SIZE, SIZE)
    removed = removal_masks(constant, [10.0, 90.0], False)
    assert bool(removed.all())
    images = list(road_images(x, removed, 0.01, 3))
    draws = draws_of(3, 2, 2)
    for image, draw in zip(images, [d for per_input in draws for d in per_input]):
        assert torch.equal(image, 0.01 * draw)
    values = metric(RoadLerf, percentiles=[10.0, 90.0], seed=3).evaluate(inputs(resnet, x, constant, target, space)).values
    assert bool(torch.isfinite(values).all())


def test_road_is_seeded_and_leaves_model_inputs_and_global_rng_alone(resnet, x, saliency, target, space):
    before, rng = state(resnet), torch.get_rng_state()
    x_before, maps_before = x.clone(), saliency.clone()
    first = metric(RoadMorf, percentiles=[30.0, 60.0], seed=1).evaluate(inputs(resnet, x, saliency, target, space))
    again = metric(RoadMorf, percentiles=[30.0, 60.0], seed=1).evaluate(inputs(resnet, x, saliency, target, space))
    other = metric(RoadMorf, percentiles=[30.0, 60.0], seed=2).evaluate(inputs(resnet, x, saliency, target, space))
    assert torch.equal(first.curve, again.curve) and not torch.equal(first.curve, other.curve)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_untouched(resnet, before)
    assert torch.equal(x, x_before) and torch.equal(saliency, maps_before)


def test_road_batch_size_does_not_change_the_curve(resnet, x, saliency, target, space):
    """The noise is drawn per (input, percentile) in one order whatever the batching, so the images are
    the same; checked on a float64 copy of the model, where a forward's batch-dependent rounding is
    ~1e-15 and the float32 curve can differ by at most one ulp of 1 from the final cast."""
    model = copy.deepcopy(resnet).double()
    cases = inputs(model, x.double(), saliency.double(), target, space)
    one = metric(RoadLerf, percentiles=[20.0, 80.0], batch_size=1).evaluate(cases)
    three = metric(RoadLerf, percentiles=[20.0, 80.0], batch_size=3).evaluate(cases)
    torch.testing.assert_close(one.curve, three.curve, rtol=0, atol=2.0**-23 + 1e-12)


def test_road_sums_map_channels_and_takes_one_input(resnet, x, saliency, target, space):
    split = torch.cat([saliency * 0.25, saliency * 0.75, torch.zeros_like(saliency)], 1)
    assert torch.equal(removal_masks(split, PERCENTILES, True), removal_masks(split.sum(1, keepdim=True), PERCENTILES, True))
    one = metric(RoadMorf, percentiles=[50.0]).evaluate(inputs(resnet, x[:1], saliency[:1], target.take(torch.tensor([0])), space))
    assert one.values.shape == (1,)


# ---------------------------------------------------------------- average drop, increase in confidence


class GivenMaps:
    """A torchcam CAM extractor that hands back fixed maps (already normalized, at the input's size)."""

    def __init__(self, model: nn.Module, cams: torch.Tensor) -> None:
        self.model, self.cams = model, cams

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.cams]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """[B,H,W]: the paper's per-input normalization to [0, 1]."""
    low, high = maps.amin((1, 2, 3), keepdim=True), maps.amax((1, 2, 3), keepdim=True)
    return ((maps - low) / (high - low))[:, 0]


def torchcam_summary(model, images, cams, target) -> dict[str, float]:
    from torchcam.metrics import ClassificationMetric

    peer = ClassificationMetric(GivenMaps(model, cams), partial(torch.softmax, dim=-1))
    peer.update(images, class_idx=target.indices.tolist())
    return peer.summary()


def confidence_values(model, x, maps, target, space, where) -> tuple[torch.Tensor, torch.Tensor]:
    cases = inputs(model, x, maps, target, space)
    return (metric(AverageDrop, space=where).evaluate(cases).values, metric(IncreaseInConfidence, space=where).evaluate(cases).values)


def drop_tolerance(drops: torch.Tensor, clean: torch.Tensor) -> float:
    """torchcam divides by Y + 1e-7: its drop is ours times Y / (Y + 1e-7), off by drop * 1e-7 / Y; plus a
    few float32 roundings of numbers <= 1 in the division and the mean."""
    return float((drops * 1e-7 / clean).mean()) + 4 * FLOAT32_UNIT


def test_input_space_equals_torchcam(resnet, x, saliency, target, space):
    """Both multiply the normalized input by the same map and run the same two forwards on the same
    batches, so Y and O are equal bit for bit; the drops differ only by torchcam's epsilon (measured:
    1.5e-8 against a bound of 2.6e-7)."""
    drops, increases = confidence_values(resnet, x, saliency, target, space, "input")
    theirs = torchcam_summary(resnet, x, min_max(saliency), target)
    assert float(drops[0]) > 0.1 and increases.tolist() == [0.0, 1.0]  # measured: a drop of 0.26, and an increase
    clean = probabilities(resnet, x, target)
    assert float(drops.mean()) == pytest.approx(theirs["avg_drop"], rel=0, abs=drop_tolerance(drops, clean))
    assert float(increases.mean()) == theirs["conf_increase"]


def test_pytorch_grad_cams_drop_in_confidence_is_y_times_average_drop(resnet, x, saliency, target, space):
    """pytorch-grad-cam's DropInConfidence is max(0, Y - O), not relative; IncreaseInConfidence is ours.
    Y and O are the same numbers (same inputs, batches and softmax); ours divides by Y and the test
    multiplies back: two roundings of the drop (measured: 8.4e-8 relative)."""
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence as PeerIncrease
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    drops, increases = confidence_values(resnet, x, saliency, target, space, "input")
    cams = min_max(saliency).numpy()
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in target.indices]
    clean = probabilities(resnet, x, target)
    torch.testing.assert_close(drops * clean, torch.from_numpy(DropInConfidence()(x, cams, targets, resnet)), rtol=2 * FLOAT32_UNIT, atol=0)
    assert torch.equal(increases, torch.from_numpy(PeerIncrease()(x, cams, targets, resnet)))


def test_pixel_space_is_the_peers_on_a_model_that_normalizes_pixels(resnet):
    """torchcam fed pixels p through a model that normalizes them: its masked input is
    ((E p) - mean) / std, ours from_pixels(E * to_pixels(x)). On 8-bit-like pixels (multiples of 1/256)
    with mean 0.5 and power-of-two stds every normalization is exact both ways, so the inputs, hence
    Y and O, are equal bit for bit; the drops differ by torchcam's epsilon only (measured: 6.0e-8
    against a bound of 3.0e-7)."""
    exact = PixelSpace.from_stats([0.5, 0.5, 0.5], [0.25, 0.5, 0.125])
    pixels = torch.randint(0, 257, (2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(6)) / 256
    x = exact.from_pixels(pixels)
    assert torch.equal(exact.to_pixels(x), pixels)
    with torch.no_grad():
        logits = resnet(x)
    target = ClassTarget(torch.stack([logits[0].argmax(), logits[1].argmin()]))  # measured: a drop of 0.96, an increase
    maps = vizkit.create_method("saliency").attribute(resnet, x, target, mean=[0.5] * 3, std=[0.25, 0.5, 0.125])
    drops, increases = confidence_values(resnet, x, maps, target, exact, "pixels")

    class Normalizing(nn.Module):
        def forward(self, images):
            return resnet((images - exact.mean) / exact.std)

    theirs = torchcam_summary(Normalizing(), pixels, min_max(maps), target)
    assert float(drops.mean()) == pytest.approx(theirs["avg_drop"], rel=0, abs=drop_tolerance(drops, probabilities(resnet, x, target)))
    assert float(increases.mean()) == theirs["conf_increase"] and increases.tolist() == [0.0, 1.0]


def test_pixel_space_turns_removed_pixels_black_and_input_space_to_the_mean_colour(x, space):
    maps = torch.zeros(2, 1, SIZE, SIZE)
    maps[..., :, : SIZE // 2] = 3.0  # left half kept (normalized to 1), right half removed (0)
    cases = inputs(None, x, maps, None, space)
    in_pixels, in_input = explanation_images(cases, "pixels"), explanation_images(cases, "input")
    assert torch.equal(in_pixels[..., : SIZE // 2], x[..., : SIZE // 2]) and torch.equal(in_input[..., : SIZE // 2], x[..., : SIZE // 2])
    assert torch.equal(in_pixels[..., SIZE // 2 :], space.fill(0.0, x).expand(2, 3, SIZE, SIZE // 2))
    assert bool((in_input[..., SIZE // 2 :] == 0).all())


@pytest.mark.parametrize("where", ["pixels", "input"])
def test_a_constant_map_keeps_the_image_so_nothing_drops_or_rises(resnet, x, target, space, where):
    """A constant map ranks no pixel above another and is taken as 1 everywhere: the explanation image
    is x bit for bit, so O = Y exactly (same forward, same batch)."""
    drops, increases = confidence_values(resnet, x, torch.full((2, 1, SIZE, SIZE), 0.3), target, space, where)
    assert drops.tolist() == [0.0, 0.0] and increases.tolist() == [0.0, 0.0]


class MeanProbe(nn.Module):
    """Class 1's logit is 4 times the input's mean, class 0's is 0: p_1 = sigmoid(4 mean(x))."""

    def forward(self, images):
        logit = 4 * images.mean((1, 2, 3))
        return torch.stack([torch.zeros_like(logit), logit], 1)


def test_drop_and_increase_on_a_probe_with_known_probabilities():
    """Input 0 keeps the half whose values are positive (its mean rises: an increase, no drop), input 1
    the negative half (a drop). Inputs on a 1/8 grid make every sum exact, so Y and O are within a few
    float32 roundings (< 2^-21) of the float64 reference; the drop divides their difference by Y >= 0.25:
    within 3e-6."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randint(1, 9, (2, 3, 8, 8), generator=generator) / 8
    x[..., 4:] *= -1  # right half negative
    maps = torch.zeros(2, 1, 8, 8)
    maps[0, ..., :4] = 1.0  # keeps the positive half
    maps[1, ..., 4:] = 1.0  # keeps the negative half
    target = ClassTarget(torch.tensor([1, 1]))
    drops, increases = confidence_values(MeanProbe(), x, maps, target, PixelSpace.identity(), "pixels")
    clean = torch.sigmoid(4 * x.double().mean((1, 2, 3)))
    masked = torch.sigmoid(4 * (x.double() * maps.double()).mean((1, 2, 3)))
    assert bool((clean >= 0.25).all())
    torch.testing.assert_close(drops.double(), (clean - masked).clamp(min=0) / clean, rtol=0, atol=3e-6)
    assert increases.tolist() == [1.0, 0.0] and drops[0] == 0 and drops[1] > 0.1


def test_confidence_sums_map_channels_and_leaves_model_inputs_and_rng_alone(resnet, x, saliency, target, space):
    before, rng = state(resnet), torch.get_rng_state()
    x_before, maps_before = x.clone(), saliency.clone()
    split = torch.cat([saliency * 0.5, saliency * 0.5], 1)
    summed = confidence_values(resnet, x, split, target, space, "pixels")
    plain = confidence_values(resnet, x, saliency, target, space, "pixels")
    torch.testing.assert_close(summed, plain, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_untouched(resnet, before)
    assert torch.equal(x, x_before) and torch.equal(saliency, maps_before)


# ---------------------------------------------------------------- configs and inputs refused


@pytest.mark.parametrize("cls", ALL, ids=lambda cls: cls.name)
def test_defaults_build_without_the_registry(cls):
    config = configure(cls, cls.name, {}).config
    if cls in (RoadMorf, RoadLerf):
        assert config.percentiles == PERCENTILES and config.noise == 0.01 and config.batch_size == 16
    else:
        assert config.space == "pixels"


@pytest.mark.parametrize(
    "cls, fields, message",
    [
        (RoadMorf, {"percentiles": []}, "percentiles is empty"),
        (RoadMorf, {"percentiles": [0, 50]}, "strictly between 0 and 100"),
        (RoadLerf, {"percentiles": [50, 100]}, "strictly between 0 and 100"),
        (RoadLerf, {"percentiles": [float("nan")]}, "strictly between 0 and 100"),
        (RoadMorf, {"percentiles": [True]}, "strictly between 0 and 100"),
        (RoadMorf, {"percentiles": "10,20"}, "must be a list"),
        (RoadMorf, {"batch_size": 0}, "batch_size must be a positive integer"),
        (RoadLerf, {"noise": -0.01}, "noise must be a non-negative number"),
        (RoadLerf, {"seed": -1}, "seed must be an integer"),
        (RoadMorf, {"steps": 4}, "unknown field"),
        (AverageDrop, {"space": "normalized"}, "space must be pixels"),
        (IncreaseInConfidence, {"space": "image"}, "space must be pixels"),
    ],
)
def test_bad_configs_are_refused_in_one_line_naming_the_metric(cls, fields, message):
    with pytest.raises(ConfigError, match=message) as error:
        configure(cls, cls.name, fields)
    text = str(error.value)
    assert text.startswith(f"{cls.name}:") and "\n" not in text


@pytest.mark.parametrize("cls", ALL, ids=lambda cls: cls.name)
def test_a_class_target_and_fitting_maps_are_required(cls, resnet, x, saliency, space, target):
    assert cls.needs_class
    channel = types.SimpleNamespace(kind="channel")
    with pytest.raises(ConfigError, match=f"{cls.name} reads a class's probability"):
        metric(cls).evaluate(inputs(resnet, x, saliency, channel, space))
    with pytest.raises(ConfigError, match="do not fit the input"):
        metric(cls).evaluate(inputs(resnet, x, saliency[..., :16, :16], target, space))
