"""FGSM and PGD: equal to torchattacks (pixel inputs and normalized ones), inside the ε ball and [0, 1]
for every input (hypothesis), effective on the embedded model, seeded, and harmless to the model."""
from __future__ import annotations

import pytest
import torch
import torchattacks
from conftest import model_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiny_models import pixel_batch, single_thread, timm_model, tiny_relu_net
from vizkit.core.configured import configure
from vizkit.core.data import load_shapes
from vizkit.core.errors import ConfigError
from vizkit.methods.adversarial.budget import perturbation_norms
from vizkit.methods.adversarial.fgsm import FGSM
from vizkit.methods.adversarial.pgd import PGD
from vizkit.core.models import data_config
from vizkit.core.pixels import PixelSpace

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PIXELS = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # no normalization: what torchattacks takes by default
CLASSES = 5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def resnet():
    return timm_model("test_resnet", num_classes=CLASSES)


@pytest.fixture(scope="module")
def batch():
    return pixel_batch(4, 32, seed=3)


def attack_both(method, peer, model, pixels, labels, targets, stats):
    """vizkit's and torchattacks' adversarial pixels for the same pixels, the model fed ``stats``-normalized inputs."""
    space = PixelSpace.from_stats(*stats)
    x = space.from_pixels(pixels)
    ours = space.to_pixels(method.attack(model, x, labels, target=targets, mean=stats[0], std=stats[1]))
    if stats != PIXELS:
        peer.set_normalization_used(*stats)  # then it takes and returns normalized inputs, as the model
    if targets is not None:
        peer.set_mode_targeted_by_label(quiet=True)
    theirs = peer(x, labels if targets is None else targets)
    return ours, space.to_pixels(theirs) if stats != PIXELS else theirs


def predictions(model, pixels, stats):
    with torch.no_grad():
        return model(PixelSpace.from_stats(*stats).from_pixels(pixels)).argmax(1)


# ---------------------------------------------------------------- differential: torchattacks


@pytest.mark.parametrize("stats", [PIXELS, IMAGENET], ids=["pixels", "normalized"])
@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize("eps", ["8/255", 8 / 255], ids=["text", "float"])
def test_fgsm_equals_torchattacks(resnet, batch, stats, targeted, eps):
    """Bit-exact by construction, not by luck: both take the gradient of the batch-mean cross-entropy
    through the same model forward / backward on the same pixels (torchattacks' normalize and inverse
    are PixelSpace's formulas), so the gradients are equal bit for bit (checked, every case, at 1 and 2
    threads) on whatever CPU, and a near-zero component (smallest measured: 8e-7 of the largest,
    inside the backward's float32 rounding) has the same sign on both sides. Had the ops differed, a
    flip would move a pixel by 2ε, which no tolerance could cover. Measured difference: 0; atol 1e-5
    is slack only. ε: |x + ε − x| is off by ≤ 1 ulp of 1 (1.2e-7), 8× inside abs=1e-6."""
    labels = predictions(resnet, batch, stats)
    targets = (labels + 1) % CLASSES if targeted else None
    ours, theirs = attack_both(FGSM(eps=eps), torchattacks.FGSM(resnet, eps=8 / 255), resnet, batch, labels, targets, stats)
    assert (ours - batch).abs().amax() == pytest.approx(8 / 255, abs=1e-6)  # it moved, by ε
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


PGD_CASES = {  # norm: (our eps and step size, as text and as floats; torchattacks' class and floats)
    "linf": (("8/255", "2/255"), (8 / 255, 2 / 255), torchattacks.PGD),
    "l2": (("1/2", "1/10"), (0.5, 0.1), torchattacks.PGDL2),
}


