"""The metrics (deletion, insertion, pointing game, mask energy, cascading randomization) and their
registry: exact behaviour on hand-made maps and models, sanity on the embedded shapes model."""
from __future__ import annotations

import copy
import dataclasses
import re
import textwrap

import pytest
import torch
from torch import nn

import vizkit
from tiny_models import single_thread
from vizkit.core.data import load_shapes
from vizkit.core.errors import ConfigError
from vizkit.methods.base import AttributionMethod
from vizkit.cli.configs import store_metric_configs as store_configs
from vizkit.metrics import METRICS, create_metric, get_metric, metric_from_config
from vizkit.metrics.base import MetricInputs
from vizkit.probes.baselines import gaussian_blur
from vizkit.metrics.randomization import average_ranks, cascade_blocks, spearman
from vizkit.core.models import data_config, load_model
from vizkit.core.pixels import PixelSpace
from vizkit.core.targets import ClassTarget, resolve_target


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@dataclasses.dataclass
class Shapes:
    model: nn.Module
    pixels: PixelSpace
    x: torch.Tensor
    masks: torch.Tensor
    target: ClassTarget

    def inputs(self, maps: torch.Tensor, method=None, target=None) -> MetricInputs:
        return MetricInputs(self.model, self.x, maps, target or self.target, self.pixels, method, self.masks)


@pytest.fixture(scope="module")
def shapes() -> Shapes:
    """The first six test-split shapes through the embedded model, with their exact masks and labels."""
    model = load_model("embedded")
    samples = load_shapes(6, "test", 0, data_config(model))
    pixels = PixelSpace.for_model(model)
    x = pixels.from_pixels(torch.stack([s.pixels for s in samples]))
    return Shapes(model, pixels, x, torch.stack([s.mask for s in samples]), ClassTarget(torch.tensor([s.label for s in samples])))


@pytest.fixture(scope="module")
def saliency_maps(shapes) -> torch.Tensor:
    return vizkit.create_method("saliency").attribute(shapes.model, shapes.x, shapes.target)


def probability(model: nn.Module, x: torch.Tensor, target: ClassTarget) -> torch.Tensor:
    with torch.no_grad():
        return target.select(model(x).softmax(1))


# ---------------------------------------------------------------- deletion and insertion: exact, on a probe


