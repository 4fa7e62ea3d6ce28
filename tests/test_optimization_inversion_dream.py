"""inversion (Mahendran & Vedaldi 2015) and deep_dream (Mordvintsev et al. 2015) on the embedded model:
the figures the issue asks for, the batch layout, determinism, the model left alone, config errors,
and one real `vizkit` run each."""
from __future__ import annotations

import pytest
import torch
from conftest import images_in
from tiny_models import rounding, single_thread

import vizkit
from vizkit.core.errors import ConfigError
from vizkit.core.hooks import layer_outputs
from vizkit.core.models import find_layer
from vizkit.optimize.loop import frozen


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def model(embedded):
    return embedded


@pytest.fixture(scope="module")
def samples(embedded_samples):
    return embedded_samples


def features(model, pixels, layers):
    """Each layer's output for pixels in [0, 1], computed apart from the methods."""
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad(), frozen(model):
        _, outputs = layer_outputs(model, (pixels - mean) / std, {name: find_layer(model, name) for name in layers})
    return outputs


def relative_error_tolerance(model, layer, errors, size):
    """|Δr| for r = ‖f(x̂) − f(x)‖ / ‖f(x)‖: each feature map off by ≈ rounding·‖f‖ (‖f(x̂)‖ ≤ (1 + r)‖f(x)‖,
    so (2 + r)·rounding), plus the two norms' reductions over ``size`` values (r·√size·6e-8)."""
    return (2 + errors) * rounding(model, layer) + errors * size**0.5 * 6e-8


def relative_errors(model, reconstructed, originals, layer):
    ours, theirs = features(model, reconstructed, [layer])[layer], features(model, originals, [layer])[layer]
    return (ours - theirs).flatten(1).norm(dim=1) / theirs.flatten(1).norm(dim=1)


# ------------------------------------------------------------------------------------------ inversion


def test_inversion_reconstructs_an_early_layer_within_ten_percent(model, samples):
    """Measured: max relative error 0.0327 (3.1× under 0.1), feature loss last/first 7.5e-4 (13× under
    1/100); identical at 2 threads and unchanged (6 digits) under a 1e-6 relative gradient jitter (4 seeds)."""
    method = vizkit.create_method("inversion")
    assert method.config.layers == []  # the model's first nonlinearity: the embedded model's conv1.2 (stem conv, BN, ReLU)
    result = method.optimize(model, images=samples)
    assert result.stopped is None and result.images.shape == samples.shape
    assert result.names == [f"input{row}@conv1.2" for row in range(len(samples))]
    measured = relative_errors(model, result.images, samples, "conv1.2")
    # measured |Δ| ≤ 1.5e-8 (1.3e-8 against a float64 model), the derived bound 0.9-1.1e-6: 60× inside
    size = features(model, samples[:1], ["conv1.2"])["conv1.2"].numel()
    assert ((result.metrics["relative_error"] - measured).abs() <= relative_error_tolerance(model, "conv1.2", measured, size)).all()
    assert measured.max() < 0.1, measured  # every image, within the default steps
    first, last = result.history.first_and_last("feature")
    assert last < first / 100


def test_inversion_batches_inputs_by_layers_with_one_forward_per_step(model, samples):
    layers = ["conv1.2", "layer1"]
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, inputs: forwards.append(inputs[0].shape[0]))
    try:
        result = vizkit.create_method("inversion", layers=layers, steps=3).optimize(model, images=samples[:2])
    finally:
        handle.remove()
    # input-major: row b * L + l is input b from layer l (the grid's rows are inputs when L columns fit)
    assert result.names == ["input0@conv1.2", "input0@layer1", "input1@conv1.2", "input1@layer1"]
    # Φ0 once, one image to size the batch's memory (vizkit.core.memory), one forward of the whole batch per
    # Adam step, one to measure
    assert forwards == [2] + [1] + [4] * 3 + [4]
    errors = result.metrics["relative_error"]
    for row, (source, layer) in enumerate((b, layer) for b in range(2) for layer in layers):
        expected = relative_errors(model, result.images[row : row + 1], samples[source : source + 1], layer)
        # its own layer only; measured |Δ| ≤ 3e-7 (r ≈ 0.6-0.7), derived bounds 1.7e-5 (layer1), 1.0e-5 (conv1.2): 33× inside
        size = features(model, samples[:1], [layer])[layer].numel()
        assert (errors[row : row + 1] - expected).abs() <= relative_error_tolerance(model, layer, expected, size)


