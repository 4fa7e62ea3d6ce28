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
from vizkit.core.models import class_label, num_classes
from vizkit.core.pixels import PixelSpace
from vizkit.core.target_sets import TargetSet, TopClasses, parse_target_set, resolve_target_set
from vizkit.core.targets import ClassTarget, PredictedClassTarget, TargetSpec, parse_target, resolve_spec
from vizkit.methods.base import Attribution, AttributionMethod
from vizkit.metrics.base import Metric, MetricInputs
from vizkit.output.writer import RunWriter
from vizkit.run.family import FamilyRun, Summary, flat_row, top5
from vizkit.run.stream import stream
from vizkit.run.trainer import pixel_task, timed_with_grad


def attribution_task(model: torch.nn.Module, method: AttributionMethod, spec: TargetSpec | None, target_set: Any, pixels: PixelSpace,
                     metrics: list[Metric]):
    class AttributionTask(pixel_task()):
        """The method, then the metrics, per batch. Predictions (top-5 and the 'predicted' target) come
        from the method's own first forward on the clean input; only a method that makes none costs
        one more forward. A target set (``target_set``: ``top:K`` or a list) gives K maps per input,
        computed by ``explain_targets`` and laid out ``[B, K, ...]``; one target is the case K = 1."""

        def predict_batch(self, batch):
            images, indices, mask_tensor = batch["pixels"], batch["index"], batch["mask"]
            space = self.space(images)
            x = space.from_pixels(images)
            if target_set is not None:
                target = resolve_target_set(target_set, self.model, x)
                explain = lambda: method.explain_targets(self.model, x, target, mean=space.mean, std=space.std)  # noqa: E731
            else:
                # 'predicted' reads the classes from the method's own first forward on x (no extra pass)
                target = PredictedClassTarget(self.model, x) if spec.kind == "predicted" else resolve_spec(spec, self.model, x.shape[0])
                explain = lambda: _as_set(method.explain(self.model, x, target, mean=space.mean, std=space.std))  # noqa: E731
            explained, seconds = timed_with_grad(images.device, explain)
            logits = _clean_logits(target)
            if logits is None:  # the method never ran the model on x itself (e.g. a channel target)
                with torch.no_grad():
                    logits = self.model(x)
            columns = target.columns() if target_set is not None else [target]
            # what the captions of channel, neuron and layer targets report in place of a probability: one more
            # forward, for these targets only, all of a set's from the same forward
            scored = [column for column in columns if column.kind != "class"]
            with torch.no_grad():
                values = TargetSet(scored, []).scores(self.model, x).float().cpu() if scored else None
            records, scored_column = [], 0
            for column in columns:
                target_scores = None
                if column.kind == "class":  # metrics explain the same classes, whatever they run the model on
                    column = ClassTarget(column.indices.to(x.device))
                else:
                    target_scores, scored_column = values[:, scored_column], scored_column + 1
                records.append((column, target_scores))
            started = time.perf_counter()
            scores: dict[str, list] = {}
            for k, (column, _) in enumerate(records):
                for metric in metrics:
                    inputs = MetricInputs(self.model, x, explained.maps[:, k].float(), column, space, method, mask_tensor)
                    with torch.enable_grad():  # randomization re-runs the method
                        scores.setdefault(metric.name, []).append(metric.evaluate(inputs))
            return {
                "indices": indices.cpu(),
                "pixels": images.detach().float().cpu(),
                "probabilities": logits.float().softmax(1).cpu(),
                "maps": explained.maps.float().cpu(),  # [B, K, ...]
                "details": {name: values.float().cpu() for name, values in explained.details.items()},  # [B, K]
                "metrics": {name: (torch.stack([r.values.float().cpu() for r in results], 1),
                                   None if results[0].curve is None else torch.stack([r.curve.float().cpu() for r in results], 1),
                                   list(results[0].curve_steps))
                            for name, results in scores.items()},
                "targets": [{"kind": column.kind, "indices": column.indices.cpu() if column.kind == "class" else None,
                             "spec": str(column), "scores": target_scores} for column, target_scores in records],
                "labels": list(target.labels) if target_set is not None else None,
                "seconds": seconds,
                "metric_seconds": time.perf_counter() - started,
            }

    return AttributionTask(model, pixels)


