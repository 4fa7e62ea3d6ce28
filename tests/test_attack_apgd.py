"""APGD and APGD-T: equal to torchattacks' APGD and APGDT (pixel inputs and normalized ones), inside the
ε ball and [0, 1] for every input (hypothesis), seeded without the global RNG, harmless to the model,
at least as strong as PGD on the embedded model, and refusing bad configs and models in one line."""
from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import nn
from conftest import model_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiny_models import TinyReLUNet, pixel_batch, single_thread, timm_model, tiny_relu_net
from vizkit.core.configured import configure
from vizkit.core.data import load_shapes
from vizkit.core.errors import ConfigError
from vizkit.core.models import data_config
from vizkit.core.pixels import PixelSpace
from vizkit.methods.adversarial.apgd import APGD, dlr_loss
from vizkit.methods.adversarial.budget import perturbation_norms
from vizkit.methods.adversarial.pgd import PGD

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PIXELS = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # no normalization: what torchattacks takes by default
CLASSES = 5
EPS = {"linf": ("8/255", 8 / 255, "Linf"), "l2": ("1/2", 0.5, "L2")}  # ours as written, the float, torchattacks' name
AS_PIXELS = {"mean": PIXELS[0], "std": PIXELS[1]}  # for a timm model fed pixels: its data config would say ImageNet
TINY_MODELS = [tiny_relu_net("module", seed=seed) for seed in (0, 1)]  # no data config: they take pixels


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


def predictions(model, pixels, stats=PIXELS):
    with torch.no_grad():
        return model(PixelSpace.from_stats(*stats).from_pixels(pixels)).argmax(1)


def attack_both(method, peer, model, pixels, labels, stats):
    """vizkit's and torchattacks' adversarial pixels for the same pixels, the model fed ``stats``-normalized inputs."""
    space = PixelSpace.from_stats(*stats)
    x = space.from_pixels(pixels)
    ours = space.to_pixels(method.attack(model, x, labels, mean=stats[0], std=stats[1]))
    if stats != PIXELS:
        peer.set_normalization_used(*stats)  # then it takes and returns normalized inputs, as the model
    theirs = peer(x, labels)
    return ours, space.to_pixels(theirs) if stats != PIXELS else theirs


def labels_one_wrong(model, pixels, stats):
    """The clean predictions, but the first input's label is another class: both sides must leave it alone."""
    labels = predictions(model, pixels, stats)
    labels[0] = (labels[0] + 1) % CLASSES
    return labels


# ---------------------------------------------------------------- differential: torchattacks


@pytest.mark.parametrize(
    "norm, loss, stats",  # the normalization only changes the forward: two of the four with it
    [("linf", "ce", PIXELS), ("linf", "dlr", PIXELS), ("l2", "ce", PIXELS), ("l2", "dlr", PIXELS),
     ("linf", "ce", IMAGENET), ("l2", "dlr", IMAGENET)],
    ids=["linf-ce", "linf-dlr", "l2-ce", "l2-dlr", "linf-ce-normalized", "l2-dlr-normalized"],
)
def test_apgd_equals_torchattacks(resnet, batch, stats, loss, norm):
    """The same float32 operations in the same order on both sides (the start drawn from the same
    seeded stream, the loss and its gradient through the same forward, every step and projection,
    the checkpoints' comparisons of equal numbers), so the pixels are equal bit for bit: measured
    difference 0 in every case, at 1 and 2 threads. No tolerance could do better than that: a single
    different sign or checkpoint decision would move a pixel by up to 2ε. atol 1e-6 is slack only.
    Input 0 is given a wrong label: both return it unchanged."""
    text, eps, peer_norm = EPS[norm]
    labels = labels_one_wrong(resnet, batch, stats)
    method, peer = APGD(norm=norm, eps=text, steps=10, loss=loss), torchattacks.APGD(resnet, norm=peer_norm, eps=eps, steps=10, loss=loss)
    ours, theirs = attack_both(method, peer, resnet, batch, labels, stats)
    broken = predictions(resnet, ours, stats) != labels
    assert broken[1:].any()  # the attack had something to do
    torch.testing.assert_close(ours[0], batch[0], rtol=0, atol=1e-6)  # unchanged, up to the normalization round trip (ulps of 1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


