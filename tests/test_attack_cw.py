"""CW-L2: one round of it is torchattacks.CW (pixel and normalized inputs, untargeted and targeted);
the binary search over c keeps each input's best and breaks inputs a too-small c cannot; κ is a
margin the results hold; the search's update rule and f, on hand-made numbers; bad configs refused
in one line; the model and the global RNG left as they were."""
from __future__ import annotations

import math

import pytest
import torch
import torchattacks

from tiny_models import assert_untouched, pixel_batch, single_thread, state, timm_model, tiny_relu_net
from vizkit.core.configured import configure
from vizkit.core.errors import ConfigError
from vizkit.core.pixels import PixelSpace
from vizkit.methods.adversarial.budget import perturbation_norms
from vizkit.methods.adversarial.cw import CW, adversarial_now, margin, next_constant

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PIXELS = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # no normalization: what torchattacks takes by default
CLASSES = 5
LOGIT_SHIFT = 20.0  # see ``resnet``
# x → (tanh(atanh(2x − 1)) + 1) / 2, written as torchattacks writes it: 2x − 1, 1 ± y, their quotient,
# the log, tanh and the + 1 each round once, by ≤ 6e-8 where it matters (the log turns the quotient's
# relative error into an absolute one; tanh scales w's error by 1 − y² ≤ 1), and the halving is exact:
# ≤ 1.5e-7 in all. Bound: 2 ulps of 1. Measured: ≤ 6.0e-8 (the test batch, and 10⁶ uniform pixels).
ROUND_TRIP = 2.4e-7


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def resnet():
    """test_resnet with every logit made positive by a constant added to the classifier's bias: the
    paper's f and torchattacks' agree only there (cw.py's docstring: torchattacks reads the masked
    class as a logit 0). The shift moves all logits alike, so f, its gradient and the decisions are
    the plain model's up to rounding. Measured: the smallest logit any forward of the differential
    tests sees (both attacks, every iterate) is 15.8."""
    model = timm_model("test_resnet", num_classes=CLASSES)
    with torch.no_grad():
        model.get_classifier().bias += LOGIT_SHIFT
    return model


@pytest.fixture(scope="module")
def batch():
    return pixel_batch(4, 32, seed=3)


def predictions(model, pixels, stats=PIXELS):
    with torch.no_grad():
        return model(PixelSpace.from_stats(*stats).from_pixels(pixels)).argmax(1)


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
    model.zero_grad(set_to_none=True)  # torchattacks' cost.backward() leaves gradients on the weights
    return ours, space.to_pixels(theirs) if stats != PIXELS else theirs


def attack(method, model, pixels, labels, targets=None):
    """The attack on inputs that are pixels (test_resnet's timm config would take them as normalized)."""
    return method.attack(model, pixels, labels, target=targets, mean=PIXELS[0], std=PIXELS[1])


def broken(model, adversarial, labels, targets, stats=PIXELS):
    predicted = predictions(model, adversarial, stats)
    return predicted == targets if targets is not None else predicted != labels


def runner_up(model, pixels, stats=PIXELS):
    """Each input's second most likely class: a target 50 steps at c = 1 reach (the next class
    round, (label + 1) mod 5, is out of their reach on this model: see the search tests)."""
    with torch.no_grad():
        return model(PixelSpace.from_stats(*stats).from_pixels(pixels)).topk(2).indices[:, 1]


# ---------------------------------------------------------------- differential: torchattacks


@pytest.mark.parametrize("stats", [PIXELS, IMAGENET], ids=["pixels", "normalized"])
@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
def test_one_round_equals_torchattacks(resnet, batch, stats, targeted):
    """binary_search_steps=1 is torchattacks.CW (c 1, κ 0, 50 steps, lr 0.01): the same forward,
    the same F.mse_loss and the same f (logits all positive, see ``resnet``), so the same gradient of
    w bit for bit, the same torch Adam, the same bookkeeping and early stop, and equal pixels.
    Measured difference: 0 in all four cases (1 and 2 threads), every input broken on both sides.
    All that could differ is the normalization's round trip on each side (x → pixels → x → pixels:
    a few roundings of normalized values ≤ 2.7, 2.4e-7 each, times std ≤ 0.229 back in pixels):
    atol 1e-6 is slack. Without the logit shift f differs (it reads the masked class as 0): measured,
    targeting (y + 1) mod 5 on normalized inputs, torchattacks reaches 1 target of 4, we 4 (max
    difference 0.042)."""
    labels = predictions(resnet, batch, stats)
    targets = runner_up(resnet, batch, stats) if targeted else None
    peer = torchattacks.CW(resnet, c=1, kappa=0, steps=50, lr=0.01)
    ours, theirs = attack_both(CW(binary_search_steps=1), peer, resnet, batch, labels, targets, stats)
    assert ours.min() >= 0 and ours.max() <= 1
    ours_broken, theirs_broken = broken(resnet, ours, labels, targets, stats), broken(resnet, theirs, labels, targets, stats)
    assert ours_broken.any()  # it did something
    assert torch.equal(ours_broken, theirs_broken)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    ours_l2, theirs_l2 = perturbation_norms(batch, ours)["l2"], perturbation_norms(batch, theirs)["l2"]
    assert ((ours_l2 - theirs_l2).abs() <= 0.01 * theirs_l2)[ours_broken].all()


