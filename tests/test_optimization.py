"""The optimization family's shared machinery, class_model and feature_viz, on the embedded model:
the Python API (plain torch loop) and the `vizkit` command (a real Lightning fit, real TensorBoard)."""
from __future__ import annotations

import json

import pytest
import torch

import vizkit
from conftest import hparams_in, images_in, model_state
from tiny_models import single_thread
from vizkit.core.errors import ConfigError
from vizkit.core.hooks import layer_outputs
from vizkit.optimize.objectives import Objective, diversity, parse_terms
from vizkit.optimize.regularizers import YosinskiConfig, alpha_norm, l2, total_variation, yosinski_step


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


# ------------------------------------------------------------------ class_model


def test_class_model_reaches_every_class_within_its_default_steps(embedded):
    """Simonyan et al. 2014 from the zero (mean) image: every class of the embedded model ≥ 0.99.
    Measured: min 0.99996 (1 − p = 4e-5 against 0.01, 230×); under a 1e-6 relative gradient jitter
    (4 seeds) 1 − p ≤ 8e-5: still 125× inside."""
    before = model_state(embedded)
    result = vizkit.create_method("class_model").optimize(embedded)
    assert result.names == ["circle", "square", "triangle", "star", "cross", "hexagon"]
    assert result.metrics["probability"].min() >= 0.99, result.metrics["probability"]
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert result.stopped is None
    assert model_state(embedded) == before  # flags, modes and hooks as they were
    assert all(p.grad is None for p in embedded.parameters())  # only the image's gradient was computed


def test_class_model_starts_from_the_mean_image_and_the_l2_prior_holds_it_back(embedded):
    steps = []
    vizkit.create_method("class_model", steps=1).optimize(embedded, "class:star", on_step=lambda step, problem: steps.append(problem.pixels().detach().clone()))
    mean = torch.tensor(embedded.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    torch.testing.assert_close(steps[0], mean.expand_as(steps[0]))
    strong = vizkit.create_method("class_model", steps=30, l2=1.0).optimize(embedded, "class:star")
    weak = vizkit.create_method("class_model", steps=30, l2=0.0).optimize(embedded, "class:star")
    distance = lambda r: (r.images - mean).pow(2).sum()
    assert distance(strong) < distance(weak)


def test_class_model_with_yosinski_regularizers_and_jitter(embedded):
    """Measured: both 1.0000 against 0.9."""
    config = {"decay": 0.01, "blur_every": 4, "blur_sigma": 0.5, "clip_norm": 10, "clip_contribution": 10}
    result = vizkit.create_method("class_model", steps=60, transforms=["jitter:4"], yosinski=config).optimize(embedded, ["class:circle", "class:3"])
    assert result.names == ["circle", "star"]
    assert result.metrics["probability"].min() > 0.9


@pytest.mark.parametrize("target, message", [
    ("channel:layer3:0", "class_model optimizes class scores"),
    ("class:sqare", "square"),
    ("class:9", "out of range"),
])
def test_class_model_bad_targets(embedded, target, message):
    with pytest.raises(ConfigError, match=message):
        vizkit.create_method("class_model", steps=1).optimize(embedded, target)


@pytest.mark.parametrize("fields, message", [
    ({"optimizer": "adagrad"}, "optimizer must be one of"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"lr": -1.0}, "lr must be positive"),
    ({"transforms": ["jiter:4"]}, "jitter"),
    ({"yosinski": {"clip_norm": 120}}, "percentile"),
])
def test_optimization_bad_config(fields, message):
    with pytest.raises(ConfigError, match=message):
        vizkit.create_method("class_model", **fields)


# ------------------------------------------------------------------ feature_viz


