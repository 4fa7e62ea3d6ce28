"""One adversarial run: the attack driven over the inputs by ``Trainer.predict``, and what a paper reports.

Labels are the data set's where it has them (``data=shapes``), else the model's clean prediction (the
attack then asks "can the prediction be changed?", and clean accuracy is not defined: it is left out).
``target=class:...`` makes the attack targeted; the default ``predicted`` leaves it untargeted.

Per input (``results.json`` -> inputs): clean and adversarial top-5, the label and where it came from,
success, and the perturbation's L∞, L2 and L0 norms in pixel units. Per run (``metrics``, TensorBoard
scalars and HParams): clean accuracy, robust accuracy (adversarial prediction = label), success rate
(untargeted: the share of correctly classified inputs whose prediction the attack changed; targeted:
the share of inputs that reach the target), mean and max norms. Pictures: clean | adversarial |
perturbation, the last amplified for viewing around mid-gray, the factor in the TensorBoard tag
(``METHOD/INPUT/clean|adversarial|perturbation_x16``) and in ``results.json``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vizkit import output, render
from vizkit.data import open_inputs
from vizkit.errors import ConfigError
from vizkit.methods.adversarial.budget import perturbation_norms
from vizkit.methods.base import AdversarialMethod
from vizkit.models import class_label, class_names, data_config
from vizkit.pixels import PixelSpace
from vizkit.stream import stream
from vizkit.targets import parse_target, resolve_spec


def _attack_task(model: torch.nn.Module, method: AdversarialMethod, pixels: PixelSpace, labels: list[int | None], target_class: int | None):
    from vizkit.runner import pixel_task, timed_with_grad

    class AttackTask(pixel_task()):
        def predict_batch(self, batch):
            images, indices = batch["pixels"], batch["index"]
            space = self.space(images)
            with torch.no_grad():
                clean_logits = self.model(space.from_pixels(images))
            known = [labels[i] for i in indices.tolist()]
            label = torch.tensor([clean_logits.argmax(1)[row].item() if value is None else value for row, value in enumerate(known)],
                                 device=images.device)
            targets = None if target_class is None else torch.full_like(label, target_class)
            adversarial, seconds = timed_with_grad(images.device, lambda: method.perturb(self.model, images.detach(), label, targets, space).detach())
            with torch.no_grad():
                adversarial_logits = self.model(space.from_pixels(adversarial))
            return {
                "indices": indices.cpu(),
                "labels": label.cpu(),
                "label_known": torch.tensor([value is not None for value in known]),
                "clean": clean_logits.float().softmax(1).cpu(),
                "adversarial": adversarial_logits.float().softmax(1).cpu(),
                "pixels": adversarial.float().cpu(),
                "clean_pixels": images.detach().float().cpu(),
                "seconds": seconds,
            }

    return AttackTask(model, pixels)


def run_adversarial(cfg: Any, run_dir: Path, method: AdversarialMethod, model: torch.nn.Module, started: float) -> dict[str, Any] | None:
    from vizkit.runner import _top5, method_hparams, run_header, tensorboard_limit

    names = class_names(model)
    spec = parse_target(cfg.get("target", "predicted"))
    target_class = None
    if spec.kind != "predicted":
        if spec.kind != "class":
            raise ConfigError(f"{method.name} attacks a class decision: use target=class:NAME (targeted) or leave target=predicted (untargeted)")
        if not method.targeted:
            raise ConfigError(f"{method.name} is untargeted: it takes no target (drop target={spec})")
        target_class = int(resolve_spec(spec, model, 1).indices[0])
    loaded = time.perf_counter()
    model_data = data_config(model)
    inputs = open_inputs(cfg.data, model_data, names)
    read = time.perf_counter()
    pixels = PixelSpace.from_stats(model_data["mean"], model_data["std"])
    task = _attack_task(model, method, pixels, [entry.label for entry in inputs.entries], target_class)
    to_tensorboard = tensorboard_limit(cfg)

    def consume(writer: output.RunWriter, batch: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """One batch's pictures written (clean | adversarial | perturbation), its records kept."""
        indices = batch["indices"].tolist()
        norms = perturbation_norms(batch["clean_pixels"], batch["pixels"])
        records, panels = {}, []
        for row, index in enumerate(indices):
            entry, label = inputs.entries[index], int(batch["labels"][row])
            clean_top, adversarial_top = batch["clean"][row].argmax().item(), batch["adversarial"][row].argmax().item()
            success = adversarial_top == target_class if target_class is not None else adversarial_top != label
            delta = batch["pixels"][row] - batch["clean_pixels"][row]
            factor = _amplification(float(norms["linf"][row]))
            records[index] = {
                "name": entry.name, "source": entry.source,
                "label": label, "label_name": class_label(names, label),
                "label_source": "data" if bool(batch["label_known"][row]) else "clean prediction",
                "clean_top5": _top5(batch["clean"][row], names),
                "adversarial_top5": _top5(batch["adversarial"][row], names),
                "clean_correct": clean_top == label, "adversarial_correct": adversarial_top == label,
                "target": None if target_class is None else {"index": target_class, "name": class_label(names, target_class)},
                "success": bool(success),
                "norms": {key: float(values[row]) for key, values in norms.items()},
                "amplification": factor,
                "seconds": batch["seconds"] / len(indices),
            }
            panels.append((entry.name, f"{method.name}/{entry.name}/clean|adversarial|perturbation_x{factor:g}",
                           [render.to_uint8(batch["clean_pixels"][row]), render.to_uint8(batch["pixels"][row]),
                            render.to_uint8((0.5 + factor * delta).clamp(0, 1))]))
        for index, relative in zip(indices, writer.add_panels(panels, tensorboard=[index < to_tensorboard for index in indices])):
            records[index]["png"] = relative
        return records

    streamed = stream(cfg, run_dir, task, inputs, method.name, consume)
    computed = time.perf_counter()
    if not streamed.on_rank_zero:  # a non-zero rank of a multi-device run: rank 0 writes everything
        return None
    trainer, logger, writer, records = streamed.trainer, streamed.logger, streamed.writer, streamed.records
    summary = _adversarial_summary(records, target_class is not None)
    method_seconds = sum(record["seconds"] for record in records)
    timings = {"model_load_seconds": loaded - started, "data_seconds": read - loaded, "method_seconds": method_seconds,
               "predict_seconds": computed - read, "seconds_per_input": method_seconds / max(len(records), 1)}
    writer.add_scalars({f"metrics/{k}": v for k, v in summary.items()})
    hparams = {**method_hparams(method), "model": str(cfg.model.name), "target": str(spec), "data": str(cfg.data.get("kind")), "inputs": len(records)}
    logger.log_hyperparams(hparams, metrics={f"hparams/{k}": v for k, v in summary.items()})
    results = {
        **run_header(method, cfg, spec, trainer),
        "inputs": records,
        "skipped": streamed.skipped,
        "metrics": summary,
        "timings": {**timings, "write_seconds": time.perf_counter() - computed, "run_seconds": time.perf_counter() - started},
    }
    writer.finish(results)
    logger.finalize("success")
    return results


