"""Metrics through the runner and the comparison experiment: what lands in results.json, TensorBoard
and the sweep's summary, and what the embedded model's maps score."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import hparams_in, read_events

from vizkit.core.errors import ConfigError
from vizkit.methods.registry import names_of_kind
from vizkit.cli.app import run

PERTURBATION_METRICS = ["road_morf", "road_lerf", "average_drop", "increase_in_confidence", "infidelity", "sensitivity_max"]
FAST_CURVES = ["metrics.deletion.steps=8", "metrics.insertion.steps=8", "metrics.road_morf.percentiles=[50]", "metrics.road_lerf.percentiles=[50]",
               "metrics.infidelity.samples=2", "metrics.sensitivity_max.samples=1"]


def scalars_in(run_dir):
    values = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = read_events(events)
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, []).extend(event.value for event in accumulator.Scalars(tag))
    return values


def test_metrics_land_in_results_tensorboard_and_hparams(compose, tmp_path):
    cfg = compose("data=shapes", "data.count=3", "method=gradcam", "metrics=[deletion,insertion,pointing_game,mask_energy]", *FAST_CURVES[:2])  # the curves it runs
    results = run(cfg, tmp_path)
    names = ["deletion", "insertion", "pointing_game", "mask_energy"]
    for record in results["inputs"]:
        assert set(record["metrics"]) == set(names) and all(0 <= v <= 1 for v in record["metrics"].values())
        assert len(record["curves"]["deletion"]) == len(record["curves"]["insertion"]) == 9
    for name in names:
        assert results["metrics"][name] == pytest.approx(np.mean([r["metrics"][name] for r in results["inputs"]]))
    assert results["curves"]["deletion"]["steps"] == pytest.approx([k / 8 for k in range(9)])
    assert results["metric_configs"]["deletion"] == {"better": "lower", "steps": 8, "substrate": "black", "batch_size": 16}
    scalars = scalars_in(tmp_path)
    assert scalars["metrics/deletion"] == [pytest.approx(results["metrics"]["deletion"])]
    assert scalars["curves/insertion"] == pytest.approx(results["curves"]["insertion"]["mean"])
    assert not [tag for tag in scalars if tag.startswith("hparams/")]  # one scalar per figure: the HParams table reads metrics/*
    assert "_hparams_/session_start_info" in hparams_in(tmp_path)


def test_the_perturbation_metrics_run_in_a_run(compose, tmp_path):
    """ROAD, average drop, increase in confidence, infidelity and sensitivity-max through the runner:
    one figure per input, their mean per run (the comparison sweep leaves the two costly ones out)."""
    names = PERTURBATION_METRICS
    results = run(compose("data=shapes", "data.count=2", "method=gradcam", f"metrics=[{','.join(names)}]", *FAST_CURVES[2:]), tmp_path)
    for record in results["inputs"]:
        assert set(record["metrics"]) == set(names) and all(np.isfinite(v) for v in record["metrics"].values())
    for name in names:
        assert results["metrics"][name] == pytest.approx(np.mean([r["metrics"][name] for r in results["inputs"]]))
    assert {"metrics/sensitivity_max", "metrics/road_morf"} <= set(scalars_in(tmp_path))


def test_integrated_gradients_reports_its_completeness_error_per_input(compose, tmp_path):
    results = run(compose("data=shapes", "data.count=3", "method=integrated_gradients", "method.steps=16"), tmp_path)
    errors = [r["details"]["completeness_error"] for r in results["inputs"]]
    assert len(errors) == 3 and all(e >= 0 for e in errors)
    assert results["metrics"]["completeness_error"] == pytest.approx(np.mean(errors))


def test_integrated_gradients_completeness_at_64_steps(compose, tmp_path):
    """Every input within 5 % with the default (gray) baseline. From black (the paper's) 81 % of 64
    held-out images were (the method's docstring): a recorded measurement, not a guarantee. Measured:
    max 0.0266 over the 24 inputs, 1.88× inside."""
    results = run(compose("data=shapes", "data.count=24", "data.batch_size=24", "method=integrated_gradients",
                          "method.steps=64", "method.batch_size=64"), tmp_path)
    errors = np.array([r["details"]["completeness_error"] for r in results["inputs"]])
    assert results["method"]["config"]["baseline"] == "gray" and errors.max() <= 0.05


def test_gradcam_points_at_the_object_on_200_held_out_images(compose, tmp_path):
    """Measured: 200 of 200 hits (1.0 against 0.90), unchanged under a 1e-6 relative jitter of the maps."""
    results = run(compose("data=shapes", "data.count=200", "data.batch_size=50", "method=gradcam", "metrics=[pointing_game,mask_energy]"), tmp_path / "gradcam")
    assert results["metrics"]["pointing_game"] >= 0.90
    saliency = run(compose("data=shapes", "data.count=200", "data.batch_size=50", "method=saliency", "metrics=[pointing_game]"), tmp_path / "saliency")
    assert 0 <= saliency["metrics"]["pointing_game"] <= 1  # reported, whatever it is


@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_randomization_decorrelates_gradcam_and_saliency(compose, tmp_path, method):
    results = run(compose("data=shapes", "data.count=6", f"method={method}", "metrics=[randomization]"), tmp_path)
    curve = results["curves"]["randomization"]
    assert curve["steps"][:2] == ["fc", "layer4.0"] and curve["steps"][-1] == "conv1.0"
    # 1.0 would be a map blind to the weights. Measured: Grad-CAM falls to ~0.35 once the head is
    # re-initialized (its weights are the class's), saliency falls gradually from ~0.74 to ~0.22.
    # Margins: Grad-CAM max 0.615 (1.30× under 0.8), first 0.353 (1.42× under 0.5); saliency max 0.739
    # (only 1.08× under 0.8), drop 0.519 (1.73× the 0.3). Each moved < 2e-5 under a 1e-6 relative
    # jitter of the maps (2 seeds), so the margins are > 1000× that spread, but saliency's is thin.
    assert max(curve["mean"]) < 0.8
    assert (curve["mean"][0] < 0.5) if method == "gradcam" else (curve["mean"][-1] < curve["mean"][0] - 0.3)
    assert results["metrics"]["randomization"] == pytest.approx(np.mean(curve["mean"]), abs=1e-6)


def test_mask_metrics_need_masks(compose, tmp_path):
    with pytest.raises(ConfigError, match="pointing_game compare maps with ground-truth object masks.*data=shapes"):
        run(compose("data=samples", "metrics=[pointing_game]"), tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_probability_metrics_need_a_class_target(compose, tmp_path):
    with pytest.raises(ConfigError, match="deletion measure a class's probability"):
        run(compose("data=shapes", "target=channel:layer3:2", "metrics=[deletion]"), tmp_path)


def test_an_unknown_layer_fails_before_any_work(compose, tmp_path):
    with pytest.raises(ConfigError, match="layer 'layer5' not found.*closest: layer4"):
        run(compose("method=gradcam", "method.layer=layer5"), tmp_path)
    assert not (tmp_path / "tensorboard").exists()


def test_unknown_metric_names_get_a_close_match(vizkit_cli):
    result = vizkit_cli("metrics=[deletoin]")
    assert result.returncode == 2 and "unknown metric 'deletoin'" in result.stderr and "closest: deletion" in result.stderr
    assert "Traceback" not in result.stderr and not (result.cwd / "outputs").exists()


def test_a_mistyped_metric_field_is_named(vizkit_cli):
    result = vizkit_cli("metrics=[deletion]", "+metrics.deletion.stepz=4")
    assert result.returncode == 2 and "deletion: unknown field(s) stepz" in result.stderr and "Traceback" not in result.stderr


def read_summary(sweep_dir):
    with open(sweep_dir / "summary.csv") as file:
        return list(csv.DictReader(file))


def test_compare_attribution_ranks_every_attribution_method(vizkit_cli):
    """The experiment: every registered attribution method (built-ins and the RISE plugin), every metric
    that applies to the shapes set, one ranked table (CSV and Markdown) in the sweep directory.
    Less the perturbation metrics (ROAD's imputation, sensitivity-max's and infidelity's many passes: a
    third of the sweep's time), which have their own tests, a run-layer one included. One image a job:
    what is checked is the table over every method (RISE's 1000 masks, re-run by randomization, are a quarter of the sweep)."""
    result = vizkit_cli("-m", "+experiment=compare_attribution", "data.count=1", "trainer.progress_bar=false",
                        "metrics.randomization.max_steps=1", *(f"~metrics.{name}" for name in PERTURBATION_METRICS),
                        *FAST_CURVES[:2], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (result.cwd / "outputs" / "multirun").glob("*/*")
    rows = read_summary(sweep_dir)
    assert sorted(row["method"] for row in rows) == names_of_kind("attribution") and "rise" in names_of_kind("attribution")
    # a method that does not apply to the embedded CNN is refused in its job, the sweep goes on, the table says why
    refused = [row for row in rows if row["status"] != "ok"]
    assert sorted(row["method"] for row in refused) == ["attention_rollout", "gradient_weighted_attention"]
    assert all("explains vision transformers" in row["status"] for row in refused)
    assert all(f"{row['method']} explains vision transformers" in result.stderr for row in refused)
    rows = [row for row in rows if row["status"] == "ok"]
    assert [int(row["rank"]) for row in rows] == list(range(1, len(rows) + 1))
    assert [float(row["mean_rank"]) for row in rows] == sorted(float(row["mean_rank"]) for row in rows)
    for row in rows:
        results = json.loads((sweep_dir / row["dir"] / "results.json").read_text())
        assert set(results["metrics"]) >= {"deletion", "insertion", "pointing_game", "mask_energy", "randomization"}
        assert float(row["deletion"]) == pytest.approx(results["metrics"]["deletion"])
    markdown = (sweep_dir / "summary.md").read_text()
    assert "deletion (lower is better)" in markdown and markdown.count("\n|") == len(rows) + 2
    jobs = len(names_of_kind("attribution"))  # the table after every job, and the time left after the first
    assert result.stdout.count("vizkit: the comparison so far: ") == jobs and f"sweep: 1/{jobs} job(s) done in" in result.stdout
    assert (sweep_dir / "failures.jsonl").read_text().count("\n") == 2  # the refused jobs wrote nothing: no directory, one line each


def test_compare_attribution_with_the_joblib_launcher(vizkit_cli):
    """Jobs in parallel processes; the summary is still written once, by the launching process."""
    result = vizkit_cli("-m", "+experiment=compare_attribution", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                        "method=saliency,gradcam", "data.count=1", "metrics.randomization.max_steps=1", "trainer.progress_bar=false",
                        *(f"~metrics.{name}" for name in PERTURBATION_METRICS), *FAST_CURVES[:2])
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (result.cwd / "outputs" / "multirun").glob("*/*")
    rows = read_summary(sweep_dir)
    assert sorted(row["method"] for row in rows) == ["gradcam", "saliency"] and all(row["status"] == "ok" for row in rows)
    assert result.stdout.count("vizkit: summary of the sweep:") == 1