RESTART_CASES = {"linf": ("32/255", 32 / 255, "Linf", 2), "l2": (1.0, 1.0, "L2", 4)}  # ours, torchattacks' eps and norm, runs


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_restarts_equal_torchattacks(norm):
    """On the tiny ReLU net (it takes pixels, as torchattacks) with 2 steps a run, the first run leaves
    inputs unbroken and the later ones break more (measured: L∞ 7 then 8 of 8, L2 2 then 3 of 8),
    drawing their starts for fewer inputs from the stream that torchattacks' seeding once per call
    gives: equal, measured difference 0."""
    model, pixels = TINY_MODELS[0], pixel_batch(8, 16, seed=5)
    labels = predictions(model, pixels)
    text, eps, peer_norm, restarts = RESTART_CASES[norm]
    one = APGD(norm=norm, eps=text, steps=2).attack(model, pixels, labels)
    ours = APGD(norm=norm, eps=text, steps=2, restarts=restarts).attack(model, pixels, labels)
    theirs = torchattacks.APGD(model, norm=peer_norm, eps=eps, steps=2, n_restarts=restarts)(pixels, labels)
    assert 0 < (predictions(model, one) != labels).sum() < (predictions(model, ours) != labels).sum()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_apgd_t_equals_torchattacks_linf(resnet, batch):
    """APGD-T over all 4 other classes against torchattacks' APGDT(n_classes=5), L∞: equal bit for bit,
    as APGD (measured difference 0). Our target ranking comes from the clean logits of the whole batch,
    theirs from a forward per run on the inputs still attacked; no two logits of these inputs are
    within float32 rounding of each other (smallest gap 0.023), so the ranks agree. At 2/255 the
    runner-up breaks inputs 1-3 already; the later targets are checked on ``two_routes`` below."""
    labels = labels_one_wrong(resnet, batch, PIXELS)
    method = APGD(eps="2/255", steps=10, loss="dlr", target_classes=CLASSES - 1)
    ours, theirs = attack_both(method, torchattacks.APGDT(resnet, eps=2 / 255, steps=10, n_classes=CLASSES), resnet, batch, labels, PIXELS)
    assert (predictions(resnet, ours) != labels)[1:].any()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def two_routes() -> nn.Module:
    """Logits (2 + (m₀ − ½), 1.9, 1.5 + 30 (m₁ − ½), 0, −1), m_c the mean of channel c, for images near
    ½ grey: the runner-up class 1 is out of reach at ε 8/255 (L∞) or 1 (L2), since m₀ would have to
    fall by 0.1 (L∞ moves it 0.031 at most, L2 0.0625); the third, class 2, is in reach (m₁ up by
    1/60). So APGD-T's first target fails on every input and its second succeeds."""
    linear = nn.Linear(3, CLASSES)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 30.0, 0], [0, 0, 0], [0, 0, 0]]))
        linear.bias.copy_(torch.tensor([1.5, 1.9, -13.5, 0.0, -1.0]))
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear).eval()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_t_takes_the_targets_and_restarts_in_torchattacks_order(norm):
    """On ``two_routes``, with 2 runs per target: both runs at the runner-up fail, the first at the
    third class breaks every input (measured: all 4, by class 2), so the result depends on the order of
    the runs (target outer, restarts inner) and on the stream carrying on across them: equal to
    torchattacks' APGDT, measured difference 0. (Here every input's L2 step size stays equal to the
    others', so APGDT's ``step_size[0]`` does not matter.)"""
    model = two_routes()
    pixels = 0.5 + 0.02 * (pixel_batch(4, 16, seed=0) - 0.5)
    labels = predictions(model, pixels)
    text, eps, peer_norm = {"linf": ("8/255", 8 / 255, "Linf"), "l2": (1.0, 1.0, "L2")}[norm]
    ours = APGD(norm=norm, eps=text, steps=5, restarts=2, loss="dlr", target_classes=CLASSES - 1).attack(model, pixels, labels)
    theirs = torchattacks.APGDT(model, norm=peer_norm, eps=eps, steps=5, n_restarts=2, n_classes=CLASSES)(pixels, labels)
    assert (predictions(model, ours) == 2).all()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_apgd_t_equals_torchattacks_l2_one_input_at_a_time(resnet, batch):
    """torchattacks' APGDT L2 step takes the batch's first input's step size for all (``step_size[0]``);
    ours each input's own, so the two agree on one input at a time: measured difference 0 (on the
    whole batch of 4, where the step sizes part, inputs 1 and 2 differ by up to 0.0015)."""
    labels = predictions(resnet, batch)[:2]
    method = APGD(norm="l2", eps="1/4", steps=10, loss="dlr", target_classes=CLASSES - 1)
    peer = torchattacks.APGDT(resnet, norm="L2", eps=0.25, steps=10, n_classes=CLASSES)
    ours = torch.cat([method.attack(resnet, batch[i:i + 1], labels[i:i + 1], **AS_PIXELS) for i in range(2)])
    theirs = torch.cat([peer(batch[i:i + 1], labels[i:i + 1]) for i in range(2)])
    assert (predictions(resnet, ours) != labels).any()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_dlr_loss_is_torchattacks_and_the_formula():
    """Values and logit gradients equal to torchattacks' bit for bit (the same operations), and the
    paper's formulas on hand-made logits (exact in float32 up to one rounding of the quotient)."""
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.5, 2.0, -1.0, 1.0]], requires_grad=True)
    labels, targets = torch.tensor([0, 0]), torch.tensor([3, 2])
    ours = dlr_loss(logits, labels)
    assert ours.tolist() == pytest.approx([-(3 - 1) / (3 - 0), -(0.5 - 2) / (2 - 0.5)], rel=1e-7)
    ours_targeted = dlr_loss(logits, labels, targets)
    assert ours_targeted.tolist() == pytest.approx([-(3 + 1) / (3 + 0.5), -(0.5 + 1) / (2 - 0.5 * 0.5 + 0.5)], rel=1e-7)
    peer = torchattacks.APGD(TINY_MODELS[0])  # only its loss is used
    peer_t = torchattacks.APGDT(TINY_MODELS[0], n_classes=4)
    for mine, theirs in ((ours, peer.dlr_loss(logits, labels)), (ours_targeted, peer_t.dlr_loss_targeted(logits, labels, targets))):
        assert torch.equal(mine, theirs)
        assert torch.equal(torch.autograd.grad(mine.sum(), logits)[0], torch.autograd.grad(theirs.sum(), logits)[0])


