"""One adversarial run: the attack driven over the inputs by ``Trainer.predict``, and what a paper reports.

Labels are the data set's where it has them (``data=shapes``), else the model's clean prediction (the
attack then asks "can the prediction be changed?", and clean accuracy is not defined: it is left out).
``target=class:...`` makes the attack targeted; the default ``predicted`` leaves it untargeted.

Per input (``results.json`` -> inputs): clean and adversarial top-5, the label and where it came from,
success, the perturbation's L∞, L2 and L0 norms in pixel units, and the method's own per-input
``details`` (autoattack: which attack broke the input). Per run (``metrics``, TensorBoard
scalars and HParams): clean accuracy, robust accuracy (adversarial prediction = label), success rate
(untargeted: the share of correctly classified inputs whose prediction the attack changed; targeted:
the share of inputs that reach the target), mean and max norms, and the method's ``report`` (autoattack:
robust accuracy after each of its attacks). Pictures: clean | adversarial |
perturbation, the last amplified for viewing around mid-gray, tagged ``INPUT/panel`` (the same card
for every run of an ε sweep); the caption over it and the image's description say the clean and the
adversarial prediction and the amplification factor, which ``results.json`` also holds.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from vizkit.core import pictures
from vizkit.core.errors import ConfigError
from vizkit.core.models import class_label
from vizkit.core.pixels import PixelSpace
from vizkit.core.targets import parse_target, resolve_spec
from vizkit.methods.adversarial.budget import perturbation_norms
from vizkit.methods.base import AdversarialMethod, as_perturbed
from vizkit.output.writer import RunWriter
from vizkit.run.family import FamilyRun, Summary, flat_row, top5
from vizkit.run.stream import stream
from vizkit.run.trainer import pixel_task, timed_with_grad


def attack_task(model: torch.nn.Module, method: AdversarialMethod, pixels: PixelSpace, labels: list[int | None], target_class: int | None):
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
            result, seconds = timed_with_grad(images.device, lambda: as_perturbed(method.perturb(self.model, images.detach(), label, targets, space)))
            adversarial = result.pixels.detach()
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
                "details": {name: values.detach().cpu() for name, values in result.details.items()},
                "seconds": seconds,
            }

    return AttackTask(model, pixels)


class AdversarialRun(FamilyRun):
    method_base = AdversarialMethod

    def prepare(self) -> None:
        method = self.method
        model = self.load_model()
        self.spec = parse_target(self.settings.target)
        self.target_class = None
        if self.spec.kind != "predicted":
            if self.spec.kind != "class":
                raise ConfigError(f"{method.name} attacks a class decision: use target=class:NAME (targeted) or leave target=predicted (untargeted)")
            if not method.targeted:
                raise ConfigError(f"{method.name} is untargeted: it takes no target (drop target={self.spec})")
            self.target_class = int(resolve_spec(self.spec, model, 1).indices[0])
        self.clock.mark("loaded")
        self.inputs = self.settings.data.open(self.model_data, self.names)
        self.clock.mark("read")

    def execute(self) -> bool:
        pixels = PixelSpace.from_stats(self.model_data["mean"], self.model_data["std"])
        task = attack_task(self.model, self.method, pixels, [entry.label for entry in self.inputs.entries], self.target_class)
        self.streamed = stream(self.settings.trainer, self.settings.data, self.run_dir, task, self.inputs, self.method.name, self.consume,
                               render=self.settings.render)
        self.clock.mark("computed")
        self.trainer, self.logger, self.writer = self.streamed.trainer, self.streamed.logger, self.streamed.writer
        return self.streamed.on_rank_zero

    def consume(self, writer: RunWriter, batch: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """One batch's pictures written (clean | adversarial | perturbation), its records kept."""
        names, target_class, to_tensorboard = self.names, self.target_class, self.settings.pictures_to_tensorboard
        indices = batch["indices"].tolist()
        norms = perturbation_norms(batch["clean_pixels"], batch["pixels"])
        records, panels = {}, []
        for row, index in enumerate(indices):
            entry, label = self.inputs.entries[index], int(batch["labels"][row])
            clean_top, adversarial_top = batch["clean"][row].argmax().item(), batch["adversarial"][row].argmax().item()
            success = adversarial_top == target_class if target_class is not None else adversarial_top != label
            delta = batch["pixels"][row] - batch["clean_pixels"][row]
            factor = _amplification(float(norms["linf"][row]))
            records[index] = {
                "name": entry.name, "source": entry.source,
                "label": label, "label_name": class_label(names, label),
                "label_source": "data" if bool(batch["label_known"][row]) else "clean prediction",
                "clean_top5": top5(batch["clean"][row], names),
                "adversarial_top5": top5(batch["adversarial"][row], names),
                "clean_correct": clean_top == label, "adversarial_correct": adversarial_top == label,
                "target": None if target_class is None else {"index": target_class, "name": class_label(names, target_class)},
                "success": bool(success),
                "norms": {key: float(values[row]) for key, values in norms.items()},
                "amplification": factor,
                "details": {name: values[row].item() for name, values in batch["details"].items()},
                "seconds": batch["seconds"] / len(indices),
            }
            clean, adversarial = records[index]["clean_top5"][0], records[index]["adversarial_top5"][0]
            records[index]["caption"] = (f"{clean['name']} p={clean['probability']:.2f} -> {adversarial['name']} p={adversarial['probability']:.2f}"
                                         f" · {self.method.name} · clean | adversarial | perturbation x{factor:g}")
            panels.append((entry.name, f"{entry.name}/panel",
                           [pictures.to_uint8(batch["clean_pixels"][row]), pictures.to_uint8(batch["pixels"][row]),
                            pictures.to_uint8((0.5 + factor * delta).clamp(0, 1))], records[index]["caption"]))
        for index, relative in zip(indices, writer.add_panels(panels, tensorboard=[index < to_tensorboard for index in indices])):
            records[index]["png"] = relative
        return records

    def summarize(self) -> Summary:
        records, clock = self.streamed.records, self.clock
        summary = _adversarial_summary(records, self.target_class is not None)
        summary.update(self.method.report(records))
        method_seconds = sum(record["seconds"] for record in records)
        return Summary(
            target=str(self.spec),
            fields={"inputs": records, "skipped": self.streamed.skipped, "metrics": summary},
            metrics=summary,
            timings={"model_load_seconds": clock.between("started", "loaded"), "data_seconds": clock.between("loaded", "read"),
                     "method_seconds": method_seconds, "predict_seconds": clock.between("read", "computed"),
                     "seconds_per_input": method_seconds / max(len(records), 1)},
            hparams={"target": str(self.spec), "data": str(self.settings.data.kind), "inputs": len(records)},
            rows=[_row(record) for record in records],
        )

    @staticmethod
    def report(results: dict[str, Any]) -> str:
        skipped = f" ({len(results['skipped'])} unreadable skipped)" if results.get("skipped") else ""
        return f"{results['method']['name']} on {len(results['inputs'])} input(s){skipped}, {results['device']}"


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """One input's results.csv row: its label, the clean and the adversarial prediction, success, norms."""
    clean, adversarial = record["clean_top5"][0], record["adversarial_top5"][0]
    return {"name": record["name"], "source": record["source"], "label": record["label"], "label_name": record["label_name"],
            "label_source": record["label_source"], "clean": clean["name"], "clean_probability": clean["probability"],
            "adversarial": adversarial["name"], "adversarial_probability": adversarial["probability"],
            **flat_row({key: record[key] for key in ("clean_correct", "adversarial_correct", "success", "target", "norms", "details")}),
            "amplification": record["amplification"], "seconds": record["seconds"], "png": record["png"]}


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