def _amplification(linf: float) -> float:
    """How much to multiply a perturbation by so that its largest value spans half the gray range:
    a round number (1, 2, 5 x 10^k) for readable tags; 1 for no perturbation."""
    if linf <= 0:
        return 1.0
    wanted = 0.5 / linf
    power = 10 ** math.floor(math.log10(wanted))
    return float(max(step * power for step in (1, 2, 5) if step * power <= wanted))


def _adversarial_summary(records: list[dict[str, Any]], targeted: bool) -> dict[str, float]:
    """What a paper reports: clean and robust accuracy, success rate, mean and max norms."""
    summary: dict[str, float] = {}
    labelled = [r for r in records if r["label_source"] == "data"]
    if labelled:
        summary["clean_accuracy"] = float(np.mean([r["clean_correct"] for r in labelled]))
    summary["robust_accuracy"] = float(np.mean([r["adversarial_correct"] for r in records])) if records else 0.0
    attacked = records if targeted else [r for r in records if r["clean_correct"]]
    summary["success_rate"] = float(np.mean([r["success"] for r in attacked])) if attacked else 0.0
    for norm in ("linf", "l2"):
        values = [r["norms"][norm] for r in records]
        summary[f"mean_{norm}"] = float(np.mean(values)) if values else 0.0
        summary[f"max_{norm}"] = float(np.max(values)) if values else 0.0
    return summary