# ---------------------------------------------------------------- property: the ε ball and [0, 1]

@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])  # a busy CI core is not a bug
@given(
    model_index=st.sampled_from(range(len(TINY_MODELS))),
    norm=st.sampled_from(["linf", "l2"]),
    fraction=st.floats(0, 1),
    steps=st.integers(1, 6),
    restarts=st.integers(1, 2),
    mode=st.sampled_from(["ce", "dlr", "apgd-t", "target-ce", "target-dlr"]),
    rho=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**16),
    size=st.integers(8, 20),
)
def test_the_result_stays_in_the_ball_and_in_pixel_range(model_index, norm, fraction, steps, restarts, mode, rho, seed, size):
    model = TINY_MODELS[model_index]
    eps = fraction * (0.2 if norm == "linf" else 3.0)
    loss = "ce" if mode in ("ce", "target-ce") else "dlr"
    method = APGD(norm=norm, eps=eps, steps=steps, restarts=restarts, loss=loss, rho=rho, seed=seed,
                  target_classes=2 if mode == "apgd-t" else 0)
    pixels = pixel_batch(3, size, seed=seed)
    target = torch.tensor([4, 3, 0]) if mode.startswith("target") else None
    adversarial = method.attack(model, pixels, torch.tensor([0, 1, 2]), target=target)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    delta = perturbation_norms(pixels, adversarial)
    if norm == "linf":
        assert delta["linf"].max() <= eps + 1e-6  # x ± ε rounded to float32: within an ulp of 1 (1.2e-7)
    else:
        # as for PGD: float32 pixels near 1 are 6e-8 apart, which a tiny ε over many values can see
        resolution = 6e-8 * adversarial[0].numel() ** 0.5
        assert (delta["l2"] <= eps * (1 + 1e-5) + resolution).all()


