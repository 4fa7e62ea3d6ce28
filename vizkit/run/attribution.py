"""An attribution run: the method, then the metrics, per batch of a streamed ``Trainer.predict``.

Per input (results.json -> inputs, results.csv): top-5, the target explained and its probability, the
picture (input | map | overlay under a caption naming the target, its probability and the method:
``images/INPUT.png`` and the TensorBoard image ``INPUT/panel``), the method's details and every
metric; the maps go to maps.npz. Per run: means of metrics and details, metric curves, timings.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from vizkit.core.data import Inputs
from vizkit.core.errors import ConfigError
from vizkit.core.models import class_label
from vizkit.core.pixels import PixelSpace
from vizkit.core.targets import ClassTarget, PredictedClassTarget, TargetSpec, parse_target, resolve_spec
from vizkit.methods.base import AttributionMethod
from vizkit.metrics.base import Metric, MetricInputs
from vizkit.output.writer import RunWriter
from vizkit.run.family import FamilyRun, Summary, flat_row, top5
from vizkit.run.stream import stream
from vizkit.run.trainer import pixel_task, timed_with_grad


def attribution_task(model: torch.nn.Module, method: AttributionMethod, spec: TargetSpec, pixels: PixelSpace, metrics: list[Metric]):
    class AttributionTask(pixel_task()):
        """The method, then the metrics, per batch. Predictions (top-5 and the 'predicted' target) come
        from the method's own first forward on the clean input; only a method that makes none costs
        one more forward."""

        def predict_batch(self, batch):
            images, indices, mask_tensor = batch["pixels"], batch["index"], batch["mask"]
            space = self.space(images)
            x = space.from_pixels(images)
            # 'predicted' reads the classes from the method's own first forward on x (no extra pass)
            target = PredictedClassTarget(self.model, x) if spec.kind == "predicted" else resolve_spec(spec, self.model, x.shape[0])
            explained, seconds = timed_with_grad(images.device, lambda: method.explain(self.model, x, target, mean=space.mean, std=space.std))
            logits = getattr(target, "clean_logits", None)
            if logits is None:  # the method never ran the model on x itself (e.g. a channel target)
                with torch.no_grad():
                    logits = self.model(x)
            target_scores = None
            if target.kind == "class":  # metrics explain the same classes, whatever they run the model on
                target = ClassTarget(target.indices.to(x.device))
            else:  # what the caption reports in place of a probability: one more forward, for these targets only
                with torch.no_grad():
                    target_scores = target.score(self.model, x).float().cpu()
            started = time.perf_counter()
            scores = {}
            for metric in metrics:
                inputs = MetricInputs(self.model, x, explained.maps.float(), target, space, method, mask_tensor)
                with torch.enable_grad():  # randomization re-runs the method
                    scores[metric.name] = metric.evaluate(inputs)
            return {
                "indices": indices.cpu(),
                "pixels": images.detach().float().cpu(),
                "probabilities": logits.float().softmax(1).cpu(),
                "maps": explained.maps.float().cpu(),
                "details": {name: values.float().cpu() for name, values in explained.details.items()},
                "metrics": {name: (r.values.float().cpu(), None if r.curve is None else r.curve.float().cpu(), list(r.curve_steps))
                            for name, r in scores.items()},
                "target_kind": target.kind,
                "target_indices": target.indices.cpu() if target.kind == "class" else None,
                "target_spec": str(target),
                "target_scores": target_scores,
                "seconds": seconds,
                "metric_seconds": time.perf_counter() - started,
            }

    return AttributionTask(model, pixels)


class AttributionRun(FamilyRun):
    method_base = AttributionMethod

    def prepare(self) -> None:
        method, settings = self.method, self.settings
        self.spec = parse_target(settings.target)
        target_kind = "class" if self.spec.kind == "predicted" else self.spec.kind
        if target_kind not in method.target_kinds:
            raise ConfigError(f"{method.name} cannot explain a {target_kind} target ('{self.spec}'); it takes: {', '.join(sorted(method.target_kinds))}")
        self.metrics = settings.metrics
        classless = [m.name for m in self.metrics if m.needs_class and target_kind != "class"]
        if classless:
            raise ConfigError(f"metrics {', '.join(classless)} measure a class's probability; the target '{settings.target}' is a {target_kind}: "
                              f"use target=predicted or target=class:...")
        model = self.load_model()
        if self.spec.kind != "predicted":
            resolve_spec(self.spec, model, 1, predicted=None)  # an unknown layer or class fails now, before any work
        method.check(model)
        self.clock.mark("loaded")
        self.inputs: Inputs = settings.data.open(self.model_data, self.names)
        self.clock.mark("read")
        unmasked = [m.name for m in self.metrics if m.needs_masks] if not self.inputs.has_masks else []
        if unmasked:
            raise ConfigError(f"metrics {', '.join(unmasked)} compare maps with ground-truth object masks, and these inputs have none; "
                              f"use data=shapes (exact masks) or drop them from metrics=")

    def execute(self) -> bool:
        pixels = PixelSpace.from_stats(self.model_data["mean"], self.model_data["std"])
        task = attribution_task(self.model, self.method, self.spec, pixels, self.metrics)
        self.streamed = stream(self.settings.trainer, self.settings.data, self.run_dir, task, self.inputs, self.method.name, self.consume,
                               render=self.settings.render)
        self.clock.mark("computed")
        self.trainer, self.logger, self.writer = self.streamed.trainer, self.streamed.logger, self.streamed.writer
        return self.streamed.on_rank_zero

    def consume(self, writer: RunWriter, batch: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """One batch's pictures and maps written, its records kept (they are small)."""
        names, to_tensorboard = self.names, self.settings.pictures_to_tensorboard
        indices = batch["indices"].tolist()
        entries = [self.inputs.entries[index] for index in indices]
        targets = [_target_record(batch, row, names) for row in range(len(indices))]
        approximate = bool(self.method.notes().get("approximate"))  # an approximate map says so in its caption and tag
        label = f"{self.method.name} (approximate)" if approximate else self.method.name
        captions = [f"{_target_caption(target)} · {label}" for target in targets]
        pngs = writer.add_attributions([(entry.name, batch["pixels"][row], batch["maps"][row], captions[row]) for row, entry in enumerate(entries)],
                                       tensorboard=[index < to_tensorboard for index in indices],
                                       panel="panel_approximate" if approximate else "panel")
        per_input = batch["seconds"] / len(indices)
        metric_seconds = batch["metric_seconds"] / len(indices)
        return {index: {
            "name": entry.name,
            "source": entry.source,
            "label": entry.label,
            "label_name": class_label(names, entry.label) if entry.label is not None else None,
            "top5": top5(batch["probabilities"][row], names),
            "target": targets[row],
            "caption": captions[row],
            "png": png,
            "seconds": per_input,
            "metric_seconds": metric_seconds,
            "details": {name: float(values[row]) for name, values in batch["details"].items()},
            "metrics": {name: float(values[row]) for name, (values, _, _) in batch["metrics"].items()},
            "curves": {name: curve[row].tolist() for name, (_, curve, _) in batch["metrics"].items() if curve is not None},
            "curve_steps": {name: list(steps) for name, (_, curve, steps) in batch["metrics"].items() if curve is not None},
        } for row, (index, entry, png) in enumerate(zip(indices, entries, pngs))}

    def summarize(self) -> Summary:
        records, clock = self.streamed.records, self.clock
        method_seconds = sum(record["seconds"] for record in records)
        metric_seconds = sum(record.pop("metric_seconds") for record in records)
        curves: dict[str, dict[str, Any]] = {}
        for record in records:
            for name, steps in record.pop("curve_steps").items():
                curves[name] = {"steps": steps}
        summary = _means(records)
        for name in curves:
            curves[name]["mean"] = np.mean([r["curves"][name] for r in records], axis=0).tolist()
        for name, curve in curves.items():  # one point per step: a deletion curve, a randomization cascade
            for step, value in enumerate(curve["mean"]):
                self.writer.add_scalars({f"curves/{name}": value}, step=step)
        seconds_per_input = method_seconds / max(len(records), 1)
        return Summary(
            target=str(self.spec),
            fields={"inputs": records, "skipped": self.streamed.skipped, "metrics": summary,
                    "metric_configs": {m.name: {"better": m.better, **asdict(m.config)} for m in self.metrics}, "curves": curves},
            metrics=summary,
            timings={
                "model_load_seconds": clock.between("started", "loaded"),
                "data_seconds": clock.between("loaded", "read"),
                "method_seconds": method_seconds,
                "metric_seconds": metric_seconds,
                "predict_seconds": clock.between("read", "computed"),
                "seconds_per_input": seconds_per_input,
                "inputs_per_second": len(records) / max(clock.between("read", "computed"), 1e-9),  # the whole stream: decoding, method, writing
            },
            hparams={"target": str(self.spec), "data": str(self.settings.data.kind), "inputs": len(records),
                     "metrics": ",".join(m.name for m in self.metrics)},
            scalars={"timing/seconds_per_input": seconds_per_input},
            rows=[_row(record) for record in records],
        )

    @staticmethod
    def report(results: dict[str, Any]) -> str:
        skipped = f" ({len(results['skipped'])} unreadable skipped)" if results.get("skipped") else ""
        return f"{results['method']['name']} on {len(results['inputs'])} input(s){skipped}, {results['device']}"


