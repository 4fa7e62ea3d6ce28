#!/usr/bin/env python
"""vizkit benchmarks: each method and metric against its floor (the bare passes it needs) and a peer.

    python benchmarks/run.py [--quick] [--rows saliency,deletion,...] [--stages method,metric,runner,optimization,scan] [--batches 1,8] [--out FILE]

Prints one JSON line per row (the first line is the machine canary and the versions); see
benchmarks/README.md for the rows and columns. Everything runs on 1 torch thread (PITFALLS.md: with 2
threads this VM's timings swing several-fold), method, floor and peer runs alternate, and each row
reports the median (and min) over its repeats. Nothing here asserts on a time.

The command line only: the timing harness is ``harness.py``, the peers' adapters ``peers.py``, the rows
``rows.py`` (and ``rows_methods``, ``rows_optimization``, ``rows_runs``), siblings of this file.
"""
from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported; Lightning then leaves threads alone too

import argparse
import datetime
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from harness import THREADS, Row, canary, distribution_version, result_lines, set_threads, write_results
from rows import ALL_ROWS, ROWS, STAGES, Plan, run_rows
from rows_optimization import OPTIMIZATION_METHODS


def progress(row: Row) -> None:
    """One line per finished row on stderr: its figures, and its own cost in brackets."""
    ratio = f"ratio {row.ratio:.3f}" if row.has_ratio else "ratio -"
    text = f"  {row.stage:6} {row.method:20} batch {row.batch}: {row.seconds:.4f} s, floor {row.floor_seconds:.4f} s, {ratio}"
    text += f", peer {row.peer_seconds:.4f} s" if row.peer_seconds else ""
    text += f", plain {row.extra['plain_seconds']:.4f} s" if row.stage == "optimization" else ""
    text += f", write {row.extra['timings']['write_seconds']:.3f} s" if row.stage == "runner" else ""
    text += f", {row.extra['images_per_second']:.1f} img/s, throughput {row.extra['throughput_ratio']:.3f}" if row.stage == "scan" else ""
    text += f" [{row.extra['row_seconds']:.0f} s]" if "row_seconds" in row.extra else ""
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1, 64 px, few repeats, method and metric stages only")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help="comma-separated methods, metrics, optimization methods and scans (default: all but issue 19's "
                             "incremental occlusion rows, which run when named)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="method (the Python API), metric (metrics' evaluate), runner (whole runs), optimization "
                             "(optimization methods' Lightning fit per step), scan (a data set's throughput); --quick: no runner")
    parser.add_argument("--batches", help="comma-separated batch sizes of the method and metric stages (default: the plan's, 1,8)")
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.rows.split(",") if m.strip()]
    unknown = set(names) - set(ALL_ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ALL_ROWS)}")
    stages = {s.strip() for s in args.stages.split(",")}
    if args.quick:
        stages -= {"runner"}

    set_threads()
    warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")  # "required_grads has been set", hooks notice
    canary_start = canary()
    started = time.perf_counter()
    batches = None
    if args.batches:
        planned = Plan.make(args.quick).batches
        try:
            batches = tuple(int(b) for b in args.batches.split(","))
        except ValueError:
            parser.error(f"--batches takes comma-separated integers, got {args.batches!r}")
        if not set(batches) <= set(planned):
            parser.error(f"--batches {args.batches}: the plan has batches {','.join(map(str, planned))}")
    rows, skipped = run_rows(names, stages, args.quick, progress, batches)
    canary_end = canary()

    import captum
    import pytorch_grad_cam
    import timm

    head = {"canary_start": canary_start.median, "canary_end": canary_end.median,
            "canary_cpu_start": statistics.median(canary_start.cpu), "canary_cpu_end": statistics.median(canary_end.cpu),
            "canary": "median of 5 x (10 forwards of Conv2d(64,64,3) on [1,64,56,56]), wall and process CPU seconds",
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": THREADS,
            "cpus": os.cpu_count(), "machine": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "captum": captum.__version__,
            "pytorch_grad_cam": getattr(pytorch_grad_cam, "__version__", distribution_version("grad-cam")),
            "quick": args.quick, "total_seconds": time.perf_counter() - started}
    if "optimization" in stages and any(name in OPTIMIZATION_METHODS for name in names):
        head.update(lucent=distribution_version("torch-lucent"), kornia=distribution_version("kornia"),
                    pytorch_lightning=distribution_version("pytorch-lightning"), skipped=skipped)
    lines = result_lines(head, rows)
    if args.out:
        write_results(args.out, lines)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
