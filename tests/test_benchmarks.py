"""The benchmark harness keeps working: its rows have the documented keys, and their figures are what
their timings make them (a row's times are never asserted, the arithmetic on them is).

The harness is fed a clock the test controls (``harness.WALL_CLOCK``/``CPU_CLOCK``), so every figure
of a row is known in advance; every row the quick runs print, and every row recorded in
benchmarks/results-cpu.jsonl, is checked for the relations between its figures (ratio = seconds /
floor, peer_ratio = seconds / peer, ...) within the 6 significant digits the rows are written with.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"method", "model", "batch", "size", "threads", "stage", "seconds", "floor_seconds", "ratio", "peer", "peer_seconds"}
if str(ROOT / "benchmarks") not in sys.path:  # benchmarks/ is scripts, not a package: run.py imports its siblings by name
    sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402
from harness import Row, Timing  # noqa: E402

# each figure is written with 6 significant digits: a relation between three of them holds within ~1.5e-5
REL = 2e-5


def close(value: float, expected: float, rel: float = REL) -> bool:
    return value == pytest.approx(expected, rel=rel)


def check_figures(row: dict) -> None:
    """What a row's figures must say of each other, whatever the timings: a row whose ratio is not its
    seconds over its floor (or a peer ratio not seconds over the peer's, a min above its median, ...) fails."""
    name = f"{row['stage']}/{row['method']}/batch{row['batch']}"
    assert row["stage"] in ("method", "metric", "runner", "optimization", "scan"), name
    assert row["threads"] == 1 and row["repeats"] >= 1 and row["batch"] >= 1 and row["size"] > 0, name
    seconds, floor = row["seconds"], row["floor_seconds"]
    assert seconds > 0 and floor > 0, name
    if row["ratio"] is None:  # no pass to compare with: the arithmetic floor and one forward instead
        assert row["method"] in ("pointing_game", "mask_energy") and "paired_ratio" not in row, name
        assert close(row["arithmetic_ratio"], seconds / floor), name
        assert close(row["share_of_forward"], seconds / row["forward_seconds"]), name
    else:
        assert close(row["ratio"], seconds / floor), (name, row["ratio"], seconds / floor)
    if row["peer_seconds"]:
        assert row["peer"] and close(row["peer_ratio"], seconds / row["peer_seconds"]), (name, row["peer_ratio"])
    else:
        assert row["peer_ratio"] is None, name
    if row.get("peer2_seconds"):
        assert close(row["peer2_ratio"], seconds / row["peer2_seconds"]), name
        assert row["peer2_min"] <= row["peer2_seconds"] * (1 + REL), name
    for low, median in (("seconds_min", "seconds"), ("floor_min", "floor_seconds"), ("peer_min", "peer_seconds"), ("plain_min", "plain_seconds")):
        if low in row:
            assert 0 < row[low] <= row[median] * (1 + REL), (name, low)
    cpu = row.get("cpu")
    if cpu is not None:
        assert cpu["seconds"] > 0 and cpu["floor_seconds"] > 0, name
        assert ("ratio" in cpu) == (row["ratio"] is not None), name
        if "ratio" in cpu:
            assert close(cpu["ratio"], cpu["seconds"] / cpu["floor_seconds"]), name
        if "peer_ratio" in cpu:
            assert close(cpu["peer_ratio"], cpu["seconds"] / cpu["peer_seconds"]), name
    if "floor_chunk8_seconds" in row:
        assert close(row["ratio_vs_floor_chunk8"], seconds / row["floor_chunk8_seconds"]), name
    if "explicit_floor_seconds" in row:  # the ViT attention rows' second reference (timm's hand-written attention)
        assert close(row["ratio_vs_explicit_floor"], seconds / row["explicit_floor_seconds"]), name
        assert 0 < row["explicit_floor_min"] <= row["explicit_floor_seconds"] * (1 + REL), name
    if row.get("method_at_peer_chunk_seconds"):
        at = row["method_at_peer_chunk_seconds"]
        assert close(row["default_vs_peer_chunk"], seconds / at) and close(row["peer_ratio_at_same_chunk"], at / row["peer_seconds"]), name
    if row["stage"] == "runner":
        assert len(row["run_ratios"]) == len(row["write_seconds"]) == row["repeats"], name
        assert row["overhead_seconds"] == pytest.approx(seconds - floor, abs=REL * seconds), name
    if row["stage"] == "scan":
        images = row["images"]
        assert close(row["images_per_second"], images / seconds) and close(row["floor_images_per_second"], images / floor), name
        assert close(row["throughput_ratio"], floor / seconds), name
        if "gradient_floor_seconds" in row:
            assert close(row["ratio_vs_gradient_floor"], seconds / row["gradient_floor_seconds"]), name
            assert close(row["gradient_floor_images_per_second"], images / row["gradient_floor_seconds"]), name
    if row["stage"] == "optimization":  # per optimizer step
        per_evaluation = row["evaluations_per_step"]
        assert per_evaluation >= 1 and all(count == per_evaluation * row["steps"] for count in row["evaluations_fit"]), name
        assert len(row["evaluations_fit"]) == row["repeats"], name
        assert close(row["seconds_per_evaluation"], seconds / per_evaluation), name
        assert close(row["ratio_per_evaluation"], seconds / per_evaluation / floor), name
        assert close(row["plain_ratio"], row["plain_seconds"] / floor), name
        assert row["lightning_share"] == pytest.approx(seconds / row["plain_seconds"] - 1, abs=2 * REL * seconds / row["plain_seconds"]), name
        assert close(row["ratio_vs_nominal_floor"], seconds / row["floor_nominal_seconds"]), name
        if row["peer_seconds"]:
            assert close(row["peer_over_own_floor"], row["peer_seconds"] / row["peer_floor_seconds"]), name
            assert close(row["peer2_over_own_floor"], row["peer2_seconds"] / row["peer_floor_seconds"]), name


class FakeClock:
    """The harness's clocks, advanced only by the functions it times: every recorded time is known."""

    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 50.0

    def takes(self, *walls: float, cpu_share: float = 0.5, calls: list | None = None, name: str = ""):
        """A function whose successive calls take ``walls`` seconds (and ``cpu_share`` of that in CPU time)."""
        durations = iter(walls)

        def fn(*_args):
            took = next(durations)
            self.wall += took
            self.cpu += took * cpu_share
            if calls is not None:
                calls.append(name)

        return fn


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(harness, "WALL_CLOCK", lambda: fake.wall)
    monkeypatch.setattr(harness, "CPU_CLOCK", lambda: fake.cpu)
    monkeypatch.setattr(harness, "set_threads", lambda: None)  # the test process keeps its torch threads
    return fake


def test_time_alternating_records_each_call_after_untimed_warmups_in_turn(clock):
    calls: list[str] = []
    times = harness.time_alternating({
        "method": clock.takes(99, 3, 1, 2, calls=calls, name="method"),  # 99: the warm-up, never recorded
        "floor": clock.takes(99, 1, 1, 2, cpu_share=1.0, calls=calls, name="floor"),
    }, repeats=3)
    assert calls == ["method", "floor"] * 4  # warm-ups, then alternating
    assert times["method"].wall == [3, 1, 2] and times["method"].cpu == [1.5, 0.5, 1.0] and times["method"].median == 2
    assert times["floor"].wall == [1, 1, 2] and times["floor"].cpu == [1, 1, 2]
    without = harness.time_alternating({"fn": clock.takes(4, 4, 1, 1)}, repeats=2, warmup=False, inner=2)
    assert without["fn"].wall == [4, 1] and without["fn"].cpu == [2, 0.5]  # per call: each sample's time / inner


def test_row_figures_come_from_the_medians_of_known_timings():
    times = {"method": Timing([4, 2, 3], [1, 2, 3]), "floor": Timing([2, 2, 1], [4, 4, 4]), "peer": Timing([6, 5, 4], [8, 4, 1])}
    row = Row.timed("saliency", torch.empty(8, 3, 64, 64), times, "captum.Saliency", passes=8)
    assert (row.seconds, row.floor_seconds, row.peer_seconds) == (3, 2, 5)  # medians of the wall times
    assert row.ratio == 1.5 and row.peer_ratio == 0.6  # seconds / floor, seconds / peer
    assert (row.batch, row.size, row.repeats, row.stage) == (8, 64, 3, "method")
    line = json.loads(row.to_json())
    assert KEYS <= set(line) and (line["ratio"], line["peer_ratio"]) == (1.5, 0.6)
    assert line["paired_ratio"] == 2.0  # the median of the per-repeat ratios 2, 1, 3: not the ratio of the medians
    assert (line["seconds_min"], line["floor_min"], line["peer_min"]) == (2, 1, 4)
    assert line["cpu"] == {"seconds": 2, "floor_seconds": 4, "ratio": 0.5, "peer_seconds": 4, "peer_ratio": 0.5}
    assert line["passes"] == 8 and line["threads"] == 1 and line["model"] == "resnet18"
    check_figures(line)
    no_pass = json.loads(Row.timed("mask_energy", torch.empty(1, 3, 32, 32), {k: times[k] for k in ("method", "floor")}, None,
                                   stage="metric", has_ratio=False).to_json())
    assert no_pass["ratio"] is None and no_pass["peer_ratio"] is None and "paired_ratio" not in no_pass and "ratio" not in no_pass["cpu"]


def test_a_row_is_written_with_six_significant_digits_and_its_ratio_from_the_unrounded_times():
    row = Row("occlusion", 1, 224, "method", 1 / 3, 1 / 7, "captum", 2 / 3, extra={"nested": {"share": 1 / 9}, "count": 7})
    line = json.loads(row.to_json())
    assert (line["seconds"], line["floor_seconds"], line["peer_seconds"]) == (0.333333, 0.142857, 0.666667)
    assert (line["ratio"], line["peer_ratio"]) == (2.33333, 0.5) and line["nested"] == {"share": 0.111111} and line["count"] == 7


def test_per_step_inner_second_peer_and_the_fastest_setting_divide_and_choose_as_documented(clock):
    assert harness.per_step(Timing([2, 4], [1, 3]), 4) == Timing([0.5, 1.0], [0.25, 0.75])
    inner = harness.Inner()
    for took in (5, 1, 3):
        with inner:
            clock.takes(took)()
    assert inner.timing.wall == [5, 1, 3] and inner.timing.cpu == [2.5, 0.5, 1.5]
    peer2 = harness.second_peer({"peer2": Timing([6, 2, 4], [1, 2, 3])}, "pytorch_grad_cam", 3.0)
    assert peer2 == {"peer2": "pytorch_grad_cam", "peer2_seconds": 4, "peer2_ratio": 0.75, "peer2_min": 2, "peer2_cpu_seconds": 2}
    costs = {8: 3.0, 16: 1.0, 32: 2.0}  # CPU seconds per candidate: the least wins
    best, tried = harness.fastest_setting(lambda n: clock.takes(costs[n] * 2)(), [8, 16, 32])
    assert best == 16 and tried == {"8": 3.0, "16": 1.0, "32": 2.0}


def test_the_rows_own_derived_figures():
    from rows_methods import at_peer_chunk, mask_figures
    from rows_runs import throughput

    assert throughput(32, 2.0, 1.6) == {"images": 32, "images_per_second": 16.0, "floor_images_per_second": 20.0, "throughput_ratio": 0.8}
    assert mask_figures(0.002, 0.001, 0.1) == {"arithmetic_ratio": 2.0, "forward_seconds": 0.1, "share_of_forward": 0.02}
    chunked = at_peer_chunk({"method": Timing([3.0]), "peer": Timing([6.0]), "method_at_peer_chunk": Timing([2.0], [1.5])}, 16)
    assert chunked == {"method_at_peer_chunk_seconds": 2.0, "method_at_peer_chunk_cpu": 1.5, "peer_ratio_at_same_chunk": 2.0 / 6.0,
                       "default_vs_peer_chunk": 1.5}
    assert at_peer_chunk({"method": Timing([3.0])}, 8) == {"method_at_peer_chunk_seconds": None}


def test_every_recorded_row_agrees_with_its_own_figures():
    head, rows = harness.read_results(ROOT / "benchmarks" / "results-cpu.jsonl")
    assert head["threads"] == 1 and head["canary_start"] > 0 and head["canary_end"] > 0 and not head["quick"]
    assert {row["stage"] for row in rows} == {"method", "metric", "runner", "optimization", "scan"}
    for row in rows:
        check_figures(row)
    paired = [row["paired_ratio"] for row in rows if "paired_ratio" in row]
    assert paired and statistics.median(paired) == pytest.approx(1, abs=0.2)  # sanity: the same work costs about the same


def test_check_figures_fails_on_a_wrong_figure():
    _, rows = harness.read_results(ROOT / "benchmarks" / "results-cpu.jsonl")
    row = next(row for row in rows if row["method"] == "saliency" and row["peer_seconds"])
    inverted = {**row, "ratio": row["floor_seconds"] / row["seconds"]}
    with pytest.raises(AssertionError):
        check_figures(inverted)
    with pytest.raises(AssertionError):
        check_figures({**row, "peer_ratio": row["peer_seconds"] / row["seconds"]})


def test_quick_benchmark_prints_one_json_row_per_method_and_metric():
    rows = "saliency,occlusion,gradcam,fgsm,deletion,mask_energy"  # the cheap ones of each kind of row
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--rows", rows],
                               capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    rows = {line["method"]: line for line in lines if "method" in line}
    assert set(rows) == {"saliency", "occlusion", "gradcam", "fgsm", "deletion", "mask_energy"}
    for row in rows.values():
        assert KEYS <= set(row) and row["threads"] == 1 and row["seconds"] > 0 and row["floor_seconds"] > 0
    for name in ("saliency", "occlusion", "gradcam"):
        assert rows[name]["stage"] == "method" and rows[name]["peer"].startswith("captum") and rows[name]["ratio"] > 0
    assert rows["fgsm"]["stage"] == "method" and rows["fgsm"]["peer"] == "torchattacks.FGSM" and rows["fgsm"]["passes"] == 1
    assert rows["gradcam"]["peer2"].startswith("pytorch_grad_cam") and rows["gradcam"]["peer2_seconds"] > 0
    assert rows["deletion"]["stage"] == "metric" and rows["deletion"]["peer"] is None and rows["deletion"]["ratio"] > 0
    assert rows["mask_energy"]["stage"] == "metric" and rows["mask_energy"]["ratio"] is None  # no pass: no floor ratio
    for row in rows.values():
        check_figures(row)


def test_quick_optimization_stage_prints_fit_rows_with_a_lucent_peer():
    """lucent is the bench extra's, not the dev extra's: without it the row says how to get it."""
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--stages", "optimization",
                                "--rows", "feature_viz,class_model"],
                               capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    assert "lucent" in lines[0] and lines[0]["skipped"] == {}
    rows = {line["method"]: line for line in lines if "method" in line}
    assert set(rows) == {"feature_viz", "class_model"}
    for row in rows.values():
        assert KEYS <= set(row) and row["stage"] == "optimization" and row["size"] == 64 and row["steps"] == 8
        assert row["seconds"] > 0 and row["floor_seconds"] > 0 and row["plain_seconds"] > 0 and row["ratio"] > 0
        assert row["evaluations_per_step"] == 1 and row["evaluations_fit"] == [8]  # Adam: one evaluation per step
        assert row["hooks_after_vizkit"] == 0 and row["weight_grads_after_vizkit"] is False  # only the image's gradient
    assert rows["class_model"]["peer"] is None and rows["class_model"]["floor_depth"] == "the whole model"
    for row in rows.values():
        check_figures(row)
    viz = rows["feature_viz"]
    assert viz["forward_sizes"]["min"] != viz["forward_sizes"]["max"]  # the transforms change the size; the floor replays it
    if importlib.util.find_spec("lucent") is None:
        assert viz["peer"] is None and "make bench" in viz["peer_note"]
        return
    assert viz["peer"].startswith("lucent") and viz["peer_seconds"] > 0 and viz["peer2_seconds"] > 0
    assert min(viz["peer_hooks_after_call"]) > 0 and viz["peer_weight_grads"] == {"peer": True, "peer2": False}


