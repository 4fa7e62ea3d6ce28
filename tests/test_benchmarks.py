"""The benchmark harness keeps working: its rows have the documented keys (timings are never asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"method", "model", "batch", "size", "threads", "stage", "seconds", "floor_seconds", "ratio", "peer", "peer_seconds"}


def test_quick_benchmark_prints_one_json_row_per_method():
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--rows", "saliency,occlusion"],
                               capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    rows = [line for line in lines if "method" in line]
    assert {row["method"] for row in rows} == {"saliency", "occlusion"}
    for row in rows:
        assert KEYS <= set(row) and row["threads"] == 1 and row["stage"] == "method"
        assert row["seconds"] > 0 and row["floor_seconds"] > 0 and row["peer"].startswith("captum")
