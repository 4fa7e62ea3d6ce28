"""The runner: one vizkit run, executed by a real Lightning Trainer.

``run(cfg, run_dir)`` loads the model and inputs, checks everything a user can get wrong before any
work starts, lets ``Trainer.predict`` drive the method over the inputs (accelerator, devices,
precision and the progress bar are Lightning's), and writes the outputs (``vizkit.output``). The
method itself only sees tensors.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vizkit import output
from vizkit.data import open_inputs
from vizkit.errors import ConfigError
from vizkit.methods.base import AdversarialMethod, AttributionMethod, InspectionMethod, OptimizationMethod
from vizkit.metrics import metric_from_config
from vizkit.metrics.base import Metric, MetricInputs
from vizkit.models import class_label, class_names, data_config, load_model
from vizkit.pixels import PixelSpace
from vizkit.registry import method_from_config
from vizkit.stream import stream
from vizkit.validate import check_run_settings
from vizkit.targets import ClassTarget, PredictedClassTarget, TargetSpec, parse_target, resolve_spec


def pixel_task():
    """The base of the runner's predict tasks: a LightningModule holding the model and its input
    normalization, which ``space(images)`` gives on the batch's device. A task implements
    ``predict_batch(batch)`` for a ``vizkit.data.collate`` batch with at least one readable input."""
    import pytorch_lightning as pl

    class PixelTask(pl.LightningModule):
        def __init__(self, model: torch.nn.Module, pixels: PixelSpace) -> None:
            super().__init__()
            self.model = model
            self.mean, self.std = pixels.mean, pixels.std

        def space(self, images: torch.Tensor) -> PixelSpace:
            return PixelSpace(self.mean.to(images.device), self.std.to(images.device))

        def predict_step(self, batch, batch_idx):
            if batch["pixels"] is None:  # every input of the batch was unreadable (reported by the stream)
                return {}
            return self.predict_batch(batch)

    return PixelTask


def timed_with_grad(device: torch.device, work: Any) -> tuple[Any, float]:
    """``work()`` with gradients enabled (Lightning predicts without them) and its wall seconds, the
    GPU synchronized around it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.enable_grad():
        result = work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def _attribution_task(model: torch.nn.Module, method: AttributionMethod, spec: TargetSpec, pixels: PixelSpace, metrics: list[Metric]):
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
            if target.kind == "class":  # metrics explain the same classes, whatever they run the model on
                target = ClassTarget(target.indices.to(x.device))
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
                "seconds": seconds,
                "metric_seconds": time.perf_counter() - started,
            }

    return AttributionTask(model, pixels)


