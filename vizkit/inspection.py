"""One inspection run: the method's ``Inspection`` written out as pictures, scalars and results.json.

A method that needs no data (``filters``) goes straight to ``finish``. A data-set scan
(``needs_data``) streams ``data=`` through ``Trainer.predict`` (devices, precision, the progress bar
are Lightning's): each device keeps its own state, built by ``start`` and one ``update`` per batch;
when the scan ends every device's state reaches rank 0 (``vizkit.stream``'s one exchange of rank
files, with the skipped inputs), is merged into one (``merge``), and rank 0 calls ``finish`` and
writes everything.

Writes: ``images/NAME.png`` per picture, the same PNG bytes as the TensorBoard image of its tag
(``METHOD/NAME`` unless the method says otherwise, e.g. ``filters/conv1/rgb|normalize=filter``),
scalars ``metrics/*``, the HParams (the method's fields and its metrics), and ``results.json``:
the run header, ``scanned`` (the inputs streamed), ``pictures`` (name, png, tag), ``metrics``,
``records`` and ``timings``.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import torch

from vizkit import output
from vizkit.data import open_inputs
from vizkit.errors import ConfigError
from vizkit.methods.base import InspectionMethod
from vizkit.models import class_names, data_config
from vizkit.pixels import PixelSpace
from vizkit.stream import stream


def _scan_task(model: torch.nn.Module, method: InspectionMethod, pixels: PixelSpace):
    from vizkit.runner import pixel_task

    class ScanTask(pixel_task()):
        """The method's ``update`` per batch on this device's state; a batch returns only its size,
        so a scan holds no more than the state however many inputs it sees."""

        state: Any = None

        def on_predict_start(self) -> None:
            self.state = method.start(self.model, PixelSpace(self.mean.to(self.device), self.std.to(self.device)))

        def predict_batch(self, batch):
            images, indices = batch["pixels"], batch["index"]
            with torch.no_grad():
                self.state = method.update(self.state, self.model, images, indices, self.space(images))
            return {}

    return ScanTask(model, pixels)


def run_inspection(cfg: Any, run_dir: Path, method: InspectionMethod, model: torch.nn.Module, started: float) -> dict[str, Any] | None:
    from vizkit.runner import _trainer, method_hparams, run_header

    target = cfg.get("target", "predicted")
    if str(target) != "predicted":
        raise ConfigError(f"{method.name} takes no target (drop target={target}); its fields say what to inspect "
                          f"(see `vizkit method={method.name} --cfg job`)")
    method.check(model)
    loaded = time.perf_counter()
    model_data = data_config(model)
    pixels = PixelSpace.from_stats(model_data["mean"], model_data["std"])
    inputs, scanned_count, skipped, writer = None, 0, [], None
    if method.needs_data:
        inputs = open_inputs(cfg.data, model_data, class_names(model))
        read = time.perf_counter()
        task = _scan_task(model, method, pixels)
        streamed = stream(cfg, run_dir, task, inputs, method.name, rank_state=lambda: task.state)
        scanned = time.perf_counter()
        trainer = streamed.trainer
        if not streamed.on_rank_zero:  # a non-zero rank of a multi-device run: rank 0 writes everything
            return None
        state = method.merge(streamed.states)  # every device's state, loaded onto rank 0's device
        logger, writer, skipped = streamed.logger, streamed.writer, streamed.skipped
        scanned_count = len(inputs) - len(skipped)
    else:
        read = scanned = time.perf_counter()
        trainer, logger = _trainer(cfg.get("trainer", {}), run_dir)
    device = trainer.strategy.root_device
    space = PixelSpace(pixels.mean.to(device), pixels.std.to(device))
    if not method.needs_data:
        model.to(device)  # where the run says it ran
        with torch.no_grad():
            state = method.merge([method.start(model, space)])
    merged = time.perf_counter()

    @functools.lru_cache(maxsize=64)  # channels share their top images: decode each once, not once per patch
    def fetch(index: int) -> torch.Tensor:
        """Input ``index`` decoded again (a scan keeps no pixels)."""
        if inputs is None:
            raise ConfigError(f"{method.name} streamed no data: there is no input {index} to fetch")
        return inputs.load(int(index)).pixels

    with torch.no_grad():
        inspection = method.conclude(state, model, space, fetch)
    finished = time.perf_counter()

    writer = writer or output.RunWriter(run_dir, method.name, logger.experiment)
    pictures = [{"name": name, "png": writer.add_picture(name, inspection.tags[name], picture), "tag": inspection.tags[name]}
                for name, picture in inspection.pictures.items()]
    writer.add_scalars({f"metrics/{k}": v for k, v in inspection.metrics.items()})
    hparams = {**method_hparams(method), "model": str(cfg.model.name)}
    if method.needs_data:
        hparams.update({"data": str(cfg.data.get("kind")), "inputs": scanned_count})
    logger.log_hyperparams(hparams, metrics={f"hparams/{k}": v for k, v in inspection.metrics.items()})
    results = {
        **run_header(method, cfg, None, trainer),
        "target": None,
        "scanned": scanned_count,
        "skipped": skipped,
        "pictures": pictures,
        "metrics": inspection.metrics,
        "records": inspection.records,
        "timings": {"model_load_seconds": loaded - started, "data_seconds": read - loaded, "scan_seconds": scanned - read,
                    "inputs_per_second": scanned_count / max(scanned - read, 1e-9) if method.needs_data else None,
                    "merge_seconds": merged - scanned, "finish_seconds": finished - merged,
                    "write_seconds": time.perf_counter() - finished, "run_seconds": time.perf_counter() - started},
    }
    writer.finish(results)
    logger.finalize("success")
    return results