def test_an_input_already_misclassified_comes_back_as_torchattacks_returns_it(resnet, batch):
    """Labels the model disagrees with: the very first iterate, w = atanh(2x − 1), is already
    adversarial, and no later one is closer to x (f is clamped at 0 there, so only the distance
    pulls, and Adam's first steps, of size ≈ lr whatever the gradient's size, move away), so
    torchattacks returns x through the tanh round trip; so do we, one round or several (each round
    starts at that iterate, and only a strictly closer one replaces it). Measured: max |x' − x| =
    6.0e-8, inside ROUND_TRIP."""
    wrong = (predictions(resnet, batch) + 1) % CLASSES
    peer = torchattacks.CW(resnet, c=1, kappa=0, steps=20, lr=0.01)
    ours, theirs = attack_both(CW(binary_search_steps=1, steps=20), peer, resnet, batch, wrong, None, PIXELS)
    assert torch.equal(ours, theirs)
    assert (ours - batch).abs().max() <= ROUND_TRIP
    searched = attack(CW(binary_search_steps=3, steps=20), resnet, batch, wrong)
    assert torch.equal(searched, ours)


# ---------------------------------------------------------------- the binary search over c


def test_the_search_never_loses_a_success_and_only_shrinks_distances(resnet, batch):
    """Round 1 of the search is the single-c attack itself (same c, same start, same batch, so the
    same early stop), and later rounds replace an input's result only by a strictly closer
    adversarial: where one c breaks an input, the search does too, at an L2 no larger, exactly.
    Measured: c = 1 breaks all four at L2 0.18, 0.26, 0.12, 0.17; two rounds (c 1, then ½) at
    0.13, 0.21, 0.07, 0.13."""
    labels = predictions(resnet, batch)
    single = attack(CW(binary_search_steps=1), resnet, batch, labels)
    searched = attack(CW(binary_search_steps=2), resnet, batch, labels)
    single_broken, searched_broken = broken(resnet, single, labels, None), broken(resnet, searched, labels, None)
    assert single_broken.any()
    assert searched_broken[single_broken].all()
    single_l2, searched_l2 = perturbation_norms(batch, single)["l2"], perturbation_norms(batch, searched)["l2"]
    assert (searched_l2 <= single_l2)[single_broken].all()
    assert (searched_l2 < single_l2)[single_broken].any()  # a smaller c found closer adversarials


def test_the_search_breaks_inputs_a_too_small_c_cannot(resnet, batch):
    """Targeting the class after each label, (y + 1) mod 5, is far for this model: 30 steps at c = 1
    reach it for none of the four inputs. The search fails that round, so every c becomes 10, and
    its second round is then exactly the single-c attack at 10 (the first left no candidate to keep):
    measured, it reaches the target for all four."""
    labels = predictions(resnet, batch)
    far = (labels + 1) % CLASSES
    too_small = attack(CW(c=1.0, steps=30, binary_search_steps=1), resnet, batch, labels, far)
    searched = attack(CW(c=1.0, steps=30, binary_search_steps=2), resnet, batch, labels, far)
    assert broken(resnet, searched, labels, far).sum() > broken(resnet, too_small, labels, far).sum()
    assert torch.equal(searched, attack(CW(c=10.0, steps=30, binary_search_steps=1), resnet, batch, labels, far))


def test_kappa_is_a_margin_every_result_holds(resnet, batch):
    """With κ > 0 an iterate counts only when its decision holds by κ logits (torchattacks counts any
    flip: at κ = 2 its results hold by 0.06 to 0.33 logits, measured). Checked on the logits of the
    returned pixels, which are the kept iterate's own (pixel inputs, the same batch shape: the same
    forward bit for bit); only the check's own arithmetic differs from the attack's (Z_y + κ against
    Z_i there, Z_i − Z_y here, logits ≤ 32 in size): a few ulps of 32, ≤ 1e-5. Measured: every input
    moved and holds by 2.005 to 2.015."""
    kappa = 2.0
    labels = predictions(resnet, batch)
    adversarial = attack(CW(kappa=kappa, binary_search_steps=1), resnet, batch, labels)
    moved = (adversarial != batch).flatten(1).any(1)
    assert moved.any()
    with torch.no_grad():
        logits = resnet(adversarial)
    held_by = -margin(logits, labels, False, kappa=math.inf)  # max_{i≠y} Z_i − Z_y
    assert (held_by[moved] >= kappa - 1e-5).all()


