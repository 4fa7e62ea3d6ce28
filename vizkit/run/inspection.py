"""One inspection run: the method's ``Inspection`` written out as pictures, scalars and results.json.

A method that needs no data (``filters``) goes straight to ``finish``. A data-set scan
(``needs_data``) streams ``data=`` through ``Trainer.predict`` (devices, precision, the progress bar
are Lightning's): each device keeps its own state, built by ``start`` and one ``update`` per batch;
when the scan ends every device's state reaches rank 0 (``vizkit.run.stream``'s one exchange of rank
files, with the skipped inputs), is merged into one (``merge``), and rank 0 calls ``finish`` and
writes everything.

Writes: ``images/NAME.png`` per picture, the same PNG bytes as the TensorBoard image of its tag
(``METHOD/NAME`` unless the method says otherwise, e.g. ``filters/conv1/rgb|normalize=filter``),
scalars ``metrics/*``, the HParams session (the method's fields), ``results.json``: the run header,
``scanned`` (the inputs streamed), ``pictures`` (name, png, tag), ``metrics``, ``records`` and
``timings``; and ``results.csv``, one row per record (per patch for a record holding several).
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from vizkit.core.errors import ConfigError
from vizkit.core.pixels import PixelSpace
from vizkit.methods.base import InspectionMethod
from vizkit.output.writer import RunWriter
from vizkit.run.family import FamilyRun, Summary, flat_row
from vizkit.run.stream import stream
from vizkit.run.trainer import make_trainer, pixel_task


def scan_task(model: torch.nn.Module, method: InspectionMethod, pixels: PixelSpace):
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


class InspectionRun(FamilyRun):
    method_base = InspectionMethod

    def prepare(self) -> None:
        method, target = self.method, self.settings.target
        model = self.load_model()
        if str(target) != "predicted":
            raise ConfigError(f"{method.name} takes no target (drop target={target}); its fields say what to inspect "
                              f"(see `vizkit method={method.name} --cfg job`)")
        method.check(model)
        self.clock.mark("loaded")
        self.pixels = PixelSpace.from_stats(self.model_data["mean"], self.model_data["std"])
        self.inputs = self.settings.data.open(self.model_data, self.names) if method.needs_data else None
        self.clock.mark("read")

    def execute(self) -> bool:
        method, model = self.method, self.model
        self.scanned_count, self.skipped = 0, []
        if method.needs_data:
            task = scan_task(model, method, self.pixels)
            streamed = stream(self.settings.trainer, self.settings.data, self.run_dir, task, self.inputs, method.name,
                              rank_state=lambda: task.state)
            self.clock.mark("scanned")
            self.trainer = streamed.trainer
            if not streamed.on_rank_zero:  # a non-zero rank of a multi-device run: rank 0 writes everything
                return False
            self.state = method.merge(streamed.states)  # every device's state, loaded onto rank 0's device
            self.logger, self.writer, self.skipped = streamed.logger, streamed.writer, streamed.skipped
            self.scanned_count = len(self.inputs) - len(self.skipped)
        else:
            self.clock.mark("scanned")
            self.trainer, self.logger = make_trainer(self.settings.trainer, self.run_dir)
        device = self.trainer.strategy.root_device
        self.space = PixelSpace(self.pixels.mean.to(device), self.pixels.std.to(device))
        if not method.needs_data:
            model.to(device)  # where the run says it ran
            with torch.no_grad():
                self.state = method.merge([method.start(model, self.space)])
        self.clock.mark("merged")
        inputs = self.inputs

        @functools.lru_cache(maxsize=64)  # channels share their top images: decode each once, not once per patch
        def fetch(index: int) -> torch.Tensor:
            """Input ``index`` decoded again (a scan keeps no pixels)."""
            if inputs is None:
                raise ConfigError(f"{method.name} streamed no data: there is no input {index} to fetch")
            return inputs.load(int(index)).pixels

        with torch.no_grad():
            self.inspection = method.conclude(self.state, model, self.space, fetch)
        self.clock.mark("finished")
        self.clock.mark("computed")
        return True

    def summarize(self) -> Summary:
        method, inspection, clock = self.method, self.inspection, self.clock
        self.writer = self.writer or RunWriter(self.run_dir, self.logger.experiment)
        pictures = [{"name": name, "png": self.writer.add_picture(name, inspection.tags[name], picture), "tag": inspection.tags[name]}
                    for name, picture in inspection.pictures.items()]
        hparams = {"data": str(self.settings.data.kind), "inputs": self.scanned_count} if method.needs_data else {}
        return Summary(
            target=None,
            fields={"scanned": self.scanned_count, "skipped": self.skipped, "pictures": pictures,
                    "metrics": inspection.metrics, "records": inspection.records},
            metrics=inspection.metrics,
            timings={"model_load_seconds": clock.between("started", "loaded"), "data_seconds": clock.between("loaded", "read"),
                     "scan_seconds": clock.between("read", "scanned"),
                     "inputs_per_second": self.scanned_count / max(clock.between("read", "scanned"), 1e-9) if method.needs_data else None,
                     "merge_seconds": clock.between("scanned", "merged"), "finish_seconds": clock.between("merged", "finished")},
            hparams=hparams,
            rows=_rows(inspection.records),
        )

    @staticmethod
    def report(results: dict[str, Any]) -> str:
        scanned = f" from {results['scanned']} input(s)" if results["scanned"] else ""
        return f"{results['method']['name']}: {len(results['pictures'])} picture(s){scanned}, {results['device']}"


def _rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """results.csv: a record per row, or, for a record holding a list of items (a channel's top
    patches), one row per item with the record's own fields in front (``channel, rank, ...``)."""
    rows = []
    for record in records:
        items = next((value for value in record.values() if isinstance(value, list) and value and isinstance(value[0], dict)), None)
        if items is None:
            rows.append(flat_row(record))
        else:
            rows += [{**flat_row(record), "rank": rank, **flat_row(item)} for rank, item in enumerate(items, 1)]
    return rows
