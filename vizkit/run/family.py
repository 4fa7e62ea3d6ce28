"""The protocol every family's run follows, and the ending they all share.

A run of any family goes through the same four stages, driven by ``vizkit.run.execute``:

    prepare()    check everything a user can get wrong, load the model, open the inputs
    execute()    a streamed ``Trainer.predict`` over the inputs, or a ``Trainer.fit``; False on the
                 secondary ranks of a multi-device run (rank 0 writes the summary)
    summarize()  the family's records and figures as a ``Summary``
    end()        (shared, here) scalars, the HParams session, the results header, results.json and
                 results.csv (one row per input: ``FamilyRun.table``), the logger

A family is chosen by the method's base class (``FamilyRun.method_base``), never by a string.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from vizkit.core.models import class_names, data_config
from vizkit.output.hparams import write_session
from vizkit.run.settings import RunSettings


class Clock:
    """Named moments of a run, for its timings."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {"started": time.perf_counter()}
        self.wall_started = time.time()

    def mark(self, name: str) -> float:
        self.marks[name] = time.perf_counter()
        return self.marks[name]

    def between(self, first: str, last: str) -> float:
        return self.marks[last] - self.marks[first]

    def since(self, name: str) -> float:
        return time.perf_counter() - self.marks[name]


@dataclass
class Summary:
    """What a family's run reports; ``end`` writes it.

    ``fields``: results.json's entries between the shared header and ``timings`` (the family's
    records, its ``metrics``...); ``metrics``: the run's figures, also TensorBoard scalars
    ``metrics/NAME`` (which the HParams table shows as its metric columns); ``hparams``: HParams
    beyond the method, its fields and the model; ``scalars``: more scalars (step 0), one tag each;
    ``rows``: results.csv, one row per input (flat: names to numbers and strings); ``stopped``: why
    an optimization stopped early (the run is written, its status ``failed``, then this is raised)."""

    target: Any
    fields: dict[str, Any]
    metrics: dict[str, float]
    timings: dict[str, Any]
    hparams: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    stopped: Exception | None = None


class FamilyRun:
    """One run of one family of methods; subclasses implement the stages (see the module docstring)
    and ``report``, the line the command prints."""

    method_base: ClassVar[type]

    def __init__(self, settings: RunSettings, run_dir: Path, clock: Clock) -> None:
        self.settings = settings
        self.method = settings.method
        self.run_dir = run_dir
        self.clock = clock
        self.model: torch.nn.Module | None = None
        self.names: list[str] | None = None  # the model's class names (timm's: read once, ~20 ms for ImageNet's)
        self.model_data: dict[str, Any] = {}  # the model's timm data config
        self.trainer: Any = None
        self.logger: Any = None
        self.writer: Any = None

    def load_model(self) -> torch.nn.Module:
        self.model = self.settings.model.load()
        self.names, self.model_data = class_names(self.model), data_config(self.model)
        return self.model

    def prepare(self) -> None:
        raise NotImplementedError

    def execute(self) -> bool:
        raise NotImplementedError

    def summarize(self) -> Summary:
        raise NotImplementedError

    @staticmethod
    def report(results: dict[str, Any]) -> str:
        raise NotImplementedError


def end(run: FamilyRun, summary: Summary) -> dict[str, Any]:
    """The ending every family shares: scalars and HParams to TensorBoard, results.json (header,
    the family's fields, timings with the writing since the clock's ``computed`` mark and the whole
    run), the logger finalized.
    Returns what results.json holds."""
    finite = {name: value for name, value in summary.metrics.items() if math.isfinite(value)}
    run.writer.add_scalars({**summary.scalars, **{f"metrics/{name}": value for name, value in finite.items()}})
    hparams = {**method_hparams(run.method), "model": str(run.settings.model.name), **summary.hparams}
    write_session(Path(run.logger.log_dir), hparams, finished=summary.stopped is None, started=run.clock.wall_started)
    results = {
        **header(run, summary.target),
        **summary.fields,
        "timings": {**summary.timings, "write_seconds": run.clock.since("computed"), "run_seconds": run.clock.since("started")},
    }
    if summary.stopped is not None:
        results["error"] = str(summary.stopped)
    run.writer.finish(results, rows=summary.rows, failed=summary.stopped is not None)
    run.logger.finalize("success" if summary.stopped is None else "failed")
    if summary.stopped is not None:
        raise summary.stopped
    return results


def header(run: FamilyRun, target: Any) -> dict[str, Any]:
    """The first entries of every results.json: the method and its config, the model, the target, the device."""
    config, names = run.settings.model, run.names
    return {
        "method": {"name": run.method.name, "kind": run.method.kind, "config": asdict(run.method.config),
                   **({"notes": notes} if (notes := run.method.notes()) else {})},
        "model": {"name": str(config.name), "pretrained": bool(config.pretrained), "checkpoint": config.checkpoint,
                  "num_classes": len(names) if names else None,
                  "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in run.model_data.items()} or None},
        "target": target,
        "device": str(run.trainer.strategy.root_device),
    }


def method_hparams(method: Any) -> dict[str, Any]:
    """The method and its fields as TensorBoard HParams (``vizkit.output.hparams.hparam_value``
    makes them numbers, strings and booleans)."""
    return {"method": method.name, **{f"method.{k}": v for k, v in asdict(method.config).items()}}


def flat_row(record: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A record as one results.csv row: nested dicts as ``outer.inner`` columns, lists left out
    (results.json keeps them), ``skip``: keys left out."""
    row: dict[str, Any] = {}
    for key, value in record.items():
        if key in skip or isinstance(value, (list, tuple)):
            continue
        if isinstance(value, dict):
            row.update({f"{key}.{inner}": item for inner, item in flat_row(value).items()})
        else:
            row[key] = value
    return row


def top5(probabilities: torch.Tensor, names: list[str] | None) -> list[dict[str, Any]]:
    """The five most probable classes, with their names."""
    from vizkit.core.models import class_label

    values, indices = probabilities.topk(min(5, probabilities.numel()))
    return [{"index": int(i), "name": class_label(names, int(i)), "probability": float(p)} for p, i in zip(values, indices)]