@pytest.mark.parametrize("stats", [PIXELS, IMAGENET], ids=["pixels", "normalized"])
@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize("as_text", [True, False], ids=["text", "float"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_equals_torchattacks_without_random_start(resnet, batch, stats, targeted, as_text, norm):
    """As for FGSM: the same ops on both sides, the gradients equal bit for bit at every step (checked,
    1 and 2 threads), so the sign (L∞) and the direction (L2) agree on any CPU; measured difference 0."""
    text, floats, peer_class = PGD_CASES[norm]
    eps, step_size = text if as_text else floats
    method = PGD(norm=norm, eps=eps, step_size=step_size, steps=5, random_start=False)
    peer = peer_class(resnet, eps=floats[0], alpha=floats[1], steps=5, random_start=False)
    labels = predictions(resnet, batch, stats)
    targets = (labels + 2) % CLASSES if targeted else None
    ours, theirs = attack_both(method, peer, resnet, batch, labels, targets, stats)
    assert perturbation_norms(batch, ours)[norm].amin() > floats[0] / 4  # it moved
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_targeting_by_function_gives_the_same_as_by_label(resnet, batch):
    """torchattacks' other targeted mode (a map from labels to targets): the same attack."""
    labels = predictions(resnet, batch, PIXELS)
    peer = torchattacks.PGD(resnet, eps=8 / 255, alpha=2 / 255, steps=3, random_start=False)
    peer.set_mode_targeted_by_function(lambda images, labels: (labels + 1) % CLASSES, quiet=True)
    ours = PGD(steps=3, random_start=False).attack(resnet, batch, labels, target=(labels + 1) % CLASSES, mean=PIXELS[0], std=PIXELS[1])
    torch.testing.assert_close(ours, peer(batch, labels), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- property: the ε ball and [0, 1]

TINY_MODELS = [tiny_relu_net("module", seed=seed) for seed in (0, 1)]


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])  # a busy CI core is not a bug
@given(
    model_index=st.sampled_from(range(len(TINY_MODELS))),
    method_name=st.sampled_from(["fgsm", "pgd"]),
    norm=st.sampled_from(["linf", "l2"]),
    fraction=st.floats(0, 1),
    step_fraction=st.floats(0.05, 1.5),
    steps=st.integers(1, 4),
    random_start=st.booleans(),
    targeted=st.booleans(),
    seed=st.integers(0, 2**16),
    size=st.integers(8, 20),
)
def test_the_result_stays_in_the_ball_and_in_pixel_range(model_index, method_name, norm, fraction, step_fraction, steps,
                                                          random_start, targeted, seed, size):
    model = TINY_MODELS[model_index]
    if method_name == "fgsm":
        norm = "linf"
    eps = fraction * (0.2 if norm == "linf" else 3.0)
    if method_name == "fgsm":
        method = FGSM(eps=eps)
    else:
        method = PGD(norm=norm, eps=eps, step_size=max(step_fraction * eps, 1e-3), steps=steps, random_start=random_start, seed=seed)
    pixels = pixel_batch(3, size, seed=seed)
    labels = torch.tensor([0, 1, 2])
    adversarial = method.attack(model, pixels, labels, target=torch.tensor([4, 3, 0]) if targeted else None)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    delta = perturbation_norms(pixels, adversarial)
    if norm == "linf":
        assert delta["linf"].max() <= eps + 1e-6
    else:
        # float32 pixels near 1 are 6e-8 apart: adversarial - clean carries up to that per value, which
        # matters for a tiny ε spread over many values (hypothesis found ε = 3e-4 over 192 values)
        resolution = 6e-8 * adversarial[0].numel() ** 0.5
        assert (delta["l2"] <= eps * (1 + 1e-5) + resolution).all()


# ---------------------------------------------------------------- the embedded model


@pytest.fixture(scope="module")
def held_out(embedded):
    samples = load_shapes(100, "test", 0, data_config(embedded))
    pixels = torch.stack([sample.pixels for sample in samples])
    labels = torch.tensor([sample.label for sample in samples])
    return pixels, labels


def test_pgd_breaks_the_embedded_model_at_8_of_255(embedded, held_out):
    """Measured: the model classifies all 100 held-out images correctly, and PGD L∞ (ε 8/255, 10 steps
    of 2/255, random start) breaks all 100 of them (FGSM at the same ε: 98)."""
    pixels, labels = held_out
    space = PixelSpace.for_model(embedded)
    clean = predictions(embedded, pixels, (space.mean.flatten().tolist(), space.std.flatten().tolist()))
    correct = clean == labels
    assert correct.sum() >= 95
    adversarial = PGD().attack(embedded, space.from_pixels(pixels), labels)
    with torch.no_grad():
        broken = embedded(adversarial).argmax(1) != labels
    assert (broken & correct).sum() >= 0.95 * correct.sum()
    assert perturbation_norms(pixels, space.to_pixels(adversarial))["linf"].max() <= 8 / 255 + 1e-5


def test_targeted_pgd_reaches_the_target_on_the_embedded_model(embedded, held_out):
    """Measured: at ε 16/255 with 20 steps every one of the 30 images reaches its target (at 8/255 and
    10 steps 97 of 100 do)."""
    pixels, labels = held_out[0][:30], held_out[1][:30]
    targets = (labels + 1) % 6
    space = PixelSpace.for_model(embedded)
    adversarial = PGD(eps="16/255", steps=20).attack(embedded, space.from_pixels(pixels), labels, target=targets)
    with torch.no_grad():
        reached = embedded(adversarial).argmax(1) == targets
    assert reached.sum() >= 27


# ---------------------------------------------------------------- seeds, the global RNG, the model


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_seeded_and_leaves_the_global_rng_alone(norm):
    model, pixels = TINY_MODELS[0], pixel_batch(3, 16)
    eps = "8/255" if norm == "linf" else 0.5
    before = torch.random.get_rng_state()
    first = PGD(norm=norm, eps=eps, steps=2, seed=7).attack(model, pixels)
    again = PGD(norm=norm, eps=eps, steps=2, seed=7).attack(model, pixels)
    other = PGD(norm=norm, eps=eps, steps=2, seed=8).attack(model, pixels)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_an_input_gives_the_same_result_in_any_batch():
    """A batch of 4 and batches of 1 run different conv shapes, so the gradients differ in bits (measured
    ≤ 3.1e-7 of the largest component, 1 and 2 threads); but the smallest component is 1.4e-4 of the
    largest, 470× that, so no sign flips, and the sign steps are then the same elementwise ops: the
    images are equal (measured difference 0; atol 1e-6 is slack only)."""
    model, pixels = TINY_MODELS[0], pixel_batch(4, 16)
    method = PGD(steps=3, seed=1)
    together = method.attack(model, pixels, torch.arange(4))
    alone = torch.cat([method.attack(model, pixels[i:i + 1], torch.tensor([i])) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)


def test_restarts_keep_the_first_success_and_break_at_least_as_many():
    """Measured: one walk breaks 10 of the 16 inputs, four restarts 12."""
    model, pixels = TINY_MODELS[0], pixel_batch(16, 16, seed=5)
    labels = predictions(model, pixels, PIXELS)
    single = PGD(eps="32/255", step_size="32/255", steps=1, seed=4).attack(model, pixels, labels)
    several = PGD(eps="32/255", step_size="32/255", steps=1, seed=4, restarts=4).attack(model, pixels, labels)
    broken_once, broken_several = predictions(model, single, PIXELS) != labels, predictions(model, several, PIXELS) != labels
    assert 0 < broken_once.sum() < 16  # a case where restarts have something to do
    assert torch.equal(several[broken_once], single[broken_once])  # restart 0 is the single walk, kept where it succeeded
    assert broken_several[broken_once].all() and broken_several.sum() > broken_once.sum()


@pytest.mark.parametrize("method", [FGSM(), PGD(), PGD(norm="l2", eps=1.0, step_size=0.25)], ids=["fgsm", "pgd-linf", "pgd-l2"])
def test_the_model_is_left_as_it_was(resnet, batch, method):
    state = model_state(resnet)
    method.attack(resnet, batch)
    assert model_state(resnet) == state
    assert all(parameter.grad is None for parameter in resnet.parameters())


@pytest.mark.parametrize("method", [FGSM(eps=0), PGD(eps="0"), PGD(norm="l2", eps=0.0, restarts=3)], ids=["fgsm", "pgd-linf", "pgd-l2"])
def test_eps_zero_returns_the_input(method):
    pixels = pixel_batch(2, 16)
    assert torch.equal(method.attack(TINY_MODELS[0], pixels), pixels)


def test_amounts_are_parsed_as_written():
    config = PGD(eps="8/255", step_size=" 1/255 ").config
    assert config.eps == pytest.approx(8 / 255) and config.step_size == pytest.approx(1 / 255)
    assert FGSM(eps="0.03").config.eps == pytest.approx(0.03)


@pytest.mark.parametrize(
    "cls, fields, message",
    [
        (FGSM, {"eps": "8/2x5"}, r"fgsm: eps must be a number such as 0.03 or 8/255 .*got '8/2x5'"),
        (FGSM, {"eps": -0.1}, r"fgsm: eps must be non-negative and finite, got -0.1"),
        (PGD, {"eps": "8/2x5"}, r"pgd: eps must be a number such as 0.03 or 8/255 .*got '8/2x5'"),
        (PGD, {"norm": "l3"}, r"pgd: norm must be one of linf, l2, got 'l3'"),
        (PGD, {"steps": 0}, r"pgd: steps must be a positive integer, got 0"),
        (PGD, {"restarts": 0}, r"pgd: restarts must be a positive integer, got 0"),
        (PGD, {"step_size": 0}, r"pgd: step_size must be positive and finite, got 0"),
        (PGD, {"restarts": 3, "random_start": False}, r"pgd: restarts=3 needs random_start=true"),
        (PGD, {"epsilon": 0.1}, r"pgd: unknown field\(s\) epsilon; its fields are: eps, norm, random_start"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(cls, fields, message):
    with pytest.raises(ConfigError, match=message):
        configure(cls, cls.name, fields)