def test_feature_viz_raises_its_channel_and_is_seeded(embedded):
    """Measured: the objective goes 0.168 → 0.444 (2.65×, 1.32× the 2× bound; +0.276, 1.38× the
    +0.2 bound), below the 1.5× aim but stable: the same at 2 threads and within 1e-4 under a 1e-6
    relative gradient jitter (4 seeds), so each margin is > 500× its spread."""
    before = model_state(embedded)
    method = vizkit.create_method("feature_viz", steps=24, size=64)
    first = method.optimize(embedded, "channel:layer3:5")
    assert model_state(embedded) == before and all(p.grad is None for p in embedded.parameters())  # no hook outlives a run
    again = vizkit.create_method("feature_viz", steps=24, size=64).optimize(embedded, "channel:layer3:5")
    other = vizkit.create_method("feature_viz", steps=24, size=64, seed=1).optimize(embedded, "channel:layer3:5")
    torch.testing.assert_close(first.images, again.images, rtol=0, atol=0)
    assert not torch.equal(first.images, other.images)
    start, end = first.history.first_and_last("objective")
    assert end > 2 * start and end > start + 0.2  # the channel's mean activation went up


def test_feature_viz_weighted_terms_and_diversity(embedded):
    target = [{"target": "channel:layer3:5", "weight": 1.0}, {"target": "neuron:layer2:3:4:4", "weight": 0.5}]
    result = vizkit.create_method("feature_viz", steps=8, size=48, batch=3, diversity=2.0).optimize(embedded, target)
    assert len(result.names) == 3 and result.images.shape == (3, 3, 48, 48)
    assert "similarity" in result.history.losses


def test_objective_is_the_weighted_sum_of_its_terms_from_one_forward(embedded):
    """The reference runs the same forward (its activations equal the objective's bit for bit), so
    the only difference is the float32 reductions of the score: the reference sums in float64 and the
    bound is 6e-8 × √n × (|terms| summed), n = 3072 the largest reduction (layer2, 48×8×8), ≈ 2.4e-5
    here; measured ≤ 1.8e-7 (at 1 and 2 threads), 130× below it."""
    x = torch.rand(2, 3, 64, 64)
    terms = parse_terms(["channel:layer3:5", {"target": "layer:layer2", "weight": 2.0}, "class:star"], embedded, 2)
    forwards = []
    handle = embedded.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        score, activations, logits = Objective(terms).evaluate(embedded, x)
    finally:
        handle.remove()
    assert len(forwards) == 1
    _, reference = layer_outputs(embedded, x, {"layer3": terms[0].target.module, "layer2": terms[1].target.module})
    channel, layer, logit = reference["layer3"][:, 5].double(), reference["layer2"].double(), embedded(x)[:, 3].double()
    expected = channel.mean((1, 2)) + 2 * layer.pow(2).mean((1, 2, 3)) + logit
    magnitude = channel.abs().mean((1, 2)) + 2 * layer.pow(2).mean((1, 2, 3)) + logit.abs()
    bound = 6e-8 * layer[0].numel() ** 0.5 * magnitude
    assert ((score.double() - expected).abs() <= bound).all(), (score.double() - expected, bound)


def test_layer_outputs_stop_after_the_deepest_layer_and_keep_true_values(embedded):
    x = torch.rand(1, 3, 32, 32)
    modules = dict(embedded.named_modules())
    reached = []
    handle = modules["layer4"].register_forward_pre_hook(lambda *_: reached.append(1))
    try:
        _, outputs = layer_outputs(embedded, x, {"layer1.0.bn2": modules["layer1.0.bn2"], "layer2": modules["layer2"]})
    finally:
        handle.remove()
    assert not reached
    assert outputs["layer1.0.bn2"].min() < 0  # bn2's output before the in-place ReLU that follows it


def test_diversity_is_zero_for_one_image_and_one_for_copies():
    a = torch.rand(1, 4, 5, 5)
    assert diversity(a) == 0
    torch.testing.assert_close(diversity(a.repeat(3, 1, 1, 1)), torch.tensor(1.0))


