"""Reviewing runs as a user does: a real TensorBoard server over a sweep, the console of a run, and
what a failed run leaves behind."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

SERVER_SECONDS = 90  # TensorBoard's start-up and first load; the test stops it by its PID either way


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(port: int, path: str, **query: str) -> bytes:
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=20) as response:
        return response.read()


@pytest.fixture(scope="module")
def method_sweep(tmp_path_factory):
    """``vizkit -m method=saliency,occlusion`` on two shapes images: two methods with different fields."""
    from tests.conftest import VIZKIT

    cwd = tmp_path_factory.mktemp("sweep")
    sweep_dir = cwd / "sweep"
    completed = subprocess.run([str(VIZKIT), "-m", "method=saliency,occlusion", "data=shapes", "data.count=2", f"hydra.sweep.dir={sweep_dir}",
                                "trainer.progress_bar=false"], cwd=cwd, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    return sweep_dir, completed


@pytest.fixture(scope="module")
def tensorboard(method_sweep):
    """A real TensorBoard server on a loopback port over the sweep; stopped by its PID."""
    sweep_dir, _ = method_sweep
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep_dir), "--host", "127.0.0.1",
                               "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + SERVER_SECONDS
        while True:
            try:
                runs = json.loads(_get(port, "/data/runs"))
                tags = json.loads(_get(port, "/data/plugin/images/tags"))
                if len([run for run in runs if run.endswith("tensorboard")]) == 2 and len(tags) == 2:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise AssertionError(f"TensorBoard did not serve the sweep in {SERVER_SECONDS} s: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_the_hparams_table_has_every_methods_fields_and_marks_what_the_sweep_varied(tensorboard):
    experiment = json.loads(_get(tensorboard, "/data/plugin/hparams/experiment", request=json.dumps({"experimentName": ""})))
    columns = {info["name"]: info for info in experiment["hparamInfos"]}
    assert {"method", "method.window", "method.stride", "method.fill", "method.reduce"} <= set(columns)  # occlusion's and saliency's
    assert columns["method"]["differs"] and columns["method.window"]["differs"]  # swept, and one method's only
    assert not columns["model"].get("differs", False) and not columns["data"].get("differs", False)
    assert "timing/seconds_per_input" in {m["name"]["tag"] for m in experiment["metricInfos"]}


def test_one_input_is_one_card_with_a_row_per_run_and_every_image_decodes(method_sweep, tensorboard):
    from PIL import Image

    tags = json.loads(_get(tensorboard, "/data/plugin/images/tags"))
    (saliency_run,) = [run for run in tags if "saliency" in run]
    (occlusion_run,) = [run for run in tags if "occlusion" in run]
    inputs = json.loads((method_sweep[0] / "0_saliency" / "results.json").read_text())["inputs"]
    assert set(tags[saliency_run]) == set(tags[occlusion_run]) == {f"{record['name']}/panel" for record in inputs}
    for run, by_tag in tags.items():
        for tag, about in by_tag.items():
            assert "p=" in about["description"] and ("saliency" in about["description"]) == (run == saliency_run)
            (image,) = json.loads(_get(tensorboard, "/data/plugin/images/images", run=run, tag=tag, sample="0"))
            picture = Image.open(io.BytesIO(_get(tensorboard, f"/data/plugin/images/individualImage?{image['query']}")))
            assert picture.format == "PNG" and picture.size[0] > 3 * 128 and picture.size[1] > 128  # the panel under its caption


def test_the_sweep_names_its_jobs_and_says_how_far_it_is(method_sweep):
    sweep_dir, completed = method_sweep
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0_saliency", "1_occlusion"]
    assert "sweep: 1/2 job(s) done in" in completed.stdout and "left" in completed.stdout
    assert "sweep: 2/2 job(s) done in" in completed.stdout


def test_captions_name_the_class_its_probability_and_the_method(method_sweep):
    sweep_dir, _ = method_sweep
    results = json.loads((sweep_dir / "1_occlusion" / "results.json").read_text())
    for record in results["inputs"]:
        target = record["target"]
        assert record["caption"] == f"{target['name']} (class {target['index']}) p={target['probability']:.3f} · occlusion"
        assert target["probability"] == pytest.approx(next(c["probability"] for c in record["top5"] if c["index"] == target["index"]))
    rows = (sweep_dir / "1_occlusion" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(results["inputs"]) and rows[0].startswith("name,source,label")


# ----------------------------------------------------------------------------------------- the console


def test_the_console_says_where_first_and_what_was_measured_last(tmp_path):
    from tests.conftest import VIZKIT

    completed = subprocess.run([str(VIZKIT), "data=shapes", "data.count=2"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    output = completed.stdout
    assert completed.returncode == 0, output[-3000:]
    start = output.index("vizkit: writing to ")
    assert start < output.index("passes"), output  # the progress bar comes after the run directory
    run_dir = output[start:].split("writing to ", 1)[1].split(";", 1)[0]
    last = [line for line in output.splitlines() if line.startswith("vizkit:") and " -> " in line][-1]
    assert last.endswith(f"-> {run_dir}") and "top1_accuracy 1" in last


# ------------------------------------------------------------------------------------ the parts, alone


def test_the_experiment_marks_what_differs_across_runs_and_keeps_every_column(tmp_path):
    """An ε sweep varies a number; a method sweep adds columns one method lacks: both differ."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, metadata

    from vizkit.output.hparams import write_experiment

    sessions = [{"method": "pgd", "method.eps": 1 / 255, "model": "embedded", "method.random_start": True},
                {"method": "pgd", "method.eps": 2 / 255, "model": "embedded", "method.random_start": True},
                {"method": "fgsm", "method.eps": 2 / 255, "model": "embedded"}]
    path = write_experiment(tmp_path, sessions, ["metrics/robust_accuracy"])
    events = EventAccumulator(str(path))
    events.Reload()
    experiment = metadata.parse_experiment_plugin_data(events.PluginTagToContent("hparams")[metadata.EXPERIMENT_TAG])
    infos = {info.name: info for info in experiment.hparam_infos}
    assert {name: info.differs for name, info in infos.items()} == {"method": True, "method.eps": True, "model": False, "method.random_start": True}
    assert infos["method.eps"].type == api_pb2.DATA_TYPE_FLOAT64 and infos["method.eps"].domain_interval.max_value == pytest.approx(2 / 255)
    assert sorted(infos["method"].domain_discrete.values[i].string_value for i in range(2)) == ["fgsm", "pgd"]
    assert [metric.name.tag for metric in experiment.metric_infos] == ["metrics/robust_accuracy"]