def _as_set(explained: Attribution) -> Attribution:
    """One target's result laid out as a set of one: maps ``[B, 1, ...]``, details ``[B, 1]``."""
    return Attribution(explained.maps.unsqueeze(1), {name: values.unsqueeze(1) for name, values in explained.details.items()})


def _clean_logits(target: Any) -> torch.Tensor | None:
    """The logits a target read from the method's own forward on the clean input, if it did."""
    logits = getattr(target, "clean_logits", None)
    if logits is None and isinstance(target, TargetSet) and not isinstance(target, TopClasses):
        logits = next((column.clean_logits for column in target.columns() if getattr(column, "clean_logits", None) is not None), None)
    return logits


class AttributionRun(FamilyRun):
    method_base = AttributionMethod

    def prepare(self) -> None:
        method, settings = self.method, self.settings
        parsed = parse_target_set(settings.target)  # top:K -> K, a list -> its specs, one target -> None
        self.target_set = settings.target if parsed is not None else None
        self.spec = parse_target(settings.target) if parsed is None else None
        specs = [self.spec] if parsed is None else [TargetSpec("predicted")] if isinstance(parsed, int) else list(parsed)
        self.target_text = str(self.spec) if parsed is None else f"top:{parsed}" if isinstance(parsed, int) else "[" + ",".join(map(str, parsed)) + "]"
        self.metrics = settings.metrics
        for spec in specs:
            target_kind = "class" if spec.kind == "predicted" else spec.kind
            if target_kind not in method.target_kinds:
                raise ConfigError(f"{method.name} cannot explain a {target_kind} target ('{spec}'); it takes: {', '.join(sorted(method.target_kinds))}")
            classless = [m.name for m in self.metrics if m.needs_class and target_kind != "class"]
            if classless:
                raise ConfigError(f"metrics {', '.join(classless)} measure a class's probability; the target '{spec}' is a {target_kind}: "
                                  f"use target=predicted or target=class:...")
        model = self.load_model()
        for spec in specs:
            if spec.kind != "predicted":
                resolve_spec(spec, model, 1, predicted=None)  # an unknown layer or class fails now, before any work
        if isinstance(parsed, int):
            classes = num_classes(model)
            if classes is not None and parsed > classes:
                raise ConfigError(f"target top:{parsed} asks for more classes than the model has ({classes})")
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
        task = attribution_task(self.model, self.method, self.spec, self.target_set, pixels, self.metrics)
        self.streamed = stream(self.settings.trainer, self.settings.data, self.run_dir, task, self.inputs, self.method.name, self.consume,
                               render=self.settings.render)
        self.clock.mark("computed")
        self.trainer, self.logger, self.writer = self.streamed.trainer, self.streamed.logger, self.streamed.writer
        return self.streamed.on_rank_zero

    def consume(self, writer: RunWriter, batch: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """One batch's pictures and maps written, its records kept (they are small): one per input, or with a
        target set one per input and target, named after both (``circle_003__class_3``, ``circle_003__top1_class_7``)."""
        names, to_tensorboard = self.names, self.settings.pictures_to_tensorboard
        indices = batch["indices"].tolist()
        entries = [self.inputs.entries[index] for index in indices]
        columns, labels = len(batch["targets"]), batch["labels"]
        approximate = bool(self.method.notes().get("approximate"))  # an approximate map says so in its caption and tag
        label = f"{self.method.name} (approximate)" if approximate else self.method.name
        items = []  # (key, row, k, entry, map name, target record, caption)
        for row, (index, entry) in enumerate(zip(indices, entries)):
            for k in range(columns):
                target = _target_record(batch["targets"][k], batch["probabilities"][row], row, names)
                name = entry.name if labels is None else f"{entry.name}__{_column_label(labels[k], target)}"
                items.append((index * columns + k, row, k, entry, name, target, f"{_target_caption(target)} · {label}"))
        pngs = writer.add_attributions([(name, batch["pixels"][row], batch["maps"][row, k], caption) for _, row, k, _, name, _, caption in items],
                                       tensorboard=[indices[row] < to_tensorboard for _, row, *_ in items],
                                       panel="panel_approximate" if approximate else "panel")
        per_input = batch["seconds"] / len(items)
        metric_seconds = batch["metric_seconds"] / len(items)
        return {key: {
            "name": name,
            **({} if labels is None else {"input": entry.name}),
            "source": entry.source,
            "label": entry.label,
            "label_name": class_label(names, entry.label) if entry.label is not None else None,
            "top5": top5(batch["probabilities"][row], names),
            "target": target,
            "caption": caption,
            "png": png,
            "seconds": per_input,
            "metric_seconds": metric_seconds,
            "details": {name: float(values[row, k]) for name, values in batch["details"].items()},
            "metrics": {name: float(values[row, k]) for name, (values, _, _) in batch["metrics"].items()},
            "curves": {name: curve[row, k].tolist() for name, (_, curve, _) in batch["metrics"].items() if curve is not None},
            "curve_steps": {name: list(steps) for name, (_, curve, steps) in batch["metrics"].items() if curve is not None},
        } for (key, row, k, entry, name, target, caption), png in zip(items, pngs)}

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
        inputs = _input_count(records)  # a target set writes K records per input
        seconds_per_input = method_seconds / max(inputs, 1)
        return Summary(
            target=self.target_text,
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
                "inputs_per_second": inputs / max(clock.between("read", "computed"), 1e-9),  # the whole stream: decoding, method, writing
            },
            hparams={"target": self.target_text, "data": str(self.settings.data.kind), "inputs": inputs,
                     "metrics": ",".join(m.name for m in self.metrics)},
            scalars={"timing/seconds_per_input": seconds_per_input},
            rows=[_row(record) for record in records],
        )

    @staticmethod
    def report(results: dict[str, Any]) -> str:
        skipped = f" ({len(results['skipped'])} unreadable skipped)" if results.get("skipped") else ""
        records, inputs = results["inputs"], _input_count(results["inputs"])
        per_input = f" x {len(records) // inputs} targets" if inputs and len(records) > inputs else ""
        return f"{results['method']['name']} on {inputs} input(s){per_input}{skipped}, {results['device']}"


