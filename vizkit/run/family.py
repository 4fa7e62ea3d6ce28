"""The protocol every family's run follows, and the ending they all share.

A run of any family goes through the same four stages, driven by ``vizkit.run.execute``:

    prepare()    check everything a user can get wrong, load the model, open the inputs
    execute()    a streamed ``Trainer.predict`` over the inputs, or a ``Trainer.fit``; False on the
                 secondary ranks of a multi-device run (rank 0 writes the summary)
    summarize()  the family's records and figures as a ``Summary``
    end()        (shared, here) scalars, HParams, the results header, results.json, the logger

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
from vizkit.run.settings import RunSettings


class Clock:
    """Named moments of a run, for its timings."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {"started": time.perf_counter()}

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
    ``metrics/NAME`` and HParams metrics ``hparams/NAME``; ``hparams``: HParams beyond the method,
    its fields and the model; ``scalars``/``hparam_metrics``: more of each; ``stopped``: why an
    optimization stopped early (the run is written, then this is raised)."""

    target: Any
    fields: dict[str, Any]
    metrics: dict[str, float]
    timings: dict[str, Any]
    hparams: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    hparam_metrics: dict[str, float] = field(default_factory=dict)
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
    run.logger.log_hyperparams(hparams, metrics={**summary.hparam_metrics, **{f"hparams/{name}": value for name, value in finite.items()}})
    results = {
        **header(run, summary.target),
        **summary.fields,
        "timings": {**summary.timings, "write_seconds": run.clock.since("computed"), "run_seconds": run.clock.since("started")},
    }
    run.writer.finish(results)
    run.logger.finalize("success" if summary.stopped is None else "failed")
    if summary.stopped is not None:
        raise summary.stopped
    return results


def header(run: FamilyRun, target: Any) -> dict[str, Any]:
    """The first entries of every results.json: the method and its config, the model, the target, the device."""
    config, names = run.settings.model, run.names
    return {
        "method": {"name": run.method.name, "kind": run.method.kind, "config": asdict(run.method.config)},
        "model": {"name": str(config.name), "pretrained": bool(config.pretrained), "checkpoint": config.checkpoint,
                  "num_classes": len(names) if names else None,
                  "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in run.model_data.items()} or None},
        "target": target,
        "device": str(run.trainer.strategy.root_device),
    }


def method_hparams(method: Any) -> dict[str, Any]:
    """The method and its fields as TensorBoard HParams (numbers, strings, booleans)."""
    return {"method": method.name, **{f"method.{k}": _hparam(v) for k, v in asdict(method.config).items()}}


def _hparam(value: Any) -> Any:
    """TensorBoard's HParams take numbers, strings and booleans."""
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def top5(probabilities: torch.Tensor, names: list[str] | None) -> list[dict[str, Any]]:
    """The five most probable classes, with their names."""
    from vizkit.core.models import class_label

    values, indices = probabilities.topk(min(5, probabilities.numel()))
    return [{"index": int(i), "name": class_label(names, int(i)), "probability": float(p)} for p, i in zip(values, indices)]
