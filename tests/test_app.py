"""The `vizkit` command end to end: real Hydra composition, Lightning Trainer, TensorBoard files."""
from __future__ import annotations

import json

import pytest
from conftest import hparams_in, images_in

from vizkit.core.pictures import strip_height

from vizkit.core.models import embedded_card


def test_default_run_explains_the_embedded_samples(vizkit_cli):
    run = vizkit_cli()
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    run_dir = run.run_dir
    assert f"tensorboard --logdir {run_dir}" in run.stdout
    assert run_dir.parent.parent == run.cwd / "outputs"
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    results = run.results
    classes = embedded_card()["classes"]
    assert results["method"]["name"] == "saliency"
    assert len(results["inputs"]) == len(classes)  # one sample image per class
    for record in results["inputs"]:
        assert (run_dir / record["png"]).is_file()
        assert len(record["top5"]) == 5 and record["top5"][0]["name"] in classes
        assert record["target"] == {"kind": "class", "index": record["top5"][0]["index"], "name": record["top5"][0]["name"],
                                    "probability": record["top5"][0]["probability"]}
        # the embedded model recognizes its own sample images
        assert record["top5"][0]["name"] == record["name"].split("_")[0]
    assert set(results["timings"]) >= {"method_seconds", "run_seconds", "model_load_seconds"}
    assert "metrics" in results
    tags = images_in(run_dir)
    for record in results["inputs"]:  # TensorBoard shows the very picture on disk: a caption over input | map | overlay
        (event,) = tags[f"{record['name']}/panel"]
        assert event.encoded_image_string == (run_dir / record["png"]).read_bytes()
        assert (event.width, event.height) == (3 * 128 + 2 * 4, 128 + strip_height(1))  # the embedded model reads 128 px


def test_method_config_is_logged_as_hparams(vizkit_cli):
    run = vizkit_cli("method=occlusion", "method.window=16", "method.stride=8", "target=class:3")
    assert run.returncode == 0, run.stderr
    results = run.results
    assert results["method"]["config"] | {"window": 16, "stride": 8} == results["method"]["config"]
    assert {r["target"]["index"] for r in results["inputs"]} == {3}
    hparams = hparams_in(run.run_dir)
    assert "_hparams_/session_start_info" in hparams
    start = hparams["_hparams_/session_start_info"].decode("latin-1")
    assert "method.window" in start and "occlusion" in start


def test_multirun_writes_one_directory_per_job(vizkit_cli):
    run = vizkit_cli("-m", "method=saliency,guided_backprop", "data=shapes", "data.count=2")
    assert run.returncode == 0, run.stderr
    job_dirs = sorted((run.cwd / "outputs" / "multirun").glob("*/*/*_*"))
    assert [d.name.split("_", 1)[1] for d in job_dirs] == ["saliency", "guided_backprop"]
    for job_dir in job_dirs:
        results = json.loads((job_dir / "results.json").read_text())
        assert len(results["inputs"]) == 2
        assert "top1_accuracy" in results["metrics"]


def test_help_lists_every_method_with_kind_and_description(vizkit_cli):
    run = vizkit_cli("--help")
    assert run.returncode == 0
    for name in ("occlusion", "saliency", "guided_backprop", "deconvnet", "rise"):
        line = next(line for line in run.stdout.splitlines() if line.strip().startswith(name + " "))
        assert "[attribution]" in line and len(line.split("]", 1)[1].strip()) > 10
    fooling = next(line for line in run.stdout.splitlines() if line.strip().startswith("fooling_images "))
    assert "[optimization]" in fooling  # listed as the kind it runs as: its base class is an optimization's
    section = run.stdout.split("== Methods", 1)[1].split("== Metrics", 1)[0].splitlines()[1:]
    listed = [line.split("[")[1].split("]")[0] for line in section if " [" in line]
    assert listed == sorted(listed, key=["attribution", "optimization", "adversarial", "inspection"].index)  # grouped by kind


def test_cfg_job_shows_method_fields_and_defaults(vizkit_cli):
    run = vizkit_cli("method=occlusion", "--cfg", "job")
    assert run.returncode == 0, run.stderr
    for line in ("window: 16", "stride: 8", "fill: 0.5", "_name_: occlusion"):
        assert line in run.stdout


def test_third_party_plugin_runs_through_vizkit(vizkit_cli):
    run = vizkit_cli("method=rise", "method.masks=64", "data=shapes", "data.count=2")
    assert run.returncode == 0, run.stderr
    assert run.results["method"]["name"] == "rise"
    assert run.results["method"]["config"]["masks"] == 64


@pytest.mark.slow
def test_two_cpu_processes_give_the_same_results_as_one(vizkit_cli):
    import numpy as np

    common = ("data=shapes", "data.count=5", "data.batch_size=2", "trainer.accelerator=cpu",
              "metrics=[deletion,pointing_game]", "metrics.deletion.steps=4")
    single = vizkit_cli(*common)
    double = vizkit_cli(*common, "trainer.devices=2", "trainer.strategy=ddp")
    assert single.returncode == 0 and double.returncode == 0, double.stderr
    assert [r["name"] for r in double.results["inputs"]] == [r["name"] for r in single.results["inputs"]]
    with np.load(single.run_dir / "maps.npz") as one, np.load(double.run_dir / "maps.npz") as two:
        assert sorted(one.files) == sorted(two.files)
        for name in one.files:
            np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6)
    assert not list(double.run_dir.glob(".*-rank*"))  # the rank files (predictions, maps) are gone
    for one, two in zip(single.results["inputs"], double.results["inputs"]):  # metrics travel with their inputs
        assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-6)
        assert two["curves"]["deletion"] == pytest.approx(one["curves"]["deletion"], abs=1e-6)


def test_a_refused_job_does_not_stop_the_sweep(vizkit_cli):
    """A job whose method refuses the model says why and the sweep goes on; only a sweep whose every
    job was refused exits 2."""
    import json as json_

    both = vizkit_cli("-m", "method=attention_rollout,saliency", "trainer.progress_bar=false")
    assert both.returncode == 0, both.stderr[-2000:]
    assert "attention_rollout explains vision transformers" in both.stderr and "Traceback" not in both.stderr
    (sweep_dir,) = (both.cwd / "outputs" / "multirun").glob("*/*")
    (failure,) = [json_.loads(line) for line in (sweep_dir / "failures.jsonl").read_text().splitlines()]
    assert failure["job"] == "0_attention_rollout" and failure["method"] == "attention_rollout" and "vision transformers" in failure["error"]
    assert not (sweep_dir / "0_attention_rollout").exists()  # it wrote nothing: no empty run for TensorBoard to list
    assert (sweep_dir / "1_saliency" / "results.json").is_file()
    alone = vizkit_cli("-m", "method=attention_rollout", "trainer.progress_bar=false")
    assert alone.returncode == 2 and "explains vision transformers" in alone.stderr
