"""neural_style (Gatys et al. 2016) on the embedded model: what its defaults achieve, its Gram matrix
and loss, determinism, a model left as it was, bad configs, and one run of the real `vizkit` command."""
from __future__ import annotations

import pytest
import torch

from conftest import images_in, model_state, write_image
from tiny_models import single_thread
from vizkit.core.errors import ConfigError
from vizkit.methods.optimization.neural_style import CONTENT_ERROR_BOUND, NeuralStyle, gram, load_style
from vizkit.optimize.regularizers import total_variation


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def samples(embedded_samples):
    """The default run's content images: the embedded model's 6 samples, 128 px."""
    return embedded_samples


# ------------------------------------------------------------------------------- the MUST HOLD figures


@pytest.mark.parametrize("fields", [{}, {"optimizer": "adam", "lr": 0.03, "steps": 60}], ids=["lbfgs-defaults", "adam"])
def test_style_loss_drops_10x_and_the_content_stays_within_its_bound(embedded, samples, fields):
    """From each content image (init=content): style loss ≤ 1/10 of where it started, content_error ≤
    the documented bound. Margin, measured with the defaults: ratio ≤ 0.036 (≥ 2.7× below 0.1), ≤ 0.040
    under an emulated other CPU (1e-6 gradient jitter, 8 draws); content_error ≤ 0.50 (2× below 1).
    Adam at 60 steps: ratio ≤ 0.039, content_error ≤ 0.55."""
    method = NeuralStyle(**fields)
    assert method.config.init == "content" and (fields or method.config.optimizer == "lbfgs")
    result = method.optimize(embedded, None, samples)
    metrics = result.metrics
    assert result.stopped is None and result.images.shape == samples.shape
    assert torch.all(metrics["content_loss_initial"] == 0) and torch.all(metrics["style_loss_initial"] > 0)
    assert torch.all(metrics["style_ratio"] <= 0.1), metrics["style_ratio"]
    assert torch.allclose(metrics["style_ratio"], metrics["style_loss"] / metrics["style_loss_initial"])
    assert torch.all(metrics["content_error"] <= CONTENT_ERROR_BOUND), metrics["content_error"]
    assert torch.all(metrics["content_error"] > 0)  # the images did change
    assert result.images.min() >= 0 and result.images.max() <= 1


# ------------------------------------------------------------------------------------ the math


def test_gram_matrix_and_style_term_are_the_papers():
    features = torch.randn(2, 5, 6, 7)
    channels, positions = 5, 6 * 7
    flat = features.reshape(2, channels, positions)
    expected = torch.stack([flat[b] @ flat[b].T for b in range(2)]) / (channels * positions)
    torch.testing.assert_close(gram(features), expected)
    # ¼ Σ (G − A)² with G normalized by C·H·W is Gatys et al.'s E_l = 1/(4 N² M²) Σ (FFᵀ − SSᵀ)²
    style = torch.randn(1, channels, 6, 7).reshape(channels, positions)
    ours = 0.25 * (gram(features) - gram(style.reshape(1, channels, 6, 7))).pow(2).sum((1, 2))
    paper = torch.stack([((flat[b] @ flat[b].T - style @ style.T) ** 2).sum() / (4 * channels**2 * positions**2) for b in range(2)])
    torch.testing.assert_close(ours, paper)


