"""The benchmark harness keeps working: its rows have the documented keys (timings are never asserted)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"method", "model", "batch", "size", "threads", "stage", "seconds", "floor_seconds", "ratio", "peer", "peer_seconds"}


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
    assert rows["top_patches"]["finish_seconds"] > 0 and rows["top_patches"]["finish_settings"] == {"channels": "top:6", "k": 9}
    assert rows["gradcam_scan"]["gradient_floor_seconds"] > 0 and rows["gradcam_scan"]["ratio_vs_gradient_floor"] > 0
    assert rows["top_patches_run"]["timings"]["scan_seconds"] == rows["top_patches_run"]["seconds"]
    assert rows["gradcam_run"]["timings"]["predict_seconds"] == rows["gradcam_run"]["seconds"]
    assert all(len(rows[name]["floor_runs"]) == 1 and rows[name]["settings"]["workers"] == 1 for name in ("top_patches_run", "gradcam_run"))