def _input_count(records: list[dict[str, Any]]) -> int:
    """How many inputs the records are of: a target set's K records of one input name it as their ``input``."""
    return len({record.get("input", record["name"]) for record in records})


def _target_record(column: dict[str, Any], probabilities: torch.Tensor, row: int, names: list[str] | None) -> dict[str, Any]:
    if column["kind"] == "class":
        index = int(column["indices"][row])
        return {"kind": "class", "index": index, "name": class_label(names, index), "probability": float(probabilities[index])}
    return {"kind": column["kind"], "spec": column["spec"], "score": float(column["scores"][row])}


def _column_label(label: str, target: dict[str, Any]) -> str:
    """A target set's column in a map's name: its spec (``class_3``), or for top:K and predicted the class too (``top1_class_7``)."""
    return f"{label}_class_{target['index']}" if (label.startswith("top") or label == "predicted") and target["kind"] == "class" else label


def _target_caption(target: dict[str, Any]) -> str:
    """``star (class 3) p=0.972``, or a channel/neuron/layer target's spec and score (``channel:layer3:5 score=1.23``)."""
    if target["kind"] != "class":
        return f"{target['spec']} score={target['score']:.3g}"
    named = f"{target['name']} (class {target['index']})" if str(target["name"]) != str(target["index"]) else f"class {target['index']}"
    return f"{named} p={target['probability']:.3f}"


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """One input's results.csv row: what it is, what the model said, what was explained, every metric."""
    top = record["top5"][0]
    return {"name": record["name"], **({"input": record["input"]} if "input" in record else {}), "source": record["source"], "label": record["label"], "label_name": record["label_name"],
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