def _trainer(trainer_cfg: Any, run_dir: Path, **settings: Any):
    """The Trainer a run's config asks for; ``settings``: more Trainer arguments (an optimization's max_steps)."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning's own use of a deprecated torch API
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # an optimization's frozen network is in eval mode on purpose
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")  # a short optimization logs its last step anyway
    warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")  # the run's own earlier chunks
    # Lightning's tips and device banner go to INFO; vizkit says which device it used itself
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero", "pytorch_lightning.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logger = TensorBoardLogger(save_dir=str(run_dir), name=output.TENSORBOARD_DIR, version="", default_hp_metric=False)
    try:
        trainer = pl.Trainer(
            accelerator=trainer_cfg.get("accelerator", "auto"),
            devices=trainer_cfg.get("devices", 1),
            strategy=trainer_cfg.get("strategy", "auto"),
            precision=trainer_cfg.get("precision", "32-true"),
            inference_mode=False,  # with torch.enable_grad() in predict_step: gradients inside prediction
            logger=logger,
            enable_model_summary=False,
            enable_progress_bar=bool(trainer_cfg.get("progress_bar", True)),
            default_root_dir=str(run_dir),
            **{"enable_checkpointing": False, **settings},
        )
    except (ValueError, RuntimeError, TypeError) as error:  # Lightning's own messages are clear
        raise ConfigError(f"trainer: {error}") from None
    return trainer, logger


def _load(model_cfg: Any) -> torch.nn.Module:
    return load_model(model_cfg.name, pretrained=bool(model_cfg.get("pretrained", False)),
                      checkpoint=model_cfg.get("checkpoint"), num_classes=model_cfg.get("num_classes"))


def tensorboard_limit(cfg: Any) -> int:
    """How many inputs' pictures also go to TensorBoard (``tensorboard_images``; the first N by input
    order, whatever the devices): every picture is in images/, but 50,000 in one event file would
    not open."""
    limit = cfg.get("tensorboard_images", 100)
    return 1 << 62 if limit is None or str(limit) == "all" else int(limit)


def run_header(method: Any, cfg: Any, target: Any, trainer: Any) -> dict[str, Any]:
    """The first entries of every results.json: the method and its config, the model, the target, the device."""
    return {
        "method": {"name": method.name, "kind": method.kind, "config": asdict(method.config)},
        "model": {"name": str(cfg.model.name), "pretrained": bool(cfg.model.get("pretrained", False)), "checkpoint": cfg.model.get("checkpoint")},
        "target": str(target),
        "device": str(trainer.strategy.root_device),
    }


def method_hparams(method: Any) -> dict[str, Any]:
    """The method and its fields as TensorBoard HParams (numbers, strings, booleans)."""
    return {"method": method.name, **{f"method.{k}": _hparam(v) for k, v in asdict(method.config).items()}}


def _top5(probabilities: torch.Tensor, names: list[str] | None) -> list[dict[str, Any]]:
    values, indices = probabilities.topk(min(5, probabilities.numel()))
    return [{"index": int(i), "name": class_label(names, int(i)), "probability": float(p)} for p, i in zip(values, indices)]


def _target_record(batch: dict[str, Any], row: int, names: list[str] | None) -> dict[str, Any]:
    if batch["target_kind"] == "class":
        index = int(batch["target_indices"][row])
        return {"kind": "class", "index": index, "name": class_label(names, index)}
    return {"kind": batch["target_kind"], "spec": batch["target_spec"]}


def collect_on_rank_zero(trainer: Any, value: Any, run_dir: Path, name: str, map_location: Any = None) -> list[Any] | None:
    """Every rank's ``value`` (plain data: tensors, numbers, strings, lists and dicts), in rank order,
    on rank 0; None elsewhere. Each rank saves ``.NAME-rankR.pt`` in the run directory; after a barrier
    rank 0 loads them (``weights_only``) and removes them. One process: ``[value]``, no files."""
    if trainer.world_size == 1:
        return [value]
    torch.save(value, run_dir / f".{name}-rank{trainer.global_rank}.pt")
    trainer.strategy.barrier(f"vizkit-{name}")
    if trainer.global_rank != 0:
        return None
    values = []
    for rank in range(trainer.world_size):
        path = run_dir / f".{name}-rank{rank}.pt"
        values.append(torch.load(path, map_location=map_location, weights_only=True))  # our own plain data
        path.unlink()
    return values


def _metrics(cfg: Any, method: AttributionMethod, target_kind: str) -> list[Metric]:
    """The metrics chosen with ``metrics=[...]``, checked against the method and target."""
    chosen = cfg.get("metrics") or {}
    metrics = [metric_from_config(name, chosen[name]) for name in chosen]
    classless = [m.name for m in metrics if m.needs_class and target_kind != "class"]
    if classless:
        raise ConfigError(f"metrics {', '.join(classless)} measure a class's probability; the target '{cfg.get('target')}' is a {target_kind}: "
                          f"use target=predicted or target=class:...")
    return metrics


def _summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the inputs: top-1 accuracy where labels exist, every metric and every detail."""
    summary: dict[str, float] = {}
    labelled = [r for r in records if r["label"] is not None]
    if labelled:
        summary["top1_accuracy"] = sum(r["top5"][0]["index"] == r["label"] for r in labelled) / len(labelled)
    for field_name in ("metrics", "details"):
        for name in (records[0][field_name] if records else {}):
            summary[name] = float(np.mean([r[field_name][name] for r in records]))
    return summary