def test_the_search_rule_is_the_authors():
    """Success: c is the new upper bound, then halfway to the lower one; failure: c is the new lower
    bound, then ×10 while no upper bound is known, else halfway."""
    constant = torch.tensor([1.0, 1.0, 1.0, 1.0])
    lower = torch.tensor([0.0, 0.0, 0.5, 0.0])
    upper = torch.tensor([math.inf, 2.0, math.inf, 4.0])
    succeeded = torch.tensor([True, True, False, False])
    constant, lower, upper = next_constant(constant, lower, upper, succeeded)
    assert constant.tolist() == [0.5, 0.5, 10.0, 2.5]
    assert lower.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert upper.tolist() == [1.0, 1.0, math.inf, 4.0]


def test_f_and_success_on_hand_made_logits():
    """f takes the other classes only: with negative logits torchattacks' one-hot masking would read
    Z_y as max(Z_y, 0) and a 0 among the others. Success needs the margin κ, in both modes."""
    negative = torch.tensor([[-3.0, -1.0, -2.0]])
    assert margin(negative, torch.tensor([0]), False, kappa=5.0).item() == -2.0  # Z_0 − Z_1
    assert margin(negative, torch.tensor([1]), True, kappa=5.0).item() == -1.0  # Z_2 − Z_1
    assert margin(negative, torch.tensor([0]), False, kappa=1.0).item() == -1.0  # clamped at −κ
    logits = torch.tensor([[0.0, 1.5, 1.0]])
    label_1, label_2 = torch.tensor([1]), torch.tensor([2])
    assert not adversarial_now(logits, label_1, False, 0.0) and adversarial_now(logits, label_2, False, 0.0)
    assert adversarial_now(logits, label_2, False, 0.4) and not adversarial_now(logits, label_2, False, 0.6)
    assert adversarial_now(logits, label_1, True, 0.4) and not adversarial_now(logits, label_1, True, 0.6)


# ---------------------------------------------------------------- the model, the global RNG, configs


@pytest.mark.parametrize("size", [1, 3])
def test_the_model_and_the_global_rng_are_left_as_they_were(size):
    model = tiny_relu_net("module_inplace")
    before, rng = state(model), torch.random.get_rng_state()
    pixels = pixel_batch(size, 16)
    adversarial = CW(steps=5, binary_search_steps=2).attack(model, pixels, target=torch.full((size,), 2))
    assert adversarial.shape == pixels.shape
    assert_untouched(model, before)
    assert torch.equal(torch.random.get_rng_state(), rng)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"c": 0}, r"^cw: c must be a positive finite number \(torchattacks uses 1, the paper's code 1e-3\), got 0$"),
        ({"c": -1.0}, r"^cw: c must be a positive finite number .*got -1\.0$"),
        ({"c": "big"}, r"^cw: c must be a positive finite number .*got 'big'$"),
        ({"steps": 0}, r"^cw: steps must be a positive integer, got 0$"),
        ({"binary_search_steps": 0}, r"^cw: binary_search_steps must be a positive integer, got 0$"),
        ({"binary_search_steps": 2.5}, r"^cw: binary_search_steps must be a positive integer, got 2\.5$"),
        ({"kappa": -0.5}, r"^cw: kappa must be a non-negative finite number .*got -0\.5$"),
        ({"lr": 0.0}, r"^cw: lr must be a positive finite number .*got 0\.0$"),
        ({"lr": math.nan}, r"^cw: lr must be a positive finite number .*got nan$"),
        ({"confidence": 1}, r"^cw: unknown field\(s\) confidence; its fields are: binary_search_steps, c, kappa, lr, steps$"),
    ],
)
def test_bad_config_is_refused_in_one_line(fields, message):
    with pytest.raises(ConfigError, match=message):
        configure(CW, CW.name, fields)


def test_a_config_of_whole_numbers_is_taken_as_floats():
    config = CW(c=1, kappa=0, lr=1).config
    assert (config.c, config.kappa, config.lr) == (1.0, 0.0, 1.0) and isinstance(config.c, float)
