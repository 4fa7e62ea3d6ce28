"""The summary of a multirun: one table that ranks the runs of a sweep by their metrics.

``SummaryCallback`` is a Hydra callback: Hydra calls ``on_multirun_end`` in the launching process once
every job has finished, with the basic launcher and with parallel ones (joblib) alike. It reads each
job's ``results.json`` in the sweep directory and writes ``summary.csv`` and ``summary.md`` there.

Ranking: for each metric, runs are ranked 1..N in its own direction (deletion and randomization: lower
is better; insertion, pointing game, mask energy: higher), ties sharing the average rank; the table is
sorted by the mean of those ranks. A failed job (no results.json: a method that does not apply to the
model, say) is listed with the error its run recorded, not dropped.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"


def read_runs(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Each finished job's results (with its directory), and the job directories that have none."""
    runs, failed = [], []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()), key=_job_number):
        path = job_dir / "results.json"
        if path.is_file():
            runs.append({**json.loads(path.read_text()), "dir": job_dir.name})
        else:
            failed.append(job_dir.name)
    return runs, failed


def _job_number(job_dir: Path) -> tuple[int, str]:
    head = job_dir.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, job_dir.name)


def _average_ranks(values: list[float], lower_is_better: bool) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i] if lower_is_better else -values[i])
    ranks = [0.0] * len(values)
    position = 0
    while position < len(order):
        tied = [order[position]]
        while position + len(tied) < len(order) and values[order[position + len(tied)]] == values[tied[0]]:
            tied.append(order[position + len(tied)])
        for index in tied:
            ranks[index] = position + (len(tied) + 1) / 2
        position += len(tied)
    return ranks


def rank_runs(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows sorted best first, and the metric columns (those every run has) in a stable order."""
    directions: dict[str, str] = {}
    for results in runs:
        for name, config in results.get("metric_configs", {}).items():
            directions[name] = config.get("better", "higher")
    metrics = [name for name in directions if all(name in r.get("metrics", {}) for r in runs)]
    rows = [{
        "method": r["method"]["name"],
        "dir": r["dir"],
        "inputs": len(r.get("inputs", [])),
        "seconds_per_input": r.get("timings", {}).get("seconds_per_input"),
        **{name: r["metrics"][name] for name in metrics},
    } for r in runs]
    if rows and metrics:
        per_metric = [_average_ranks([row[name] for row in rows], directions[name] == "lower") for name in metrics]
        for i, row in enumerate(rows):
            row["mean_rank"] = sum(ranks[i] for ranks in per_metric) / len(metrics)
        rows.sort(key=lambda row: (row["mean_rank"], row["method"]))
    for position, row in enumerate(rows, 1):
        row["rank"] = position
    return rows, [f"{name} ({directions[name]} is better)" for name in metrics]


def write_summary(sweep_dir: Path) -> tuple[Path, Path]:
    runs, failed = read_runs(sweep_dir)
    rows, metric_titles = rank_runs(runs)
    metric_names = [title.split(" (", 1)[0] for title in metric_titles]
    columns = ["rank", "method", *(["mean_rank"] if metric_names else []), *metric_names, "seconds_per_input", "inputs", "dir"]
    csv_path, md_path = sweep_dir / SUMMARY_CSV, sweep_dir / SUMMARY_MD
    with open(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns + ["status"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**{c: row.get(c) for c in columns}, "status": "ok"})
        for job_dir in failed:
            writer.writerow({"dir": job_dir, "method": _job_method(job_dir), "status": f"failed: {_job_error(sweep_dir / job_dir)}"})
    titles = {name: title for name, title in zip(metric_names, metric_titles)}
    lines = [f"# Attribution comparison: {sweep_dir.name}", "",
             f"{len(rows)} run(s); ranked by the mean of per-metric ranks." if metric_names else f"{len(rows)} run(s); no metrics were computed.", "",
             "| " + " | ".join(titles.get(c, c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    if failed:
        lines += ["", "Failed jobs (no results.json):", ""] + [f"- {job_dir}: {_job_error(sweep_dir / job_dir)}" for job_dir in failed]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _job_method(job_dir: str) -> str:
    """The method of a job directory named ``N_METHOD`` (the sweep's subdir pattern), or ''."""
    head, _, method = job_dir.partition("_")
    return method if head.isdigit() else ""


def _job_error(job_dir: Path) -> str:
    """Why a job left no results: the error its run marker recorded, if any."""
    from vizkit.cli.run_dirs import read_marker

    marker = read_marker(job_dir) or {}
    return str(marker.get("error") or "no results.json")


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)


class SummaryCallback(Callback):
    """Hydra callback (``hydra.callbacks.summary._target_: vizkit.cli.sweep_summary.SummaryCallback``)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            _, md_path = write_summary(sweep_dir)
            print(f"vizkit: summary of the sweep: {md_path}")  # user-facing