def test_inversion_gray_init_starts_from_mid_gray(model, samples):
    problem = vizkit.create_method("inversion", init="gray").problem(model, images=samples[:1])
    assert torch.all(problem.pixels() == 0.5)
    noisy = vizkit.create_method("inversion").problem(model, images=samples[:1]).pixels().detach()
    assert 0.05 < float(noisy.std()) < 0.15 and abs(float(noisy.mean()) - 0.5) < 0.01


# ----------------------------------------------------------------------------------------- deep dream


def test_deep_dream_raises_the_layer_activation_norm_fivefold(model, samples):
    """Measured (1 thread): ‖a_layer3‖ gain 5.77-8.63 over the six samples, min 5.77 = 1.15× the bound of 5.
    Robustness: identical at 2 threads; under a 1e-6 relative gradient jitter (4 seeds, as another
    CPU's rounding) the min moved 5.758-5.785 (≤ 0.3 %) and any image's gain by ≤ 1.4 %, so the 0.77
    margin is ≈ 10× the spread. The margin is still below the 1.5× aim: defaults tried (lr, steps,
    octaves) plateau below 7.5 because of the [0, 1] clamp (see the first review)."""
    method = vizkit.create_method("deep_dream")
    assert method.default_target_for(model) == "layer:layer3"  # the stage before the last
    result = method.optimize(model, images=samples)
    assert result.stopped is None and result.images.shape == samples.shape
    before = features(model, samples, ["layer3"])["layer3"].flatten(1)
    after = features(model, result.images, ["layer3"])["layer3"].flatten(1)
    norm_gain = after.norm(dim=1) / before.norm(dim=1)
    assert norm_gain.min() >= 5, norm_gain  # ‖a_L‖ itself, every image, with the default settings
    # what the method reports: the objective (mean squared activation) and its ratio, ‖a‖ gain squared.
    # mean(a²) is off by 2·rounding(layer3) + √n·6e-8 relative (n = 12288 values): 2.4e-5; the gain, a
    # ratio of two, twice that. Measured 1e-7 and 3e-7 (also against a float64 model): > 80× inside.
    score_rtol = 2 * rounding(model, "layer3") + after.shape[1] ** 0.5 * 6e-8
    torch.testing.assert_close(result.metrics["score"], after.pow(2).mean(1), rtol=score_rtol, atol=0)
    torch.testing.assert_close(result.metrics["activation_gain"], norm_gain**2, rtol=2 * score_rtol, atol=0)


def test_deep_dream_channel_target_raises_that_channel(model, samples):
    # one channel reacts sharply: the default lr overshoots it (see the module docstring). Measured gains
    # 1.201 and 4.705 (> 1: the first only 1.2×), unchanged to 5 digits under a 1e-6 gradient jitter
    result = vizkit.create_method("deep_dream", steps=12, octaves=1, lr=0.005).optimize(model, "channel:layer2:5", images=samples[:2])
    before = features(model, samples[:2], ["layer2"])["layer2"][:, 5].flatten(1).mean(1)
    # the method's original score and ``before``: the same channel mean (256 values) of layer2, each off
    # by rounding(layer2) + √256·6e-8 ≈ 7.4e-6 relative; measured equal (the same ops)
    rtol = 2 * (rounding(model, "layer2") + 256**0.5 * 6e-8)
    torch.testing.assert_close(result.metrics["score"] / before, result.metrics["activation_gain"], rtol=rtol, atol=0)
    assert torch.all(result.metrics["activation_gain"] > 1)


