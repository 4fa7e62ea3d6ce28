"""Adversarial runs through the real `vizkit` command: what a run reports, its pictures, targeted and
untargeted attacks, labels from the data or from the clean prediction, the robustness-curve experiment."""
from __future__ import annotations

import csv
import json

import pytest

from vizkit.core.errors import ConfigError
from conftest import hparams_in, images_in, read_events, write_image

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_pgd_run_reports_what_a_paper_would(vizkit_cli):
    run = vizkit_cli("method=pgd", "method.eps=8/255", "data=shapes", "data.count=8", "trainer.progress_bar=false", env=ONE_THREAD)
    assert run.returncode == 0, run.stderr
    results = run.results
    assert results["method"]["config"]["eps"] == pytest.approx(8 / 255)  # "8/255" accepted as written
    assert results["target"] == "predicted" and len(results["inputs"]) == 8
    for record in results["inputs"]:
        assert record["label_source"] == "data" and record["label_name"] in record["name"]
        assert len(record["clean_top5"]) == 5 and len(record["adversarial_top5"]) == 5
        assert record["success"] == (record["adversarial_top5"][0]["index"] != record["label"])
        assert record["norms"]["linf"] <= 8 / 255 + 1e-6 and record["norms"]["l2"] > 0
        assert (run.run_dir / record["png"]).is_file()
    metrics = results["metrics"]
    assert metrics["clean_accuracy"] == 1.0 and metrics["success_rate"] >= 0.75
    assert metrics["robust_accuracy"] == pytest.approx(sum(r["adversarial_correct"] for r in results["inputs"]) / 8)
    assert metrics["max_linf"] <= 8 / 255 + 1e-6
    tags = images_in(run.run_dir)
    first = results["inputs"][0]
    (event,) = tags[f"{first['name']}/panel"]  # one card per input, whatever the ε: the factor is in the caption
    assert f"perturbation x{first['amplification']:g}" in first["caption"]
    assert event.encoded_image_string == (run.run_dir / first["png"]).read_bytes()  # one panel, on disk and in TensorBoard
    scalars = set()
    for events in (run.run_dir / "tensorboard").glob("events.out.tfevents.*"):
        scalars |= set(read_events(events).Tags()["scalars"])
    assert {"metrics/robust_accuracy", "metrics/success_rate", "metrics/clean_accuracy", "metrics/mean_linf"} <= scalars
    assert not {tag for tag in scalars if tag.startswith("hparams/")}  # one scalar per figure: the HParams table reads metrics/*
    assert "method.eps" in hparams_in(run.run_dir)["_hparams_/session_start_info"].decode("latin-1")


def test_targeted_fgsm_on_unlabelled_images_uses_the_clean_prediction(vizkit_cli, tmp_path):
    for i in range(3):
        write_image(tmp_path / f"p{i}.png", size=(90, 70), seed=i)
    run = vizkit_cli("method=fgsm", "method.eps=0.1", "target=class:star", "data=images", f"data.paths=[{tmp_path}]",
                     "trainer.progress_bar=false", env=ONE_THREAD)
    assert run.returncode == 0, run.stderr
    results = run.results
    assert "clean_accuracy" not in results["metrics"]  # no labels: the attack changes the prediction instead
    for record in results["inputs"]:
        assert record["label_source"] == "clean prediction" and record["label"] == record["clean_top5"][0]["index"]
        assert record["target"] == {"index": 3, "name": "star"}
        assert record["success"] == (record["adversarial_top5"][0]["index"] == 3)
    assert results["metrics"]["success_rate"] == pytest.approx(sum(r["success"] for r in results["inputs"]) / 3)


def test_adversarial_bad_input_is_one_line_and_exit_2(vizkit_cli):
    run = vizkit_cli("method=pgd", "method.eps=8/2x5", "data=shapes", "data.count=2", "trainer.progress_bar=false", env=ONE_THREAD)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "eps must be a number such as 0.03 or 8/255" in run.stderr, run.stderr


@pytest.mark.parametrize("args, message", [
    (["method=pgd", "target=channel:layer3:0"], "use target=class:NAME"),
    (["method=deepfool", "target=class:star"], "deepfool is untargeted"),
    (["method=pgd", "target=class:sqare"], "square"),
])
def test_adversarial_bad_input(compose, tmp_path, args, message):
    """The same refusals in process (the command prints a ConfigError as one line, exit 2: above)."""
    from vizkit.cli.app import run

    with pytest.raises(ConfigError, match=message):
        run(compose(*args, "data=shapes", "data.count=2", "trainer.progress_bar=false"), tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_robustness_curve_experiment(vizkit_cli):
    """Any attack with an ε runs the experiment: here the AutoAttack ensemble (few steps and queries),
    whose robust accuracy after each of its attacks gets a column, a scalar, and its per-input record."""
    run = vizkit_cli("-m", "+experiment=robustness_curve", "method=autoattack", "data.count=6", "method.steps=3", "method.queries=20",
                     "method.eps=0,2/255,8/255", "trainer.progress_bar=false", env=ONE_THREAD, timeout=600)
    assert run.returncode == 0, run.stderr
    (sweep_dir,) = {path.parent for path in run.cwd.glob("outputs/multirun/*/*/robustness.csv")}
    rows = list(csv.DictReader(open(sweep_dir / "robustness.csv")))
    assert [float(row["eps"]) for row in rows] == pytest.approx([0, 2 / 255, 8 / 255])
    accuracy = [float(row["robust_accuracy"]) for row in rows]
    assert accuracy[0] == 1.0 and accuracy == sorted(accuracy, reverse=True) and accuracy[-1] < accuracy[0]
    stages = ["apgd_ce", "apgd_t", "fab_t", "square"]
    for row in rows:  # robust accuracy falls attack by attack and ends at the run's
        after = [float(row[f"robust_accuracy_after_{stage}"]) for stage in stages]
        assert after == sorted(after, reverse=True) and after[-1] == float(row["robust_accuracy"])
    assert "| ε |" in (sweep_dir / "robustness.md").read_text() and "after apgd_t" in (sweep_dir / "robustness.md").read_text()
    (events,) = (sweep_dir / "robustness").glob("events.out.tfevents.*")
    curve = read_events(events).Scalars("robustness/robust_accuracy")
    assert [point.step for point in curve] == [0, 2, 8] and [point.value for point in curve] == pytest.approx(accuracy)
    assert len(read_events(events).Scalars("robustness/robust_accuracy_after_apgd_ce")) == 3
    strongest = json.loads(next(sweep_dir.glob("2_*/results.json")).read_text())
    broken_by = [record["details"]["broken_by"] for record in strongest["inputs"]]
    robust = [record["clean_correct"] and record["details"]["broken_by"] == -1 for record in strongest["inputs"]]
    assert all(b in range(-1, 4) for b in broken_by) and sum(robust) == round(accuracy[-1] * 6)
    header = next(csv.reader(open(next(sweep_dir.glob("2_*/results.csv")))))
    assert "details.broken_by" in header