def test_losses_from_one_forward_equal_a_direct_computation(embedded, samples):
    method = NeuralStyle(tv_weight=0.5)
    problem = method.problem(embedded, None, samples[:2])
    modules = dict(embedded.named_modules())
    with torch.no_grad():
        noisy = (samples[:2] + 0.1 * torch.randn(samples[:2].shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
        problem.image.pixels.copy_(noisy)
        total, parts = problem.compute_loss(1)

        def run(pixels):
            recorded = {}
            hooks = [modules[name].register_forward_hook(lambda m, i, o, name=name: recorded.setdefault(name, o.clone()))
                     for name in ["layer2", "act1", "layer1", "layer3"]]
            embedded((pixels - problem.mean) / problem.std)
            for hook in hooks:
                hook.remove()
            return recorded

        x, content, style = run(noisy), run(samples[:2]), run(load_style("shapes:train:7", samples))
    content_loss = (x["layer2"] - content["layer2"]).pow(2).flatten(1).mean(1)
    style_loss = sum(0.25 * (gram(x[n]) - gram(style[n])).pow(2).sum((1, 2)) for n in ["act1", "layer1", "layer2", "layer3"]) / 4
    tv = total_variation(noisy) / (128 * 128)
    torch.testing.assert_close(parts["content"], content_loss.mean(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(parts["style"], style_loss.mean(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(total, (content_loss + 100 * style_loss + 0.5 * tv).sum(), rtol=1e-4, atol=1e-7)


def test_several_style_images_average_their_gram_targets(embedded, samples):
    one, two = ("sample:star_2", "sample:cross_5")
    both = NeuralStyle(style=[one, two]).problem(embedded, None, samples[:1])
    singles = [NeuralStyle(style=[name]).problem(embedded, None, samples[:1]) for name in (one, two)]
    for index in range(4):
        name = f"style_target_{index}"
        torch.testing.assert_close(getattr(both, name), (getattr(singles[0], name) + getattr(singles[1], name)) / 2)


def test_init_style_starts_from_the_style_image(embedded, samples):
    problem = NeuralStyle(init="style", style=["sample:star_2"]).problem(embedded, None, samples)
    star = samples[4]  # the sample named star_2: the style image itself, resized 128 -> 128
    assert torch.allclose(problem.pixels(), star.expand_as(samples), atol=1e-6)
    assert torch.all(problem.style_loss_initial < 1e-8) and torch.all(problem.content_loss_initial[[0, 1, 2, 3, 5]] > 0)


# ------------------------------------------------------------------------------ determinism, the model


def test_noise_init_is_seeded_and_leaves_the_global_rng_alone(embedded, samples):
    state = torch.random.get_rng_state()
    runs = [NeuralStyle(init="noise", seed=seed, steps=3).optimize(embedded, None, samples[:2]).images for seed in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_model_is_left_as_it_was(embedded, samples):
    embedded.layer1.train()  # a mixed state: some modules training, one parameter frozen
    embedded.fc.weight.requires_grad_(False)
    before = model_state(embedded)
    weights = {name: value.clone() for name, value in embedded.state_dict().items()}
    try:
        NeuralStyle(steps=2).optimize(embedded, None, samples[:2])
        assert model_state(embedded) == before
        assert all(not module._forward_hooks for module in embedded.modules())
        assert all(torch.equal(value, weights[name]) for name, value in embedded.state_dict().items())  # BatchNorm stats too
    finally:
        embedded.eval()
        embedded.fc.weight.requires_grad_(True)


# ------------------------------------------------------------------------------------------ bad config


def test_unknown_layers_are_refused_before_any_work_with_close_matches(embedded, samples):
    method = NeuralStyle(style_layers=["act1", "layer2.0.conv"])
    with pytest.raises(ConfigError, match=r"neural_style\.style_layers: layer 'layer2\.0\.conv' not found.*closest: .*layer2\.0\.conv1"):
        method.check(embedded)
    with pytest.raises(ConfigError, match=r"content_layer: layer 'layr2' not found.*layer2"):
        NeuralStyle(content_layer="layr2").problem(embedded, None, samples[:1])


def test_missing_style_files_name_the_path_and_close_matches(tmp_path):
    write_image(tmp_path / "starry_night.png")
    with pytest.raises(ConfigError, match=rf"style image not found: {tmp_path}/stary_night.png; closest: starry_night.png"):
        NeuralStyle(style=[str(tmp_path / "stary_night.png")])
    with pytest.raises(ConfigError, match=r"folder .*nowhere does not exist"):
        NeuralStyle(style=[str(tmp_path / "nowhere" / "style.png")])
    with pytest.raises(ConfigError, match=r"no sample image 'star'; closest: star_2"):
        NeuralStyle(style=["sample:star"])
    assert NeuralStyle(style=[str(tmp_path / "starry_night.png")]).config.style == [str(tmp_path / "starry_night.png")]


@pytest.mark.parametrize("fields, message", [
    ({"style_weight": -1.0}, "style_weight must be a finite non-negative number"),
    ({"content_weight": float("nan")}, "content_weight must be a finite non-negative number"),
    ({"tv_weight": float("inf")}, "tv_weight must be a finite non-negative number"),
    ({"style_weight": 0.0}, "style_weight must be positive"),
    ({"style": []}, "at least one style image"),
    ({"style_layers": ["layer1", "layer1"]}, "names layer1 more than once"),
    ({"init": "white"}, "init must be one of content, noise, style"),
    ({"optimizer": "adam"}, "use method.lr=0.03"),
    ({"style": ["shapes:train"]}, "shapes:SPLIT:INDEX"),
    ({"style": ["shapes:holdout:3"]}, "holdout"),
])
def test_bad_config(fields, message):
    with pytest.raises(ConfigError, match=message):
        NeuralStyle(**fields)


# ------------------------------------------------------------------------------------ the vizkit command


def test_neural_style_run_writes_metrics_and_images(vizkit_cli):
    run = vizkit_cli("method=neural_style", "method.steps=4", "method.log_every=2", "trainer.progress_bar=false", env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    results = run.results
    assert results["method"]["config"]["optimizer"] == "lbfgs" and results["timings"]["steps"] == 4
    assert len(results["images"]) == 6 and results["stopped"] is None
    assert [image["source"].rsplit("/", 1)[-1] for image in results["images"]][:2] == ["circle_16.png", "cross_5.png"]
    for image in results["images"]:
        assert (run.run_dir / image["png"]).is_file()
        assert image["metrics"]["content_loss_initial"] == 0 and 0 < image["metrics"]["style_ratio"] < 1
    metrics = results["metrics"]
    assert {"style_loss", "style_ratio", "content_loss", "content_error", "style_loss_initial"} <= set(metrics)
    assert metrics["loss_style_last"] < metrics["loss_style_first"]
    tags = images_in(run.run_dir)
    assert [image["name"] for image in results["images"]][:2] == ["circle_16", "cross_5"]  # the inputs' names
    assert [event.step for event in tags["circle_16/image"]] == [0, 2, 4]
    assert len([tag for tag in tags if tag.endswith("/image")]) == 6