# ---------------------------------------------------------------- seeds, the global RNG, the model


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_seeded_and_leaves_the_global_rng_alone(norm):
    """A budget that breaks the inputs (an unbroken one comes back unchanged, whatever the seed):
    the result depends on the seed alone. Measured: all 3 broken at both seeds."""
    model, pixels = TINY_MODELS[0], pixel_batch(3, 16)
    eps = "32/255" if norm == "linf" else 2.0
    labels = predictions(model, pixels)
    before = torch.random.get_rng_state()
    first = APGD(norm=norm, eps=eps, steps=3, seed=7).attack(model, pixels, labels)
    again = APGD(norm=norm, eps=eps, steps=3, seed=7).attack(model, pixels, labels)
    other = APGD(norm=norm, eps=eps, steps=3, seed=8).attack(model, pixels, labels)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("fields", [{}, {"norm": "l2", "eps": 1.0, "loss": "dlr"}, {"loss": "dlr", "target_classes": 2}],
                         ids=["ce-linf", "dlr-l2", "apgd-t"])
def test_the_model_is_left_as_it_was(resnet, batch, fields):
    state = model_state(resnet)
    APGD(steps=3, **fields).attack(resnet, batch)
    assert model_state(resnet) == state
    assert all(parameter.grad is None for parameter in resnet.parameters())


def test_eps_zero_returns_the_input():
    pixels = pixel_batch(2, 16)
    assert torch.equal(APGD(eps=0, norm="l2", restarts=2).attack(TINY_MODELS[0], pixels), pixels)


def test_unbroken_inputs_come_back_unchanged_and_broken_ones_misclassified():
    """AutoAttack's convention: an input no run breaks is returned as it came; a broken one as its last
    misclassified iterate. Measured on the tiny net, L∞ 16/255, 3 steps: 4 of 8 broken."""
    model, pixels = TINY_MODELS[0], pixel_batch(8, 16, seed=5)
    labels = predictions(model, pixels)
    adversarial = APGD(eps="16/255", steps=3).attack(model, pixels, labels)
    broken = predictions(model, adversarial) != labels
    changed = (adversarial != pixels).flatten(1).any(1)
    assert broken.any() and not broken.all()
    assert torch.equal(changed, broken)


# ---------------------------------------------------------------- the embedded model


@pytest.fixture(scope="module")
def held_out(embedded):
    samples = load_shapes(30, "test", 0, data_config(embedded))
    return torch.stack([sample.pixels for sample in samples]), torch.tensor([sample.label for sample in samples])


def test_apgd_breaks_the_embedded_model_at_least_as_often_as_pgd(embedded, held_out):
    """At ε 8/255, APGD-CE with 3 steps (4 gradients per input) against PGD's default (10 steps of
    2/255 from a random start): measured PGD 30 of 30, APGD-CE 30 of 30 (also with 2 steps, 28 with 1;
    at 2/255 with 10 steps each: PGD 26, APGD-CE 27). The same 30 held-out images for both, all
    classified correctly."""
    pixels, labels = held_out
    space = PixelSpace.for_model(embedded)
    x = space.from_pixels(pixels)
    broken = {}
    for name, method in (("pgd", PGD()), ("apgd", APGD(steps=3))):
        adversarial = method.attack(embedded, x, labels)
        with torch.no_grad():
            broken[name] = int((embedded(adversarial).argmax(1) != labels).sum())
        assert perturbation_norms(pixels, space.to_pixels(adversarial))["linf"].max() <= 8 / 255 + 1e-5
    assert broken["apgd"] >= broken["pgd"] >= 25