def test_deep_dream_octaves_run_coarse_to_fine_on_one_full_size_image(model, samples):
    problem = vizkit.create_method("deep_dream", steps=9, octaves=3, octave_scale=2.0, jitter=0).problem(model, images=samples[:1])
    assert [problem.octave(step) for step in range(1, 10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [tuple(problem.view(step).shape[-2:]) for step in (1, 4, 7)] == [(32, 32), (64, 64), (128, 128)]
    (parameter,) = problem.trainable()  # one parameter, at full size
    assert parameter is problem.image.pixels and parameter.shape == (1, 3, 128, 128)
    with frozen(model):
        loss, _ = problem.loss(1)
        loss.backward()
    gradient = problem.image.pixels.grad
    assert gradient.shape == (1, 3, 128, 128) and bool((gradient != 0).float().mean() > 0.9)  # the coarse view reaches every pixel


def test_deep_dream_sgd_takes_the_originals_normalized_step(model, samples):
    """optimizer=sgd: g / mean|g| per image, so lr is the mean step per pixel, as in the original."""
    problem = vizkit.create_method("deep_dream", optimizer="sgd", octaves=2).problem(model, images=samples[:2])
    with frozen(model):
        loss, _ = problem.loss(1)
        loss.backward()
    # a float32 mean of n = 3·128·128 values: √n·6e-8 = 1.3e-5 relative; measured 6e-8 (1 ulp)
    torch.testing.assert_close(problem.image.pixels.grad.abs().mean((1, 2, 3)), torch.ones(2), rtol=(3 * 128 * 128) ** 0.5 * 6e-8, atol=0)


def test_deep_dream_jitter_is_a_seeded_roll_replayed_per_step(model, samples):
    problem = vizkit.create_method("deep_dream", steps=4, octaves=1, jitter=5).problem(model, images=samples[:1])
    pixels = problem.pixels()
    shifts = set()
    for step in range(1, 5):
        view = problem.view(step)
        assert torch.equal(view, problem.view(step))  # L-BFGS re-evaluating a step sees the same shift
        matches = [(y, x) for y in range(-5, 6) for x in range(-5, 6) if torch.equal(view, torch.roll(pixels, (y, x), (-2, -1)))]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 1


# ------------------------------------------------------------------------------------ both methods


CASES = {
    "inversion": ({"layers": ["conv1.2", "layer1"], "steps": 4}, None),
    "deep_dream": ({"steps": 4, "octaves": 2, "jitter": 4}, "layer:layer2"),
}


@pytest.mark.parametrize("name", CASES)
def test_seeded_runs_are_equal_and_leave_the_global_rng_alone(model, samples, name):
    fields, target = CASES[name]
    state = torch.random.get_rng_state()
    first, again = (vizkit.create_method(name, seed=3, **fields).optimize(model, target, images=samples[:2]) for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first.images, again.images)
    assert first.history.losses == again.history.losses
    other = vizkit.create_method(name, seed=4, **fields).optimize(model, target, images=samples[:2])
    assert not torch.equal(first.images, other.images)  # the seed drives the noise init / the jitter


@pytest.mark.parametrize("name", CASES)
def test_the_model_is_left_as_it_was(samples, name):
    model = vizkit.load_model("embedded")
    model.train()
    model.layer1.eval()
    for index, parameter in enumerate(model.parameters()):
        parameter.requires_grad_(index % 2 == 0)
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    fields, target = CASES[name]
    vizkit.create_method(name, **fields).optimize(model, target, images=samples[:2])
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    for key, value in model.state_dict().items():  # BatchNorm statistics too: the forwards ran in eval mode
        assert torch.equal(value, weights[key]), key


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "name,fields,message",
    [
        ("inversion", {"layers": [""]}, r"layers must name layers"),
        ("inversion", {"layers": "conv1.2"}, r"a list of layer names, e.g. layers=\[conv1.2\]"),
        ("inversion", {"layers": ["layer1", "layer1"]}, r"layers lists layer1 more than once"),
        ("inversion", {"alpha": 0.5}, r"alpha must be at least 1"),
        ("inversion", {"tv_beta": 0.5}, r"tv_beta must be at least 1"),
        ("inversion", {"tv_weight": -1.0}, r"tv_weight must be non-negative"),
        ("inversion", {"alpha_weight": float("nan")}, r"alpha_weight must be non-negative"),
        ("inversion", {"init": "zeros"}, r"init must be one of noise, gray, got 'zeros'"),
        ("inversion", {"steps": 0}, r"steps must be a positive integer"),
        ("deep_dream", {"octaves": 0}, r"octaves must be a positive integer"),
        ("deep_dream", {"octaves": 5, "steps": 4}, r"octaves \(5\) cannot exceed steps \(4\)"),
        ("deep_dream", {"octave_scale": 0.5}, r"octave_scale must be at least 1"),
        ("deep_dream", {"jitter": -1}, r"jitter must be a whole number of pixels >= 0"),
        ("deep_dream", {"optimizer": "rmsprop"}, r"optimizer must be one of adam, lbfgs, sgd"),
    ],
)
def test_bad_values_are_config_errors(name, fields, message):
    with pytest.raises(ConfigError, match=message):
        vizkit.create_method(name, **fields)


def test_inversion_unknown_layer_is_refused_before_any_work(model, samples):
    method = vizkit.create_method("inversion", layers=["conv1.2", "layr2"])
    with pytest.raises(ConfigError, match=r"layer 'layr2' not found in ResNet; closest: layer2"):
        method.check(model)
    with pytest.raises(ConfigError, match=r"layer 'layr2' not found.*closest: layer2"):
        method.problem(model, images=samples[:1])


@pytest.mark.parametrize(
    "target,message",
    [
        ("layer:layr3", r"layer 'layr3' not found in ResNet; closest: layer3"),
        ("class:circle", r"deep_dream amplifies a layer or a channel; got a class target"),
        ("neuron:layer3:0:1:1", r"got a neuron target"),
    ],
)
def test_deep_dream_bad_targets(model, samples, target, message):
    with pytest.raises(ConfigError, match=message):
        vizkit.create_method("deep_dream").problem(model, target, images=samples[:1])


def test_bad_calls(model, samples):
    with pytest.raises(ConfigError, match=r"inversion takes no target"):
        vizkit.create_method("inversion").problem(model, "layer:layer1", images=samples[:1])
    for name in CASES:
        with pytest.raises(ConfigError, match=rf"{name} starts from images"):
            vizkit.create_method(name).problem(model)
    with pytest.raises(ConfigError, match=r"5 octaves of scale 2 shrink the 128x128 images to 8x8 at the coarsest; use fewer octaves"):
        vizkit.create_method("deep_dream", octaves=5, octave_scale=2.0).problem(model, images=samples[:1])


# ---------------------------------------------------------------------------------- the vizkit command


def test_inversion_through_the_vizkit_command(vizkit_cli):
    run = vizkit_cli("method=inversion", "method.steps=4", "method.log_every=2", "method.layers=[conv1.2,layer1]",
                     "data=shapes", "data.count=2", env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    results = run.results
    records = results["images"]
    # input-major, each result named after its input (input0@conv1.2 -> test00000_hexagon_conv1.2)
    assert [(record["source"], record["name"].rsplit("_", 1)[1]) for record in records] == [
        ("shapes:test:0", "conv1.2"), ("shapes:test:0", "layer1"), ("shapes:test:1", "conv1.2"), ("shapes:test:1", "layer1")]
    names = [record["name"] for record in records]
    for record in records:
        assert (run.run_dir / record["png"]).is_file() and 0 < record["metrics"]["relative_error"] < 2
    assert results["metrics"]["loss_feature_last"] < results["metrics"]["loss_feature_first"]
    assert (run.run_dir / "images" / "grid.png").is_file()
    tags = images_in(run.run_dir)
    for name in names:
        assert [event.step for event in tags[f"{name}/image"]] == [0, 2, 4]


def test_deep_dream_through_the_vizkit_command(vizkit_cli):
    run = vizkit_cli("method=deep_dream", "method.steps=4", "method.log_every=2", "method.octaves=2",
                     "data=shapes", "data.count=2", env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    results = run.results
    records = results["images"]
    assert [record["source"] for record in records] == ["shapes:test:0", "shapes:test:1"]
    assert results["target"] == "layer:layer3"  # the default target, recorded as used
    names = [record["name"] for record in records]
    for record in records:
        assert record["metrics"]["activation_gain"] > 1 and record["metrics"]["score"] > 0
    assert results["metrics"]["activation_gain"] > 1
    tags = images_in(run.run_dir)
    for name in names:
        events = tags[f"{name}/image"]
        assert [event.step for event in events] == [0, 2, 4]
        assert events[0].encoded_image_string != events[-1].encoded_image_string  # the dream formed