def _hparam(value: Any) -> Any:
    """TensorBoard's HParams take numbers, strings and booleans."""
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def run(cfg: Any, run_dir: Path) -> dict[str, Any] | None:
    """Execute one run described by a composed config; returns what was written to results.json
    (None on the non-zero ranks of a multi-device run)."""
    started = time.perf_counter()
    # start-up costs, counted with the model load rather than the work: Lightning, and the TensorBoard
    # writer its logger would otherwise import inside the predict loop (~0.05 s)
    import pytorch_lightning  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401

    run_dir = Path(run_dir)
    output.check_fresh(run_dir)
    check_run_settings(cfg)
    method = method_from_config(cfg.method)
    if cfg.get("seed") is not None:
        torch.manual_seed(int(cfg.seed))
    if isinstance(method, OptimizationMethod):
        from vizkit.optimize.run import run_optimization

        return run_optimization(cfg, run_dir, method, _load(cfg.model), started)
    if isinstance(method, AdversarialMethod):
        from vizkit.adversarial import run_adversarial

        return run_adversarial(cfg, run_dir, method, _load(cfg.model), started)
    if isinstance(method, InspectionMethod):
        from vizkit.inspection import run_inspection

        return run_inspection(cfg, run_dir, method, _load(cfg.model), started)
    spec = parse_target(cfg.get("target", "predicted"))
    if method.kind != "attribution" or not isinstance(method, AttributionMethod):
        raise ConfigError(f"method '{method.name}' is of kind '{method.kind}', which this vizkit's runner does not run yet; attribution, optimization, adversarial and inspection methods run")
    target_kind = "class" if spec.kind == "predicted" else spec.kind
    if target_kind not in method.target_kinds:
        raise ConfigError(f"{method.name} cannot explain a {target_kind} target ('{spec}'); it takes: {', '.join(sorted(method.target_kinds))}")
    metrics = _metrics(cfg, method, target_kind)

    model_cfg = cfg.model
    model = _load(model_cfg)
    if spec.kind != "predicted":
        resolve_spec(spec, model, 1, predicted=None)  # an unknown layer or class fails now, before any work
    method.check(model)
    names = class_names(model)
    model_data = data_config(model)
    loaded = time.perf_counter()
    inputs = open_inputs(cfg.data, model_data, names)
    read = time.perf_counter()
    unmasked = [m.name for m in metrics if m.needs_masks] if not inputs.has_masks else []
    if unmasked:
        raise ConfigError(f"metrics {', '.join(unmasked)} compare maps with ground-truth object masks, and these inputs have none; "
                          f"use data=shapes (exact masks) or drop them from metrics=")

    pixels = PixelSpace.from_stats(model_data["mean"], model_data["std"])
    task = _attribution_task(model, method, spec, pixels, metrics)
    to_tensorboard = tensorboard_limit(cfg)

    def consume(writer: output.RunWriter, batch: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """One batch's pictures and maps written, its records kept (they are small)."""
        indices = batch["indices"].tolist()
        entries = [inputs.entries[index] for index in indices]
        pngs = writer.add_attributions([(entry.name, batch["pixels"][row], batch["maps"][row]) for row, entry in enumerate(entries)],
                                       tensorboard=[index < to_tensorboard for index in indices])
        per_input = batch["seconds"] / len(indices)
        metric_seconds = batch["metric_seconds"] / len(indices)
        return {index: {
            "name": entry.name,
            "source": entry.source,
            "label": entry.label,
            "label_name": class_label(names, entry.label) if entry.label is not None else None,
            "top5": _top5(batch["probabilities"][row], names),
            "target": _target_record(batch, row, names),
            "png": png,
            "seconds": per_input,
            "metric_seconds": metric_seconds,
            "details": {name: float(values[row]) for name, values in batch["details"].items()},
            "metrics": {name: float(values[row]) for name, (values, _, _) in batch["metrics"].items()},
            "curves": {name: curve[row].tolist() for name, (_, curve, _) in batch["metrics"].items() if curve is not None},
            "curve_steps": {name: list(steps) for name, (_, curve, steps) in batch["metrics"].items() if curve is not None},
        } for row, (index, entry, png) in enumerate(zip(indices, entries, pngs))}

    streamed = stream(cfg, run_dir, task, inputs, method.name, consume)
    computed = time.perf_counter()
    if not streamed.on_rank_zero:  # a non-zero rank of a multi-device run: rank 0 writes everything
        return None
    trainer, logger, writer, records = streamed.trainer, streamed.logger, streamed.writer, streamed.records
    method_seconds = sum(record["seconds"] for record in records)
    metric_seconds = sum(record.pop("metric_seconds") for record in records)
    curves: dict[str, dict[str, Any]] = {}
    for record in records:
        for name, steps in record.pop("curve_steps").items():
            curves[name] = {"steps": steps}

    summary = _summary(records)
    for name in curves:
        curves[name]["mean"] = np.mean([r["curves"][name] for r in records], axis=0).tolist()
    timings = {
        "model_load_seconds": loaded - started,
        "data_seconds": read - loaded,
        "method_seconds": method_seconds,
        "metric_seconds": metric_seconds,
        "predict_seconds": computed - read,
        "seconds_per_input": method_seconds / max(len(records), 1),
        "inputs_per_second": len(records) / max(computed - read, 1e-9),  # the whole stream: decoding, method, writing
    }
    writer.add_scalars({f"{method.name}/seconds_per_input": timings["seconds_per_input"], **{f"metrics/{k}": v for k, v in summary.items()}})
    for name, curve in curves.items():  # one point per step: a deletion curve, a randomization cascade
        for step, value in enumerate(curve["mean"]):
            writer.add_scalars({f"curves/{name}": value}, step=step)
    hparams = {**method_hparams(method), "model": str(model_cfg.name), "target": str(spec), "data": str(cfg.data.get("kind")), "inputs": len(records),
               "metrics": ",".join(m.name for m in metrics)}
    logger.log_hyperparams(hparams, metrics={"hparams/seconds_per_input": timings["seconds_per_input"],
                                             **{f"hparams/{k}": v for k, v in summary.items()}})
    results = {
        "method": {"name": method.name, "kind": method.kind, "config": asdict(method.config)},
        "model": {"name": str(model_cfg.name), "pretrained": bool(model_cfg.get("pretrained", False)),
                  "checkpoint": model_cfg.get("checkpoint"), "num_classes": len(names) if names else None,
                  "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in model_data.items()}},
        "target": str(spec),
        "device": str(trainer.strategy.root_device),
        "inputs": records,
        "skipped": streamed.skipped,
        "metrics": summary,
        "metric_configs": {m.name: {"better": m.better, **asdict(m.config)} for m in metrics},
        "curves": curves,
        "timings": {**timings, "write_seconds": time.perf_counter() - computed, "run_seconds": time.perf_counter() - started},
    }
    writer.finish(results)
    logger.finalize("success")
    return results