class BlackFraction(nn.Module):
    """Class 1's probability is the fraction of positions whose channels all equal ``value`` (the
    substrate, in the model's input space); it records every image it sees."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.value = value
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += list(x.clone())
        fraction = (x == self.value).all(1).flatten(1).float().mean(1)
        return torch.stack([torch.log1p(-fraction), torch.log(fraction)], 1)  # softmax: [1-f, f]


def probe_inputs(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, pixels: PixelSpace | None = None) -> MetricInputs:
    return MetricInputs(model, x, maps, ClassTarget(torch.ones(len(x), dtype=torch.long)), pixels or PixelSpace.identity(), None)


def stable_descending(values: list[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda i: -values[i])  # Python's sort is stable


def test_deletion_removes_the_most_important_pixels_first_ties_in_row_major_order():
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.1  # no pixel is black
    maps = torch.tensor([3.0, 1, 1, 2, 0, 2, 1, 3, 0, 0, 1, 2, 3, 1, 0, 2]).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    maps[1] = maps[1].flip(-1)
    probe = BlackFraction()
    result = create_metric("deletion", steps=4, batch_size=3).evaluate(probe_inputs(probe, x, maps))
    unmatched = list(probe.seen)
    for b in range(2):
        order = stable_descending(maps[b].flatten().tolist())
        for n in (0, 4, 8, 12, 16):  # floor(k * 16 / 4) pixels at step k
            expected = x[b].clone().flatten(1)
            expected[:, order[:n]] = 0.0
            match = next((i for i, image in enumerate(unmatched) if torch.equal(image.flatten(1), expected)), None)
            assert match is not None, f"input {b}: no image with exactly its top {n} pixels deleted"
            unmatched.pop(match)
    assert not unmatched
    torch.testing.assert_close(result.curve, torch.tensor([[0.0, 0.25, 0.5, 0.75, 1.0]] * 2))


def test_insertion_starts_from_the_substrate_and_puts_the_most_important_pixels_back_first():
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1)) + 0.1
    maps = torch.arange(16.0).view(1, 1, 4, 4)  # the bottom-right pixel is the most important
    probe = BlackFraction()
    result = create_metric("insertion", steps=2, substrate="black").evaluate(probe_inputs(probe, x, maps))
    torch.testing.assert_close(result.curve, torch.tensor([[1.0, 0.5, 0.0]]))
    half = next(image for image in probe.seen if int((image == 0).all(0).sum()) == 8)
    assert torch.equal(half[:, 2:], x[0, :, 2:]) and bool((half[:, :2] == 0).all())


def test_steps_switch_floor_of_k_n_over_steps_pixels():
    x = torch.rand(1, 3, 3, 3, generator=torch.Generator().manual_seed(8)) + 0.1  # N = 9 pixels, 2 steps
    result = create_metric("deletion", steps=2).evaluate(probe_inputs(BlackFraction(), x, torch.rand(1, 1, 3, 3)))
    torch.testing.assert_close(result.curve, torch.tensor([[0.0, 4 / 9, 1.0]]))


def test_perturbation_orders_pixels_by_the_channel_sum():
    x = torch.rand(1, 3, 1, 4, generator=torch.Generator().manual_seed(9)) + 0.1
    maps = torch.tensor([[5.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 1.0], [-6.0, 2.0, 3.0, 1.0]]).view(1, 3, 1, 4)  # sums 1, 4, 3, 2
    probe = BlackFraction()
    create_metric("deletion", steps=4).evaluate(probe_inputs(probe, x, maps))
    one_deleted = next(image for image in probe.seen if int((image == 0).all(0).sum()) == 1)
    assert (one_deleted == 0).all(0).flatten().tolist() == [False, True, False, False]


def test_substrates_are_pixel_values_converted_to_the_models_normalization():
    pixels = PixelSpace.from_stats([0.5, 0.4, 0.3], [0.25, 0.2, 0.1])
    x = pixels.from_pixels(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)))
    maps = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for substrate, pixel_value in (("black", 0.0), ("gray", 0.5)):
        probe = BlackFraction()
        create_metric("deletion", steps=1, substrate=substrate).evaluate(probe_inputs(probe, x, maps, pixels))
        fully_deleted = probe.seen[-1]
        torch.testing.assert_close(fully_deleted, pixels.fill(pixel_value, x)[0].expand_as(fully_deleted))
    probe = BlackFraction()
    create_metric("insertion", steps=1, substrate="blur").evaluate(probe_inputs(probe, x, maps, pixels))
    torch.testing.assert_close(probe.seen[0], pixels.from_pixels(gaussian_blur(pixels.to_pixels(x)))[0])


def test_blur_is_the_rise_kernel_with_reflected_borders():
    from torchvision.transforms.functional import gaussian_blur as torchvision_blur

    image = torch.rand(2, 3, 20, 17, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(gaussian_blur(image), torchvision_blur(image, kernel_size=[11, 11], sigma=[5.0, 5.0]))
    constant = torch.full((1, 3, 4, 4), 0.3)  # too small to reflect a radius of 5: replicated, still constant
    torch.testing.assert_close(gaussian_blur(constant), constant)


def test_value_is_the_trapezoid_area_of_the_curve(shapes, saliency_maps):
    for name in ("deletion", "insertion"):
        result = create_metric(name, steps=8).evaluate(shapes.inputs(saliency_maps))
        curve = result.curve
        assert curve.shape == (6, 9) and result.curve_steps == tuple(k / 8 for k in range(9))
        torch.testing.assert_close(result.values, ((curve[:, 1:] + curve[:, :-1]) / 2).sum(1) / 8)


def test_deletion_runs_from_the_clean_probability_to_the_substrates(shapes, saliency_maps):
    curve = create_metric("deletion", steps=4).evaluate(shapes.inputs(saliency_maps)).curve
    torch.testing.assert_close(curve[:, 0], probability(shapes.model, shapes.x, shapes.target))
    black = shapes.pixels.fill(0.0, shapes.x).expand_as(shapes.x)
    torch.testing.assert_close(curve[:, -1], probability(shapes.model, black, shapes.target))


def test_insertion_runs_from_the_blurred_image_to_the_clean_probability(shapes, saliency_maps):
    curve = create_metric("insertion", steps=4).evaluate(shapes.inputs(saliency_maps)).curve
    blurred = shapes.pixels.from_pixels(gaussian_blur(shapes.pixels.to_pixels(shapes.x)))
    torch.testing.assert_close(curve[:, 0], probability(shapes.model, blurred, shapes.target))
    torch.testing.assert_close(curve[:, -1], probability(shapes.model, shapes.x, shapes.target))


def test_batch_size_does_not_change_the_curve(shapes, saliency_maps):
    """In float32 a convolution's rounding depends on its batch size and the CPU (the curves differed by
    6e-7 here against a fitted atol of 1e-6), so the batching is checked on a float64 copy of the model:
    the probabilities then differ by ~1e-15 and the float32 curve by at most one ulp of 1 (2^-23) from
    the final cast (measured: 0, bit-equal)."""
    model = copy.deepcopy(shapes.model).double()
    inputs = Shapes(model, shapes.pixels, shapes.x.double(), shapes.masks, shapes.target).inputs(saliency_maps.double())
    one = create_metric("deletion", steps=4, batch_size=1).evaluate(inputs)
    odd = create_metric("deletion", steps=4, batch_size=7).evaluate(inputs)
    torch.testing.assert_close(one.curve, odd.curve, rtol=0, atol=2.0**-23 + 1e-12)


def test_a_predicted_target_scores_like_its_classes(shapes, saliency_maps):
    predicted = resolve_target(None, shapes.model, shapes.x)
    by_prediction = create_metric("deletion", steps=4).evaluate(shapes.inputs(saliency_maps, target=predicted))
    by_class = create_metric("deletion", steps=4).evaluate(shapes.inputs(saliency_maps, target=ClassTarget(predicted.indices)))
    torch.testing.assert_close(by_prediction.curve, by_class.curve)


def test_deletion_of_a_map_is_insertion_of_its_negation(shapes, saliency_maps):
    # top-k removed == bottom-(N-k) kept: the two curves are mirror images (N = 128*128 is a multiple of 16)
    noise = torch.rand(saliency_maps.shape, generator=torch.Generator().manual_seed(5)) * 1e-9  # no ties
    deletion = create_metric("deletion", steps=16, substrate="gray").evaluate(shapes.inputs(saliency_maps + noise))
    insertion = create_metric("insertion", steps=16, substrate="gray").evaluate(shapes.inputs(-(saliency_maps + noise)))
    torch.testing.assert_close(deletion.curve, insertion.curve.flip(1), rtol=0, atol=1e-5)


def test_saliency_beats_its_inverse_on_the_embedded_model(shapes, saliency_maps):
    scores = {
        (name, sign): create_metric(name, steps=16).evaluate(shapes.inputs(sign * saliency_maps)).values.mean().item()
        for name in ("deletion", "insertion") for sign in (1, -1)
    }
    # measured: deletion 0.18 vs 0.43, insertion 0.97 vs 0.77 (six shapes, default substrates)
    assert scores["deletion", 1] < scores["deletion", -1] - 0.15
    assert scores["insertion", 1] > scores["insertion", -1] + 0.1


def test_perturbation_metrics_need_a_class_target(shapes, saliency_maps):
    channel = resolve_target("channel:layer4:3", shapes.model, shapes.x)
    with pytest.raises(ConfigError, match="deletion reads a class's probability"):
        create_metric("deletion").evaluate(shapes.inputs(saliency_maps, target=channel))


# ---------------------------------------------------------------- pointing game


def pointing(maps: torch.Tensor, masks: torch.Tensor, **fields) -> list[float]:
    inputs = MetricInputs(None, torch.zeros(len(maps), 3, *maps.shape[-2:]), maps, None, PixelSpace.identity(), None, masks)
    return create_metric("pointing_game", **fields).evaluate(inputs).values.tolist()


def square_mask(size: int = 64, top: int = 20, bottom: int = 30, left: int = 20, right: int = 30) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size, dtype=torch.bool)
    mask[..., top:bottom, left:right] = True  # rows 20..29, columns 20..29
    return mask


def peak_at(y: int, x: int, size: int = 64, channels: int = 1) -> torch.Tensor:
    maps = torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(y * size + x)) * 0.5
    maps[..., y, x] = 1.0
    return maps


@pytest.mark.parametrize(
    "y, x, hit",
    [
        (25, 25, 1.0),  # on the object
        (25, 29 + 15, 1.0),  # 15 pixels right of the last mask column
        (25, 29 + 16, 0.0),  # 16 pixels
        (20 - 15, 25, 1.0),  # 15 pixels above the first row
        (29 + 9, 29 + 12, 1.0),  # diagonal: 9^2 + 12^2 = 15^2, on the disk's edge
        (29 + 11, 29 + 11, 0.0),  # diagonal: 11^2 + 11^2 = 242 > 225, inside a square window but off the disk
        (60, 2, 0.0),  # far away
    ],
)
def test_pointing_game_tolerance_is_a_disk_of_15_pixels(y, x, hit):
    assert pointing(peak_at(y, x), square_mask()) == [hit]


def test_pointing_game_tolerance_zero_asks_for_the_object_itself():
    assert pointing(torch.cat([peak_at(25, 25), peak_at(25, 30)]), square_mask().repeat(2, 1, 1, 1), tolerance=0) == [1.0, 0.0]


def test_pointing_game_takes_the_first_of_equal_maxima():
    first_on_object = torch.zeros(1, 1, 64, 64)
    first_on_object[..., 25, 25] = first_on_object[..., 60, 60] = 1.0
    first_off_object = torch.zeros(1, 1, 64, 64)
    first_off_object[..., 2, 60] = first_off_object[..., 25, 25] = 1.0
    assert pointing(torch.cat([first_on_object, first_off_object]), square_mask().repeat(2, 1, 1, 1)) == [1.0, 0.0]


def test_pointing_game_sums_channels_before_finding_the_maximum():
    maps = torch.zeros(1, 3, 64, 64)
    maps[0, 0, 60, 2] = 5.0  # the largest single value, off the object
    maps[:, :, 25, 25] = 2.0  # the largest sum (6), on it
    assert pointing(maps, square_mask()) == [1.0]


def test_pointing_game_on_the_embedded_model_with_saliency(shapes, saliency_maps):
    values = create_metric("pointing_game").evaluate(shapes.inputs(saliency_maps)).values
    assert values.tolist() == [1.0] * 6  # measured: every saliency maximum lies on (or by) the shape


# ---------------------------------------------------------------- mask energy


def energy(maps: torch.Tensor, masks: torch.Tensor) -> list[float]:
    inputs = MetricInputs(None, torch.zeros(len(maps), 3, *maps.shape[-2:]), maps, None, PixelSpace.identity(), None, masks)
    return create_metric("mask_energy").evaluate(inputs).values.tolist()


def test_mask_energy_on_hand_made_maps():
    mask = square_mask(size=40)
    inside = mask.float()
    outside = 1 - inside
    half = inside + outside * (inside.sum() / outside.sum())  # equal mass inside and out
    against = inside - 5 * outside  # negative evidence outside is not energy
    nothing_positive = -torch.rand(1, 1, 40, 40)
    maps = torch.cat([inside, outside, half, against, nothing_positive, torch.zeros(1, 1, 40, 40)])
    assert energy(maps, mask.repeat(6, 1, 1, 1)) == pytest.approx([1.0, 0.0, 0.5, 1.0, 0.0, 0.0], abs=1e-6)


def test_mask_energy_sums_channels_first():
    mask = square_mask(size=40)
    maps = torch.zeros(1, 3, 40, 40)
    maps[0, 0] = 1.0
    maps[0, 1] = -1.0 * (~mask[0, 0])  # cancels the first channel outside the object
    assert energy(maps, mask) == pytest.approx([1.0])


def test_mask_metrics_need_masks(shapes, saliency_maps):
    inputs = dataclasses.replace(shapes.inputs(saliency_maps), masks=None)
    for name in ("pointing_game", "mask_energy"):
        with pytest.raises(ConfigError, match=f"{name} compares maps with object masks.*data=shapes"):
            create_metric(name).evaluate(inputs)
    with pytest.raises(ConfigError, match="do not match"):
        create_metric("mask_energy").evaluate(dataclasses.replace(shapes.inputs(saliency_maps), masks=shapes.masks[..., :64, :64]))


# ---------------------------------------------------------------- randomization


EMBEDDED_BLOCKS = ["fc", "layer4.0", "layer3.0", "layer2.0", "layer1.0", "bn1", "conv1.6", "conv1.4", "conv1.3", "conv1.1", "conv1.0"]


def test_cascade_blocks_run_from_the_head_to_the_stem(shapes):
    import timm

    assert [name for name, _ in cascade_blocks(shapes.model)] == EMBEDDED_BLOCKS  # its stem is an nn.Sequential
    resnet18 = timm.create_model("resnet18", pretrained=False, num_classes=3)
    expected = ["fc", "layer4.1", "layer4.0", "layer3.1", "layer3.0", "layer2.1", "layer2.0", "layer1.1", "layer1.0", "bn1", "conv1"]
    assert [name for name, _ in cascade_blocks(resnet18)] == expected


def test_randomization_curve_has_one_step_per_block_or_max_steps(shapes, saliency_maps):
    method = vizkit.create_method("saliency")
    full = create_metric("randomization").evaluate(shapes.inputs(saliency_maps, method))
    assert list(full.curve_steps) == EMBEDDED_BLOCKS and full.curve.shape == (6, len(EMBEDDED_BLOCKS))
    torch.testing.assert_close(full.values, full.curve.mean(1))
    top = create_metric("randomization", max_steps=3).evaluate(shapes.inputs(saliency_maps, method))
    assert list(top.curve_steps) == EMBEDDED_BLOCKS[:3]
    torch.testing.assert_close(top.curve, full.curve[:, :3])  # a block's weights do not depend on max_steps


def test_randomization_is_seeded_and_leaves_model_and_global_rng_alone(shapes, saliency_maps):
    method = vizkit.create_method("saliency")
    state = {key: value.clone() for key, value in shapes.model.state_dict().items()}
    rng = torch.get_rng_state()
    first = create_metric("randomization", max_steps=2, seed=3).evaluate(shapes.inputs(saliency_maps, method))
    assert torch.equal(torch.get_rng_state(), rng)
    again = create_metric("randomization", max_steps=2, seed=3).evaluate(shapes.inputs(saliency_maps, method))
    other = create_metric("randomization", max_steps=2, seed=4).evaluate(shapes.inputs(saliency_maps, method))
    assert torch.equal(first.curve, again.curve) and not torch.equal(first.curve, other.curve)
    after = shapes.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[key], state[key]) for key in state)
    assert not shapes.model.training
    for module in shapes.model.modules():
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def test_saliency_decorrelates_as_the_embedded_model_is_randomized(shapes, saliency_maps):
    method = vizkit.create_method("saliency")
    curve = create_metric("randomization").evaluate(shapes.inputs(saliency_maps, method)).curve
    # measured (mean of six shapes): 0.74 after fc, 0.47 after layer4, 0.22 with every block randomized
    assert bool((curve[:, -1] < curve[:, 0] - 0.25).all())
    assert curve[:, 0].mean() > 0.6 and curve[:, -1].mean() < 0.35


class Recording(AttributionMethod):
    """Records what randomization hands the method; the map is a fixed ramp."""

    name = "recording"
    description = "test probe"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[nn.Module, bool, list[int]]] = []

    def compute(self, model, x, target, pixels):
        self.calls.append((model, model.training, target.indices.tolist()))
        return torch.arange(x.shape[-2] * x.shape[-1], dtype=torch.float32).view(1, 1, *x.shape[-2:]).repeat(len(x), 1, 1, 1)


def test_randomization_explains_the_trained_models_classes_on_an_eval_mode_copy(shapes, saliency_maps):
    method = Recording()
    create_metric("randomization", max_steps=3).evaluate(shapes.inputs(saliency_maps, method, target=ClassTarget(torch.tensor([5, 4, 3, 2, 1, 0]))))
    assert [(training, indices) for _, training, indices in method.calls] == [(False, [5, 4, 3, 2, 1, 0])] * 3
    assert all(model is not shapes.model for model, _, _ in method.calls)


def test_randomization_compares_absolute_maps_unless_told_otherwise(shapes):
    ramp = Recording().compute(shapes.model, shapes.x, shapes.target, shapes.pixels)
    for absolute, correlation in ((True, 1.0), (False, -1.0)):
        metric = create_metric("randomization", max_steps=1, absolute=absolute)
        result = metric.evaluate(shapes.inputs(-ramp, Recording()))  # the trained map is the negated ramp
        torch.testing.assert_close(result.values, torch.full((6,), correlation))


def test_randomization_rebinds_a_layer_target_to_the_copy(shapes):
    method = vizkit.create_method("saliency")
    channel = resolve_target("channel:layer4:1", shapes.model, shapes.x)  # a channel no shape leaves at 0
    maps = method.attribute(shapes.model, shapes.x, channel)
    result = create_metric("randomization", max_steps=2).evaluate(shapes.inputs(maps, method, target=channel))
    assert result.curve.shape == (6, 2) and bool(result.curve.isfinite().all())
    torch.testing.assert_close(result.curve[:, 0], torch.ones(6), rtol=0, atol=1e-6)  # fc does not feed layer4's channel


def test_randomization_needs_the_method(shapes, saliency_maps):
    with pytest.raises(ConfigError, match="pass the method that made the maps"):
        create_metric("randomization").evaluate(shapes.inputs(saliency_maps, method=None))


def naive_average_ranks(values: list[float]) -> list[float]:
    return [sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2 for v in values]


def test_average_ranks_share_ties():
    values = torch.tensor([[0.0, 2.0, 2.0, 1.0, 0.0, 0.0, 5.0]])
    assert average_ranks(values).tolist() == [[1.0, 4.5, 4.5, 3.0, 1.0, 1.0, 6.0]]
    many_ties = torch.randint(0, 4, (3, 200), generator=torch.Generator().manual_seed(6)).double()
    assert average_ranks(many_ties).tolist() == [naive_average_ranks(row) for row in many_ties.tolist()]


def test_spearman_is_pearson_of_average_ranks():
    """The reference is float64 throughout (it was built in float32, whose rounding over 300 terms,
    ~sqrt(300) * 6e-8 = 1e-6 relative, exceeds float64's default rtol 1e-7: measured 2.9e-8 here only
    by luck). In float64 both sides round at ~sqrt(300) * 1.1e-16 = 2e-15 relative: rtol 1e-7 holds
    with a 5e7 margin."""
    generator = torch.Generator().manual_seed(7)
    a = torch.randint(0, 5, (2, 300), generator=generator).double()  # Grad-CAM-like: many ties
    b = a + torch.randint(0, 3, (2, 300), generator=generator).double()
    ranks_a = torch.tensor([naive_average_ranks(row) for row in a.tolist()], dtype=torch.float64)
    ranks_b = torch.tensor([naive_average_ranks(row) for row in b.tolist()], dtype=torch.float64)
    expected = torch.stack([torch.corrcoef(torch.stack([ra, rb]))[0, 1] for ra, rb in zip(ranks_a, ranks_b)])
    assert expected.dtype == torch.float64
    torch.testing.assert_close(spearman(a, b), expected)
    monotone = torch.rand(1, 50, generator=generator, dtype=torch.float64)
    assert spearman(monotone, monotone.exp()).item() == pytest.approx(1.0)
    assert spearman(monotone, -monotone).item() == pytest.approx(-1.0)
    assert spearman(torch.zeros(1, 50, dtype=torch.float64), monotone).item() == 0.0  # a constant map has no order


# ---------------------------------------------------------------- registry and configuration


def test_registry_holds_the_built_in_metrics_with_their_direction():
    built_in = {name: cls for name, cls in METRICS.items() if cls.__module__.startswith("vizkit.metrics.")}  # plugins may add more
    assert {name: cls.better for name, cls in built_in.items()} == {
        "deletion": "lower", "insertion": "higher", "pointing_game": "higher", "mask_energy": "higher", "randomization": "lower",
        "road_morf": "lower", "road_lerf": "higher", "average_drop": "lower", "increase_in_confidence": "higher",
        "infidelity": "lower", "sensitivity_max": "lower",
    }
    assert {name for name, cls in built_in.items() if cls.needs_masks} == {"pointing_game", "mask_energy"}
    assert {name for name, cls in built_in.items() if cls.needs_class} == {"deletion", "insertion", "road_morf", "road_lerf", "average_drop",
                                                                          "increase_in_confidence", "infidelity"}
    assert create_metric("deletion").config.substrate == "black" and create_metric("insertion").config.substrate == "blur"


def test_unknown_metric_names_close_matches():
    with pytest.raises(ConfigError, match="unknown metric 'deletoin'.*closest: deletion"):
        get_metric("deletoin")


def test_unknown_field_names_the_metric_and_its_fields():
    with pytest.raises(ConfigError, match=r"deletion: unknown field\(s\) step; its fields are: batch_size, steps, substrate"):
        create_metric("deletion", step=8)
    with pytest.raises(ConfigError, match=r"mask_energy: unknown field\(s\) tolerance; its fields are: \(none\)"):
        create_metric("mask_energy", tolerance=2)


@pytest.mark.parametrize(
    "name, fields, message",
    [
        ("deletion", {"steps": 0}, "deletion: steps must be a positive integer, got 0"),
        ("insertion", {"batch_size": 0}, "insertion: batch_size must be a positive integer, got 0"),
        ("insertion", {"steps": 2.5}, "insertion: steps must be a positive integer, got 2.5"),
        ("deletion", {"substrate": "white"}, "deletion: substrate must be one of black, gray, blur, got 'white'"),
        ("pointing_game", {"tolerance": -1}, "pointing_game: tolerance must be a non-negative integer"),
        ("randomization", {"max_steps": -1}, "randomization: max_steps must be a non-negative integer"),
        ("randomization", {"absolute": "yes"}, "randomization: absolute must be true or false"),
        ("randomization", {"seed": -1}, "randomization: seed must be an integer in [0, 2**63)"),
    ],
)
def test_bad_values_name_the_metric(name, fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_metric(name, **fields)


def test_metric_from_config_checks_keys_against_the_fields():
    from omegaconf import OmegaConf

    assert metric_from_config("deletion", OmegaConf.create({"steps": 8})).config.steps == 8
    assert metric_from_config("pointing_game", {"tolerance": 3}).config.tolerance == 3
    with pytest.raises(ConfigError, match=r"pointing_game: unknown field\(s\) foo"):
        metric_from_config("pointing_game", OmegaConf.create({"tolerance": 15, "foo": 1}))


def test_store_configs_composes_a_list_default_of_metrics(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    store_configs()
    (tmp_path / "config.yaml").write_text(textwrap.dedent("""\
        defaults:
          - metrics: [deletion, pointing_game]
          - _self_
        """))
    (tmp_path / "none.yaml").write_text("defaults:\n  - metrics: []\n  - _self_\nmetrics: {}\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        default = compose(config_name="config")
        chosen = compose(config_name="config", overrides=["metrics=[insertion,randomization]", "metrics.insertion.steps=64"])
        empty = compose(config_name="none")
        from_empty = compose(config_name="none", overrides=["metrics=[mask_energy]"])
        with pytest.raises(ConfigCompositionException, match="metrics.deletion.steps=many"):
            compose(config_name="config", overrides=["metrics.deletion.steps=many"])  # typed by the dataclass
    assert set(default.metrics) == {"deletion", "pointing_game"}
    assert default.metrics.deletion.steps == 32 and default.metrics.pointing_game.tolerance == 15
    built = {name: metric_from_config(name, node) for name, node in chosen.metrics.items()}
    assert set(built) == {"insertion", "randomization"} and built["insertion"].config.steps == 64
    assert dict(empty.metrics) == {} and set(from_empty.metrics) == {"mask_energy"}


def test_the_registry_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, vizkit.metrics as m; m.describe_metrics(); m.create_metric('deletion'); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_metrics_do_not_modify_inputs(shapes, saliency_maps):
    maps, x = saliency_maps.clone(), shapes.x.clone()
    for name in ("deletion", "insertion", "pointing_game", "mask_energy"):
        create_metric(name, **({"steps": 2} if name in ("deletion", "insertion") else {})).evaluate(shapes.inputs(saliency_maps))
    assert torch.equal(maps, saliency_maps) and torch.equal(x, shapes.x)

