"""Robust accuracy against ε from a multirun: one table and one TensorBoard chart in the sweep dir.

``RobustnessCurveCallback`` is a Hydra callback (``conf/experiment/robustness_curve.yaml``): once
every job of the sweep has finished, it reads each job's ``results.json`` (``method.config.eps`` and
the run's ``metrics``), sorts the runs by ε, and writes ``robustness.csv`` and ``robustness.md`` plus
an event file in ``SWEEP_DIR/robustness/`` whose scalars ``robustness/robust_accuracy``,
``robustness/success_rate`` and ``robustness/clean_accuracy`` have ε as their step (in units of 1/255,
rounded: TensorBoard steps are integers; the table keeps the exact ε). Failed jobs are listed.

Any attack with an ``eps`` field works (``method=autoattack``, ``method=square``, ...). An ensemble's
robust accuracy after each of its attacks (autoattack's ``robust_accuracy_after_apgd_ce`` ...) gets a
column of its own and a scalar ``robustness/NAME``.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from vizkit.cli.sweep_summary import read_runs

CURVE_CSV = "robustness.csv"
CURVE_MD = "robustness.md"
COLUMNS = ("eps", "robust_accuracy", "success_rate", "clean_accuracy", "mean_linf", "mean_l2", "inputs", "method", "norm", "dir")
STAGE_PREFIX = "robust_accuracy_after_"  # an ensemble's robust accuracy after each of its attacks (autoattack)


def curve_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run, sorted by ε."""
    rows = []
    for results in runs:
        config, metrics = results["method"]["config"], results.get("metrics", {})
        rows.append({"eps": float(config.get("eps", 0.0)), "robust_accuracy": metrics.get("robust_accuracy"),
                     "success_rate": metrics.get("success_rate"), "clean_accuracy": metrics.get("clean_accuracy"),
                     "mean_linf": metrics.get("mean_linf"), "mean_l2": metrics.get("mean_l2"), "inputs": len(results.get("inputs", [])),
                     "method": results["method"]["name"], "norm": config.get("norm", "linf"), "dir": results["dir"],
                     **{key: value for key, value in metrics.items() if key.startswith(STAGE_PREFIX)}})
    return sorted(rows, key=lambda row: row["eps"])


def stage_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The per-attack robust accuracy columns any run has, in first-seen order."""
    return list(dict.fromkeys(key for row in rows for key in row if key.startswith(STAGE_PREFIX)))


def write_curve(sweep_dir: Path) -> list[dict[str, Any]]:
    runs, failed = read_runs(sweep_dir)
    rows = curve_rows(runs)
    stages = stage_columns(rows)
    with open(sweep_dir / CURVE_CSV, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[*COLUMNS, *stages])
        writer.writeheader()
        writer.writerows(rows)
    headers = ["ε", "ε × 255", "robust accuracy", "success rate", "clean accuracy", "mean L∞", "mean L2",
               *(f"after {stage[len(STAGE_PREFIX):]}" for stage in stages), "run"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        figures = ("robust_accuracy", "success_rate", "clean_accuracy", "mean_linf", "mean_l2", *stages)
        cells = [f"{row['eps']:.5g}", f"{row['eps'] * 255:.3g}"] + [_cell(row.get(k)) for k in figures]
        lines.append("| " + " | ".join(cells + [row["dir"]]) + " |")
    lines += [f"\nFailed jobs: {', '.join(failed)}"] if failed else []
    (sweep_dir / CURVE_MD).write_text("\n".join(lines) + "\n")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(sweep_dir / "robustness")) as tensorboard:
        for row in rows:
            for name in ("robust_accuracy", "success_rate", "clean_accuracy", *stages):
                if row.get(name) is not None:
                    tensorboard.add_scalar(f"robustness/{name}", row[name], global_step=round(row["eps"] * 255))
    return rows


def _cell(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}"


class RobustnessCurveCallback(Callback):
    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            rows = write_curve(sweep_dir)
            print(f"vizkit: robustness curve of {len(rows)} run(s) -> {sweep_dir / CURVE_MD}")  # user-facing
