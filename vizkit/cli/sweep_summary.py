"""The summary of a multirun: one table that ranks the runs of a sweep by their metrics.

``SummaryCallback`` is a Hydra callback: it writes ``summary.csv`` and ``summary.md`` into the sweep
directory from each job's ``results.json`` as each job ends (``on_job_end``: a long comparison shows
its table so far) and once more when every job has finished (``on_multirun_end``, in the launching
process, with the basic launcher and with parallel ones such as joblib alike).

Ranking: for each metric, runs are ranked 1..N in its own direction (deletion and randomization: lower
is better; insertion, pointing game, mask energy: higher), ties sharing the average rank; the table is
sorted by the mean of those ranks. A failed job (a method that does not apply to the model, say) is
listed with the error its run recorded (its marker, its results.json, or the sweep's
``failures.jsonl`` for a job that failed before writing anything), not dropped.
"""
from __future__ import annotations

import csv
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TextIO

from hydra.experimental.callback import Callback

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"


def read_runs(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Each job's results (with its directory) that finished or was interrupted, and the jobs that
    failed or are still running (their directory's name), in job order."""
    from vizkit.cli.run_dirs import FAILURES

    runs, failed = [], []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()), key=_job_number):
        path = job_dir / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else None
        if results is not None and results.get("status") != "failed":
            runs.append({**results, "dir": job_dir.name})
        else:
            failed.append(job_dir.name)
    failures = sweep_dir / FAILURES
    if failures.is_file():
        failed += [json.loads(line)["job"] for line in failures.read_text().splitlines() if line.strip()]
    return runs, sorted(failed, key=lambda name: _job_number(Path(name)))


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
    with _replaced(csv_path) as file:
        writer = csv.DictWriter(file, fieldnames=columns + ["status"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**{c: row.get(c) for c in columns}, "status": "ok"})
        for job_dir in failed:
            writer.writerow({"dir": job_dir, "method": _job_method(sweep_dir / job_dir), "status": f"failed: {_job_error(sweep_dir / job_dir)}"})
    titles = {name: title for name, title in zip(metric_names, metric_titles)}
    lines = [f"# Attribution comparison: {sweep_dir.name}", "",
             f"{len(rows)} run(s); ranked by the mean of per-metric ranks." if metric_names else f"{len(rows)} run(s); no metrics were computed.", "",
             "| " + " | ".join(titles.get(c, c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    if failed:
        lines += ["", "Jobs without results:", ""] + [f"- {job_dir}: {_job_error(sweep_dir / job_dir)}" for job_dir in failed]
    with _replaced(md_path) as file:
        file.write("\n".join(lines) + "\n")
    return csv_path, md_path


@contextmanager
def _replaced(path: Path) -> Iterator[TextIO]:
    """A text file written whole under a temporary name, then put in ``path``'s place: the summary is
    rewritten after every job, and a reader (or a job ending at the same time) never sees half of it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", newline="") as file:
        yield file
    os.replace(temporary, path)


def _job_method(job_dir: Path) -> str:
    """The method a job ran (its composed config's, or what the sweep's failures.jsonl recorded), or ''."""
    from vizkit.cli.run_dirs import job_method

    return job_method(job_dir) if job_dir.is_dir() else str((_failure(job_dir) or {}).get("method", ""))


def _failure(job_dir: Path) -> dict[str, Any] | None:
    """What the sweep's failures.jsonl recorded of a job that failed before writing anything."""
    from vizkit.cli.run_dirs import FAILURES

    failures = job_dir.parent / FAILURES
    records = [json.loads(line) for line in failures.read_text().splitlines() if line.strip()] if failures.is_file() else []
    return next((record for record in records if record.get("job") == job_dir.name), None)


def _job_error(job_dir: Path) -> str:
    """Why a job left no results: the error its run marker or the sweep's failures.jsonl recorded."""
    from vizkit.cli.run_dirs import read_marker

    if job_dir.is_dir():
        marker = read_marker(job_dir) or {}
        return str(marker.get("error") or ("still running" if marker.get("status") == "running" else "no results.json"))
    return str((_failure(job_dir) or {}).get("error") or "no results.json")


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)


class SummaryCallback(Callback):
    """Hydra callback (``hydra.callbacks.summary._target_: vizkit.cli.sweep_summary.SummaryCallback``)."""

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            _, md_path = write_summary(sweep_dir)
            print(f"vizkit: the comparison so far: {md_path}", flush=True)  # user-facing

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            _, md_path = write_summary(sweep_dir)
            print(f"vizkit: summary of the sweep: {md_path}")  # user-facing