def test_a_targeted_apgd_reaches_the_target_on_the_embedded_model(embedded, held_out):
    """No peer: −CE(f(x), t) towards a given class, success when it is reached. Measured at ε 8/255,
    3 steps: 10 of 10 inputs reach it (2 steps: 9; the targeted DLR: 10 and 9)."""
    pixels, labels = held_out[0][:10], held_out[1][:10]
    targets = (labels + 1) % 6
    space = PixelSpace.for_model(embedded)
    adversarial = APGD(steps=3).attack(embedded, space.from_pixels(pixels), labels, target=targets)
    with torch.no_grad():
        reached = embedded(adversarial).argmax(1) == targets
    assert reached.sum() >= 8


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_a_targeted_dlr_apgd_reaches_a_reachable_target_and_leaves_the_rest(norm):
    """On ``two_routes``: the targeted DLR towards class 2 (in reach) takes every input there; towards
    class 1 (out of reach) none gets there, and all come back unchanged."""
    model = two_routes()
    pixels = 0.5 + 0.02 * (pixel_batch(4, 16, seed=0) - 0.5)
    method = APGD(norm=norm, eps="8/255" if norm == "linf" else 1.0, steps=5, loss="dlr")
    assert (predictions(model, method.attack(model, pixels, target=2)) == 2).all()
    assert torch.equal(method.attack(model, pixels, target=1), pixels)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"eps": -0.1}, r"^apgd: eps must be non-negative and finite, got -0.1$"),
        ({"eps": "8/2x5"}, r"^apgd: eps must be a number such as 0.03 or 8/255 .*got '8/2x5'$"),
        ({"steps": 0}, r"^apgd: steps must be a positive integer, got 0$"),
        ({"restarts": 0}, r"^apgd: restarts must be a positive integer, got 0$"),
        ({"norm": "l3"}, r"^apgd: norm must be one of linf, l2, got 'l3'$"),
        ({"loss": "xent"}, r"^apgd: loss must be one of ce, dlr, got 'xent'$"),
        ({"rho": 1.0}, r"^apgd: rho must be a number strictly between 0 and 1 \(the paper's 0.75\), got 1.0$"),
        ({"rho": 0}, r"^apgd: rho must be a number strictly between 0 and 1 .*got 0$"),
        ({"target_classes": -1}, r"^apgd: target_classes must be 0 \(untargeted\) or how many .*got -1$"),
        ({"target_classes": 3}, r"^apgd: target_classes=3 runs APGD-T, whose loss is the targeted DLR: set loss=dlr"),
        ({"epsilon": 0.1}, r"^apgd: unknown field\(s\) epsilon; its fields are: eps, loss, norm"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(fields, message):
    with pytest.raises(ConfigError, match=message) as error:
        configure(APGD, APGD.name, fields)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "classes, fields, target, message",
    [
        (2, {"loss": "dlr"}, None, r"^apgd: loss=dlr needs at least 3 classes .*the model has 2: use loss=ce$"),
        (3, {"loss": "dlr"}, 1, r"^apgd: loss=dlr needs at least 4 classes \(the targeted DLR .*the model has 3: use loss=ce$"),
        (5, {"loss": "dlr", "target_classes": 5}, None, r"^apgd: target_classes=5, but the model has 5 classes: at most 4 "),
        (5, {"loss": "dlr", "target_classes": 2}, 1, r"^apgd: target_classes=2 \(APGD-T.*and a target .* both given: choose one$"),
    ],
    ids=["dlr-2-classes", "targeted-dlr-3-classes", "too-many-targets", "targets-and-a-target"],
)
def test_a_model_or_target_the_config_cannot_serve_is_refused(classes, fields, target, message):
    model = TinyReLUNet(num_classes=classes).eval()
    with pytest.raises(ConfigError, match=message) as error:
        APGD(steps=1, **fields).attack(model, pixel_batch(2, 8), target=target)
    assert "\n" not in str(error.value)
