"""Infidelity and max-sensitivity (Yeh et al. 2019): equal to captum's ``infidelity`` and
``sensitivity_max`` given a perturb_func that returns our draws, exact on a linear model, seeded,
harmless to the model, the inputs and the global RNG, independent of ``batch_size`` and of the
batch's other inputs, and refusing bad configs with one-line errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from tiny_models import assert_untouched, pixel_batch, single_thread, state, timm_model
from vizkit.core.configured import configure
from vizkit.core.errors import ConfigError
from vizkit.core.pixels import PixelSpace
from vizkit.core.targets import ClassTarget, resolve_target
from vizkit.methods.attribution.saliency import Saliency
from vizkit.metrics.base import MetricInputs
from vizkit.metrics.infidelity import Infidelity
from vizkit.metrics.sensitivity import SensitivityMax

captum_attr = pytest.importorskip("captum.attr")
captum_metrics = pytest.importorskip("captum.metrics")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLASSES = 5
BATCH = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@dataclasses.dataclass
class Case:
    model: nn.Module
    x: torch.Tensor
    maps: torch.Tensor
    target: ClassTarget
    space: PixelSpace

    def inputs(self, x=None, maps=None, target=None) -> MetricInputs:
        return MetricInputs(self.model, self.x if x is None else x, self.maps if maps is None else maps,
                            target or self.target, self.space, Saliency())


@pytest.fixture(scope="module")
def case() -> Case:
    """A float64 copy of test_resnet (5 classes), 3 random images at 32 px normalized with ImageNet's
    statistics (so pixel units and the model's input differ by sigma ~ 0.22), their saliency maps.
    float64 so that the comparisons measure the definitions, not float32 rounding of batches that the
    two implementations split differently."""
    model = timm_model("test_resnet", num_classes=CLASSES).double()
    space = PixelSpace.from_stats(*IMAGENET)
    x = space.from_pixels(pixel_batch(BATCH, 32, seed=1)).double()
    target = ClassTarget(torch.tensor([0, 3, 1]))
    maps = Saliency().attribute(model, x, target, mean=IMAGENET[0], std=IMAGENET[1])
    return Case(model, x, maps, target, space)


def gaussian_draws(samples: int, std: float, seed: int, shape=(3, 32, 32)) -> torch.Tensor:
    """Infidelity's documented noise: one [C,H,W] N(0, std^2) draw per sample, in order, from a CPU
    generator seeded with ``seed``, in pixel units."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(shape, generator=generator) * std for _ in range(samples)])


def uniform_draws(samples: int, radius: float, seed: int, shape=(3, 32, 32)) -> torch.Tensor:
    """Max-sensitivity's documented noise: one [C,H,W] U[-radius, radius] draw per sample, in pixel units."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.empty(shape).uniform_(-radius, radius, generator=generator) for _ in range(samples)])


def in_model_space(draws: torch.Tensor, space: PixelSpace, like: torch.Tensor) -> torch.Tensor:
    return draws.to(like) / space.std.to(like)


# ---------------------------------------------------------------- differential: captum


@pytest.mark.parametrize("normalize, score", [(False, "logit"), (True, "logit"), (True, "probability")])
def test_infidelity_equals_captum(case, normalize, score):
    """captum.metrics.infidelity with a perturb_func that returns our draws, I = eps / sigma (captum
    asks for them per batch of copies, each input's ``samples`` copies in a row: repeat_interleave, so
    row b*S + s gets sample s), and the one-channel maps expanded to the input's shape.

    Both compute in float64, with the same formulas but other batchings and sums; the largest
    reduction is I . Phi over n = 3072 terms, within n*u = 3.4e-13 (u = 1.1e-16) of the sum of |terms|,
    itself ~sqrt(n) = 55 times the dot for Gaussian I, and normalize's beta^2 A0 - 2 beta A1 + A2
    cancels by (A2 + A1^2/A0) / value, a few here: ~1e-10 relative at most. rtol 1e-5 (asked) leaves
    five orders, while one sample misassigned, a sign or a sigma changes the value by percents.
    Measured at 1 and 2 threads: 1.3e-16 (normalize false), 6.3e-16 (true), 1.8e-15 (probability).
    (On the float32 model with the defaults, 10 samples: 1.6e-7, the batches' float32 rounding.)"""
    samples, std = 4, 0.1
    perturbation = in_model_space(gaussian_draws(samples, std, seed=7), case.space, case.x)

    def perturb(inputs):
        assert inputs.shape[0] == BATCH * samples  # one call for all copies: no max_examples_per_batch
        repeated = perturbation.repeat(BATCH, 1, 1, 1)
        return repeated, inputs - repeated

    forward = case.model if score == "logit" else (lambda x: case.model(x).softmax(1))
    expected = captum_metrics.infidelity(forward, perturb, case.x, case.maps.expand_as(case.x), target=case.target.indices,
                                         n_perturb_samples=samples, normalize=normalize)
    metric = Infidelity(samples=samples, std=std, normalize=normalize, score=score, batch_size=5, seed=7)
    values = metric.evaluate(case.inputs()).values
    assert values.dtype == torch.float64 and values.shape == (BATCH,)
    torch.testing.assert_close(values, expected.reshape(-1), rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")  # captum's Saliency
def test_sensitivity_max_equals_captum(case):
    """captum.metrics.sensitivity_max with a perturb_func adding our draws d = u / sigma (sample s at
    row b*S + s, as captum repeat_interleaves), explaining with captum's Saliency(abs=True) and the
    max over colour channels (vizkit's saliency, checked equal in test_differential_captum).

    float64 on both sides; the norms sum 1024 squares of one sign (relative error <= n*u = 1.1e-13),
    the differences of maps ~3x smaller than the maps lose no more than that factor: ~1e-12 relative;
    rtol 1e-5 is slack for the other batching. Measured at 1 and 2 threads: 0 (bit-equal; float32
    with the defaults: 7e-8)."""
    samples, radius = 3, 0.02
    shift = in_model_space(uniform_draws(samples, radius, seed=5), case.space, case.x)

    def perturb(inputs):  # one parameter: captum then passes no radius
        return inputs + shift.repeat(BATCH, 1, 1, 1)

    def explain(inputs, target):  # the clean pass comes as a tuple and must return one, as captum's methods
        single = inputs[0] if isinstance(inputs, tuple) else inputs
        maps = captum_attr.Saliency(case.model).attribute(single, target=target, abs=True).amax(1, keepdim=True)
        return (maps,) if isinstance(inputs, tuple) else maps

    expected = captum_metrics.sensitivity_max(explain, case.x, perturb_func=perturb, n_perturb_samples=samples,
                                              target=case.target.indices)
    values = SensitivityMax(samples=samples, radius=radius, batch_size=4, seed=5).evaluate(case.inputs()).values
    assert values.shape == (BATCH,) and bool((values > 0).all())
    torch.testing.assert_close(values, expected.reshape(-1), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- exact, on a linear model


@pytest.fixture(scope="module")
def linear():
    """f(x) = W x + b on 3x8x8 inputs in float64, normalized with unequal sigmas: its exact gradient
    for class c is W_c, and f(x) - f(x - I) = W_c . I with no remainder."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).double().eval()
    space = PixelSpace.from_stats([0.5, 0.4, 0.3], [0.25, 0.5, 0.2])
    x = space.from_pixels(pixel_batch(2, 8, seed=2)).double()
    target = ClassTarget(torch.tensor([1, 3]))
    gradient = model[1].weight.detach()[target.indices].view(2, 3, 8, 8)
    return Case(model, x, gradient, target, space)


def test_infidelity_of_the_exact_gradient_is_zero_and_of_twice_it_is_the_predicted_drop(linear):
    """Phi = W_c predicts every drop exactly: 0 up to float64 rounding of 192-term dots (~1e-17,
    squared ~1e-34; bound 1e-24). Phi = 2 W_c errs by exactly W_c . I per sample, so the value is the
    mean of (W_c . eps/sigma)^2 over the documented draws (pixel units divided by sigma: a sigma
    mistake or a sign of I mistaken moves it by factors); normalized, beta = 1/2 brings it back to 0
    up to the cancellation of beta^2 A0 - 2 beta A1 + A2, a few ulp of A2 = S * expected (bound 1e-14
    of expected; measured 4.4e-17 = 2e-16 of it, negative for one input before the clamp at 0)."""
    exact = Infidelity(samples=5, std=0.1, normalize=False).evaluate(linear.inputs()).values
    assert float(exact.abs().max()) < 1e-24
    doubled = linear.inputs(maps=2 * linear.maps)
    perturbation = in_model_space(gaussian_draws(5, 0.1, seed=0, shape=(3, 8, 8)), linear.space, linear.x)
    expected = torch.einsum("bchw,schw->bs", linear.maps, perturbation).square().mean(1)
    torch.testing.assert_close(Infidelity(samples=5, std=0.1, normalize=False).evaluate(doubled).values, expected, rtol=1e-12, atol=0)
    normalized = Infidelity(samples=5, std=0.1).evaluate(doubled).values
    assert bool((normalized >= 0).all()) and bool((normalized <= 1e-14 * expected).all())


def test_sensitivity_of_a_constant_saliency_is_zero(linear):
    """A linear model's saliency is |W_c| wherever x moves: the method runs again on every copy and
    returns the same map, bit for bit."""
    maps = Saliency().attribute(linear.model, linear.x, linear.target, mean=linear.space.mean, std=linear.space.std)
    values = SensitivityMax(samples=3).evaluate(linear.inputs(maps=maps)).values
    assert values.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- seeded, harmless, batching


METRICS = [(Infidelity, {"samples": 3}), (SensitivityMax, {"samples": 2})]


@pytest.mark.parametrize("cls, fields", METRICS, ids=["infidelity", "sensitivity_max"])
def test_seeded_and_harmless(case, cls, fields):
    """Same seed, same value, whatever ran before; another seed, another value; the global RNG, the
    model (modes, flags, values, hooks, .grad) and the inputs are left as they were."""
    before, rng = state(case.model), torch.random.get_rng_state()
    x, maps = case.x.clone(), case.maps.clone()
    first = cls(**fields).evaluate(case.inputs()).values
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert_untouched(case.model, before)
    assert torch.equal(case.x, x) and torch.equal(case.maps, maps)
    torch.manual_seed(123)
    assert torch.equal(cls(**fields).evaluate(case.inputs()).values, first)
    assert not torch.allclose(cls(**fields, seed=1).evaluate(case.inputs()).values, first)


@pytest.mark.parametrize("cls, fields", METRICS, ids=["infidelity", "sensitivity_max"])
def test_neither_batch_size_nor_the_other_inputs_change_a_value(case, cls, fields):
    """The draws are per sample and shared by the batch's inputs, so chunking the copies one at a time
    or all together, or evaluating one input alone, meets the same noise. In float64 only the
    convolutions' rounding of other batch shapes differs (~1e-16 relative, times the cancellations
    bounded in the captum tests): rtol 1e-12. Measured: infidelity 2.4e-15, sensitivity_max 0."""
    whole = cls(**fields, batch_size=1).evaluate(case.inputs()).values
    torch.testing.assert_close(cls(**fields, batch_size=64).evaluate(case.inputs()).values, whole, rtol=1e-12, atol=0)
    alone = cls(**fields).evaluate(case.inputs(x=case.x[1:2], maps=case.maps[1:2], target=case.target.take(torch.tensor([1])))).values
    torch.testing.assert_close(alone, whole[1:2], rtol=1e-12, atol=0)


# ---------------------------------------------------------------- targets and configs


def test_infidelity_needs_a_class_target_and_sensitivity_takes_a_channel(case):
    channel = resolve_target("channel:layer1:0", case.model, case.x)
    with pytest.raises(ConfigError, match="infidelity .*class"):
        Infidelity(samples=1).evaluate(case.inputs(target=channel))
    maps = Saliency().attribute(case.model, case.x, channel, mean=IMAGENET[0], std=IMAGENET[1])
    values = SensitivityMax(samples=1).evaluate(case.inputs(maps=maps, target=channel)).values
    assert values.shape == (BATCH,) and bool(torch.isfinite(values).all()) and bool((values > 0).all())


def test_sensitivity_needs_the_method(case):
    inputs = dataclasses.replace(case.inputs(), method=None)
    with pytest.raises(ConfigError, match="sensitivity_max runs the method again"):
        SensitivityMax(samples=1).evaluate(inputs)


@pytest.mark.parametrize("cls, fields, field", [
    (Infidelity, {"samples": 0}, "samples"),
    (Infidelity, {"std": 0}, "std"),
    (Infidelity, {"std": -0.1}, "std"),
    (Infidelity, {"std": "a lot"}, "std"),
    (Infidelity, {"batch_size": 0}, "batch_size"),
    (Infidelity, {"score": "softmax"}, "score"),
    (Infidelity, {"seed": -1}, "seed"),
    (SensitivityMax, {"samples": 0}, "samples"),
    (SensitivityMax, {"radius": 0}, "radius"),
    (SensitivityMax, {"radius": -0.02}, "radius"),
    (SensitivityMax, {"batch_size": 0}, "batch_size"),
])
def test_bad_configs_are_refused_in_one_line_naming_the_metric(cls, fields, field):
    with pytest.raises(ConfigError) as refused:
        configure(cls, cls.name, fields)
    message = str(refused.value)
    assert message.startswith(f"{cls.name}: {field} ") and "\n" not in message


def test_configs_take_pixel_amounts_as_written_and_store_in_omegaconf():
    assert configure(Infidelity, "infidelity", {"std": "8/255"}).config.std == pytest.approx(8 / 255)
    assert configure(SensitivityMax, "sensitivity_max", {"radius": "5/255"}).config.radius == pytest.approx(5 / 255)
    for cls in (Infidelity, SensitivityMax):
        assert OmegaConf.to_object(OmegaConf.structured(cls.Config)) == cls.Config()