def test_quick_scan_stage_prints_throughput_rows_for_top_patches_and_gradcam():
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--stages", "scan"],
                               capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    rows = {line["method"]: line for line in lines if "method" in line}
    assert set(rows) == {"top_patches", "gradcam_scan", "top_patches_run", "gradcam_run"}
    for name, row in rows.items():
        size = 224 if name.endswith("_run") else 64  # whole runs read 256-px JPEG files through timm's eval transform
        assert KEYS <= set(row) and row["stage"] == "scan" and row["size"] == size and row["batch"] == 8 and row["images"] == 32
        assert row["seconds"] > 0 and row["floor_seconds"] > 0 and row["ratio"] > 0 and row["peer"] is None
        assert row["images_per_second"] > 0 and row["floor_images_per_second"] > 0
        assert abs(row["throughput_ratio"] * row["ratio"] - 1) < 1e-3  # floor / method, the ratio's inverse
        check_figures(row)
    assert rows["top_patches"]["finish_seconds"] > 0 and rows["top_patches"]["finish_settings"] == {"channels": "top:6", "k": 9}
    assert rows["gradcam_scan"]["gradient_floor_seconds"] > 0 and rows["gradcam_scan"]["ratio_vs_gradient_floor"] > 0
    assert rows["top_patches_run"]["timings"]["scan_seconds"] == rows["top_patches_run"]["seconds"]
    assert rows["gradcam_run"]["timings"]["predict_seconds"] == rows["gradcam_run"]["seconds"]
    assert all(len(rows[name]["floor_runs"]) == 1 and rows[name]["settings"]["workers"] == 1 for name in ("top_patches_run", "gradcam_run"))