def test_a_jobs_directory_names_the_method_and_what_the_sweep_varies(monkeypatch):
    from vizkit.cli.sweep_review import SWEPT_KEYS, run_name

    overrides = ["+experiment=robustness_curve", "method=pgd", "method.eps=2/255", "data.count=8"]
    monkeypatch.setenv(SWEPT_KEYS, "method.eps")
    assert run_name("pgd", overrides) == "pgd_eps=2\u2044255"  # no subdirectory made of 2/255
    monkeypatch.setenv(SWEPT_KEYS, "method,method.eps,data.count")
    assert run_name("pgd", overrides) == "pgd_eps=2\u2044255,data.count=8"
    monkeypatch.delenv(SWEPT_KEYS)
    assert run_name("saliency", ["method=saliency"]) == "saliency"


def test_the_sweep_plan_counts_jobs_as_the_basic_sweeper_does():
    from omegaconf import OmegaConf

    from vizkit.cli.sweep_review import sweep_plan

    config = OmegaConf.create({"hydra": {"sweeper": {"params": {"method.eps": "0,1/255,2/255,4/255,8/255"}},
                                         "overrides": {"task": ["+experiment=robustness_curve", "method.norm=l2,linf", "data.count=4"]}}})
    assert sweep_plan(config) == (10, ["method.eps", "method.norm"])
    assert sweep_plan(OmegaConf.create({"hydra": {"overrides": {"task": ["method=a,b", "seed=range(3)"]}}})) == (6, ["method", "seed"])


def test_the_summary_line_says_what_was_measured():
    from vizkit.run.execute import measured_line

    assert measured_line({"top1_accuracy": 1.0, "deletion": 0.12345}) == "top1_accuracy 1, deletion 0.1235"
    assert measured_line({"probability": 0.99, "loss_total_first": 41.2, "loss_total_last": 3.05}) == "probability 0.99, loss total 41.2 -> 3.05"
    assert measured_line({f"m{i}": float(i) for i in range(12)}).endswith("(+2 more in results.json)")