def _target_record(batch: dict[str, Any], row: int, names: list[str] | None) -> dict[str, Any]:
    if batch["target_kind"] == "class":
        index = int(batch["target_indices"][row])
        return {"kind": "class", "index": index, "name": class_label(names, index), "probability": float(batch["probabilities"][row][index])}
    return {"kind": batch["target_kind"], "spec": batch["target_spec"], "score": float(batch["target_scores"][row])}


def _target_caption(target: dict[str, Any]) -> str:
    """``star (class 3) p=0.972``, or a channel/neuron/layer target's spec and score (``channel:layer3:5 score=1.23``)."""
    if target["kind"] != "class":
        return f"{target['spec']} score={target['score']:.3g}"
    named = f"{target['name']} (class {target['index']})" if str(target["name"]) != str(target["index"]) else f"class {target['index']}"
    return f"{named} p={target['probability']:.3f}"


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """One input's results.csv row: what it is, what the model said, what was explained, every metric."""
    top = record["top5"][0]
    return {"name": record["name"], "source": record["source"], "label": record["label"], "label_name": record["label_name"],
            "predicted": top["index"], "predicted_name": top["name"], "predicted_probability": top["probability"],
            **flat_row({"target": record["target"], "metrics": record["metrics"], "details": record["details"]}),
            "seconds": record["seconds"], "png": record["png"]}


def _means(records: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the inputs: top-1 accuracy where labels exist, every metric and every detail."""
    summary: dict[str, float] = {}
    labelled = [r for r in records if r["label"] is not None]
    if labelled:
        summary["top1_accuracy"] = sum(r["top5"][0]["index"] == r["label"] for r in labelled) / len(labelled)
    for field_name in ("metrics", "details"):
        for name in (records[0][field_name] if records else {}):
            summary[name] = float(np.mean([r[field_name][name] for r in records]))
    return summary
