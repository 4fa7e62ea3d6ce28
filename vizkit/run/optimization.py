"""An optimization run: the method's ``Problem`` fitted by a Lightning Trainer.

Writes, in the run directory: TensorBoard images ``NAME/image`` at step 0, every ``log_every`` steps
and the last (TensorBoard's step slider shows the image forming), loss curves ``loss/*`` (per image)
and the HParams; ``images/NAME.png`` (the final images, and ``images/grid.png`` for a batch, each
image labelled with its name); ``results.json`` with per-image metrics, their means, the loss at the
first and last step, and timings; ``results.csv``, one row per image. With ``image_checkpoint=true``
also ``checkpoints/image.ckpt``: Lightning's checkpoint of the image's parameters and the optimizer's
state when the fit ends, to resume from (not the network's weights: ~3.5 MB for a batch of eight
224-px images with Adam, twice the images' float32 size plus the optimizer's). A diverged loss stops
the run with a clear error after writing all of that, its status ``failed``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vizkit.core import interrupt, pictures
from vizkit.core.data import Sample, unique_names
from vizkit.core.errors import ConfigError, VizkitError
from vizkit.methods.base import OptimizationMethod
from vizkit.optimize.loop import frozen, join_histories
from vizkit.output.writer import RunWriter
from vizkit.run.family import FamilyRun, Summary, flat_row
from vizkit.run.settings import TrainerConfig
from vizkit.run.trainer import make_trainer

log = logging.getLogger("vizkit")

GRID = "grid"  # images/grid.png: the batch side by side; an input called grid becomes grid_2
MAX_START_IMAGES = 256  # an optimization's images are one batch: a data set's worth is a mistake, said before decoding


class OptimizationRun(FamilyRun):
    method_base = OptimizationMethod

    def prepare(self) -> None:
        method, settings = self.method, self.settings
        model = self.load_model()
        if int(settings.trainer.devices or 1) != 1:
            raise ConfigError(f"{method.name} optimizes one batch of images on one device; use trainer.devices=1")
        method.check(model)
        self.clock.mark("loaded")
        images, samples = None, []
        if method.needs_images:
            inputs = settings.data.open(self.model_data)
            if len(inputs) > MAX_START_IMAGES:  # checked before anything is decoded
                raise ConfigError(f"{method.name} optimizes its starting images together, as one batch in memory; data= names {len(inputs)} "
                                  f"of them (at most {MAX_START_IMAGES}): choose fewer, e.g. data=shapes data.count=8 or data.paths=[...]")
            samples = [inputs.load(index) for index in range(len(inputs))]
            images = torch.stack([sample.pixels for sample in samples])
        target = settings.target
        if str(target) == "predicted":  # nothing to predict: the method's own default, if it has one
            target = method.default_target_for(self.model)
        self.target = target
        self.problems = method.problems(model, target, images)
        names = unique_names([_shown_name(name, origin, samples) for problem in self.problems
                              for name, origin in zip(problem.names, problem.origins or [None] * len(problem.names))], reserved=[GRID])
        self.sources: list[Sample | None] = []
        for problem in self.problems:  # input3@layer2 -> cat@layer2
            self.sources += [samples[row] for row, _ in problem.origins] if problem.origins is not None else [None] * len(problem.names)
            problem.names, names = names[:len(problem.names)], names[len(problem.names):]
        self.clock.mark("read")
        count = sum(len(problem.names) for problem in self.problems)
        log.info("%s: optimizing %d image(s)%s, about %.0f MiB at a time", method.name, count,
                 f" in {len(self.problems)} chunks of up to {len(self.problems[0].names)}" if len(self.problems) > 1 else " together",
                 max(getattr(problem, "memory_bytes", 0) for problem in self.problems) / 2**20)

    def execute(self) -> bool:
        self.tasks, self.done = [], []
        chunked = len(self.problems) > 1
        for index, problem in enumerate(self.problems):
            chunk = index if chunked else None
            self.trainer, self.logger = optimization_trainer(self.method, self.settings.trainer, self.run_dir, chunk,
                                                             checkpoint=bool(self.settings.image_checkpoint))
            self.writer = self.writer or RunWriter(self.run_dir, self.logger.experiment)
            self.tasks.append(fit_problem(self.trainer, self.method, self.model, problem, self.writer, chunk))
            self.done.append(problem)
            if self.tasks[-1].stopped is not None or interrupt.received() is not None:
                break  # a diverged loss or a signal: the chunks not started are left out
        self.clock.mark("computed")
        return True

    def summarize(self) -> Summary:
        done, clock = self.done, self.clock
        with torch.no_grad(), frozen(self.model):
            final = torch.cat([problem.pixels().detach().float().cpu() for problem in done])
            measured = [{name: values.detach().float().cpu() for name, values in problem.measure().items()} for problem in done]
            metrics = {name: torch.cat([part[name] for part in measured]) for name in measured[0]}
        names = [name for problem in done for name in problem.names]
        history = join_histories([task.history for task in self.tasks])
        stopped = next((task.stopped for task in self.tasks if task.stopped is not None), None)
        records = []
        for row, name in enumerate(names):
            source = self.sources[row]
            records.append({"name": name, "png": self.writer.save_picture(name, pictures.to_uint8(final[row])),
                            "source": source.source if source is not None else None,
                            "metrics": {key: float(values[row]) for key, values in metrics.items()}})
        if len(records) > 1:
            self.writer.save_picture(GRID, pictures.grid([pictures.to_uint8(image) for image in final], done[0].grid_columns, labels=names))
        summary = {name: float(values.mean()) for name, values in metrics.items()}
        for name, values in history.losses.items():
            if values:
                summary[f"loss_{name}_first"], summary[f"loss_{name}_last"] = values[0], values[-1]
        steps_done = len(history.steps)
        return Summary(
            target=self.target,
            fields={"images": records, "metrics": summary, "history": {"steps": history.steps, **history.losses},
                    "chunks": len(done), "stopped": stopped},
            metrics=summary,
            timings={"model_load_seconds": clock.between("started", "loaded"), "data_seconds": clock.between("loaded", "read"),
                     "fit_seconds": clock.between("read", "computed"), "steps": steps_done,
                     "seconds_per_step": clock.between("read", "computed") / max(steps_done, 1)},
            hparams={"target": str(self.target), "images": len(records)},  # the target used
            rows=[flat_row(record) for record in records],
            stopped=None if stopped is None else VizkitError(f"{self.method.name} stopped: {stopped}. What was logged up to then is kept in {self.run_dir}"),
        )

    @staticmethod
    def report(results: dict[str, Any]) -> str:
        return f"{results['method']['name']}: {len(results['images'])} image(s), {results['timings']['steps']} steps, {results['device']}"


def optimization_trainer(method: OptimizationMethod, config: TrainerConfig, run_dir: Path, chunk: int | None = None, checkpoint: bool = False):
    """The Trainer of one fit: ``steps`` optimizer steps, loss curves every few steps (each logged step
    costs ~1-2 ms); with ``checkpoint``, a checkpoint of the image (its parameters and the optimizer's
    state, not the network's weights) when the fit ends (the whole fit is one epoch):
    ``checkpoints/image.ckpt``, or ``image-K.ckpt`` for chunk K. Returns (trainer, logger)."""
    if not checkpoint:
        return make_trainer(config, run_dir, log_every_n_steps=min(method.config.log_every, 8), max_steps=method.config.steps)
    from pytorch_lightning.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="image" if chunk is None else f"image-{chunk}", every_n_epochs=1,
                            save_on_train_epoch_end=True, save_top_k=1, enable_version_counter=False)
    return make_trainer(config, run_dir, log_every_n_steps=min(method.config.log_every, 8), max_steps=method.config.steps,
                        enable_checkpointing=True, callbacks=[saver])


def fit_problem(trainer: Any, method: OptimizationMethod, model: torch.nn.Module, problem: Any, writer: RunWriter, chunk: int | None = None):
    """``problem`` fitted by ``trainer``, its images to ``writer`` at step 0, every ``log_every`` and the
    last; ``chunk``: its number when the batch runs in chunks (loss curves ``loss/NAME/chunkK``).
    Returns the ``OptimizationTask`` (its ``history``, and ``stopped``: why it stopped early, or None)."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from vizkit.run.fit import OptimizationTask, step_loader

    task = OptimizationTask(problem, method.config, lambda step, pixels: writer.add_image_batch(problem.names, pixels, step),
                            suffix="" if chunk is None else f"/chunk{chunk}")
    with frozen(model):
        try:
            trainer.fit(task, train_dataloaders=step_loader(method.config.steps))
        except SIGTERMException:  # Lightning's own reaction to SIGTERM, after the step we stopped at and its checkpoint
            pass
    return task


def _shown_name(name: str, origin: tuple[int, str] | None, samples: list[Sample]) -> str:
    """The input's own name in place of ``input{row}``: ``cat`` or ``cat@layer2``."""
    if origin is None or origin[0] >= len(samples):
        return name
    row, part = origin
    return samples[row].name + (f"@{part}" if part else "")