def test_priors():
    """Sums of n equal float32 terms: summed one after another the rounding errors all lean the same
    way, so the bound is n × 6e-8 relative (147 terms: 8.8e-6; 192: 1.2e-5), not √n. Measured: torch
    ≤ 1e-7; an emulated sequential / 4-32-lane SIMD sum ≤ 1.2e-6 (TV), 3.9e-7 (l2), 5.8e-7 (α-norm),
    7-30× inside. The ramp's 49 and the flat image's 0 are exact in any order."""
    flat = torch.full((1, 3, 8, 8), 0.7)
    assert total_variation(flat).item() == 0 and total_variation(flat, beta=1).item() == pytest.approx(3 * 7 * 7 * 1e-4, rel=147 * 6e-8)  # the 1e-8 floor under the root
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8)
    assert total_variation(ramp).item() == 7 * 7  # each of 7x7 pairs differs by 1 horizontally
    torch.testing.assert_close(l2(flat), torch.tensor([0.49 * 192]), rtol=192 * 6e-8, atol=0)
    torch.testing.assert_close(alpha_norm(-flat, alpha=6), torch.tensor([0.7**6 * 192]), rtol=192 * 6e-8, atol=0)
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    yosinski_step(x, None, 1, YosinskiConfig(clip_norm=50))
    assert (x[:, :, :2] == 0).all() and (x[:, :, 2:] > 0).all()  # the lower half of the norms set to the mean


# ------------------------------------------------------------------ the vizkit command


def test_class_model_run_logs_the_image_forming(vizkit_cli):
    """40 steps, mean probability > 0.9: measured per class ≥ 0.9991 in process (≥ 0.9996 under a 1e-6
    gradient jitter), 1 − p ≤ 0.0009 against 0.1, > 100× inside."""
    run = vizkit_cli("method=class_model", "method.steps=40", "method.log_every=16", "trainer.progress_bar=false")
    assert run.returncode == 0, run.stderr
    results = run.results
    assert [image["name"] for image in results["images"]] == ["circle", "square", "triangle", "star", "cross", "hexagon"]
    assert results["metrics"]["probability"] > 0.9 and results["metrics"]["loss_total_last"] < results["metrics"]["loss_total_first"]
    assert results["timings"]["steps"] == 40 and results["stopped"] is None
    for image in results["images"]:
        assert (run.run_dir / image["png"]).is_file()
    assert (run.run_dir / "images" / "grid.png").is_file()
    assert not (run.run_dir / "checkpoints").exists()  # opt-in: image_checkpoint=true (tests/test_api_contract.py)
    tags = images_in(run.run_dir)
    assert [event.step for event in tags["star/image"]] == [0, 16, 32, 40]
    start = hparams_in(run.run_dir)["_hparams_/session_start_info"].decode("latin-1")
    assert "method.l2" in start and "_hparams_/experiment" not in hparams_in(run.run_dir)  # a sweep's, not a run's
    assert "1 image(s)" not in run.stdout and "6 image(s), 40 steps" in run.stdout


def test_the_lightning_fit_and_the_plain_loop_agree(compose, tmp_path, embedded):
    """Both in this process at one thread (the fixture; Lightning leaves the thread count alone,
    checked), the same Problem, make_optimizer and loss.backward: the same ops in the same order on
    whatever CPU, so the losses and the objective agree bit for bit (measured). A tolerance here could
    not be derived: after Adam steps a rounding difference is not bounded by the reductions' error."""
    from vizkit.cli.app import run

    results = run(compose("method=feature_viz", "method.steps=6", "method.size=48", "target=channel:layer3:5"), tmp_path / "run")
    plain = vizkit.create_method("feature_viz", steps=6, size=48).optimize(embedded, "channel:layer3:5")
    assert results["history"]["total"] == plain.history.losses["total"]
    assert results["metrics"]["objective"] == float(plain.metrics["objective"][0])


def test_a_diverging_loss_stops_the_run_and_keeps_what_was_logged(vizkit_cli):
    run = vizkit_cli("method=class_model", "method.max_loss=1", "trainer.progress_bar=false")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "class_model stopped: the loss exploded" in run.stderr and "at step 1" in run.stderr
    (run_dir,) = [p.parent for p in run.cwd.glob("outputs/*/*/results.json")]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stopped"].startswith("the loss exploded") and results["status"] == "failed" and "class_model stopped" in results["error"]
    assert [event.step for event in images_in(run_dir)["star/image"]] == [0]


@pytest.mark.parametrize("args, message", [
    (["method=feature_viz"], "feature_viz needs a target"),
    (["method=feature_viz", "target=channel:layr3:5"], "layer3"),
    (["method=class_model", "trainer.devices=2"], "one device"),
])
def test_optimization_bad_input(vizkit_cli, args, message):
    run = vizkit_cli(*args, "method.steps=2", "trainer.progress_bar=false")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert message in run.stderr, run.stderr
