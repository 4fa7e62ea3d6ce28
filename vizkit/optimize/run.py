"""One optimization run under Hydra: the method's ``Problem`` fitted by a Lightning Trainer.

Writes, in the run directory: TensorBoard images ``METHOD/NAME`` at step 0, every ``log_every`` steps
and the last (TensorBoard's step slider shows the image forming), loss curves ``loss/*`` and the
HParams; ``checkpoints/image.ckpt`` (Lightning's checkpoint of the image's parameters and the
optimizer's state when the fit ends); ``images/NAME.png`` (the final images, and ``images/grid.png`` for a batch); ``results.json``
with per-image metrics, their means, the loss at the first and last step, and timings. A diverged
loss stops the run with a clear error after writing all of that.
"""
from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from vizkit import interrupt, output, render
from vizkit.data import open_inputs, unique_names
from vizkit.errors import ConfigError, VizkitError
from vizkit.methods.base import OptimizationMethod
from vizkit.models import data_config

log = logging.getLogger("vizkit")


def run_optimization(cfg: Any, run_dir: Path, method: OptimizationMethod, model: torch.nn.Module, started: float) -> dict[str, Any]:
    from vizkit.optimize.loop import frozen, join_histories
    from vizkit.runner import method_hparams, run_header

    trainer_cfg = cfg.get("trainer", {})
    if int(trainer_cfg.get("devices", 1) or 1) != 1:
        raise ConfigError(f"{method.name} optimizes one batch of images on one device; use trainer.devices=1")
    method.check(model)
    loaded = time.perf_counter()
    images = None
    samples = []
    if method.needs_images:
        inputs = open_inputs(cfg.data, data_config(model))
        if len(inputs) > MAX_START_IMAGES:  # checked before anything is decoded
            raise ConfigError(f"{method.name} optimizes its starting images together, as one batch in memory; data= names {len(inputs)} "
                              f"of them (at most {MAX_START_IMAGES}): choose fewer, e.g. data=shapes data.count=8 or data.paths=[...]")
        samples = [inputs.load(index) for index in range(len(inputs))]
        images = torch.stack([sample.pixels for sample in samples])
    target = _plain(cfg.get("target", "predicted"))
    if str(target) == "predicted":  # nothing to predict: the method's own default, if it has one
        target = method.default_target
    problems = method.problems(model, target, images)
    names = unique_names([_shown_name(name, samples) for problem in problems for name in problem.names], reserved=[GRID])
    for problem in problems:  # input3@layer2 -> cat@layer2
        sources = [_input_of(name, samples) for name in problem.names]
        problem.sources, problem.names, names = sources, names[:len(problem.names)], names[len(problem.names):]
    read = time.perf_counter()
    count = sum(len(problem.names) for problem in problems)
    log.info("%s: optimizing %d image(s)%s, about %.0f MiB at a time", method.name, count,
             f" in {len(problems)} chunks of up to {len(problems[0].names)}" if len(problems) > 1 else " together",
             max(getattr(problem, "memory_bytes", 0) for problem in problems) / 2**20)

    writer = None
    tasks, done = [], []
    for index, problem in enumerate(problems):
        trainer, logger, task = _fit(cfg, run_dir, method, model, problem, index if len(problems) > 1 else None, writer)
        writer = writer or task.writer
        tasks.append(task)
        done.append(problem)
        if task.stopped is not None or interrupt.received() is not None:
            break  # a diverged loss or a signal: the chunks not started are left out
    fitted = time.perf_counter()

    with torch.no_grad(), frozen(model):
        final = torch.cat([problem.pixels().detach().float().cpu() for problem in done])
        measured = [{name: values.detach().float().cpu() for name, values in problem.measure().items()} for problem in done]
        metrics = {name: torch.cat([part[name] for part in measured]) for name in measured[0]}
    problem_names = [name for problem in done for name in problem.names]
    sources = [source for problem in done for source in problem.sources]
    history = join_histories([task.history for task in tasks])
    stopped = next((task.stopped for task in tasks if task.stopped is not None), None)
    records = []
    for row, name in enumerate(problem_names):
        records.append({"name": name, "png": writer.save_picture(name, render.to_uint8(final[row])),
                        "source": sources[row].source if sources[row] is not None else None,
                        "metrics": {key: float(values[row]) for key, values in metrics.items()}})
    if len(records) > 1:
        writer.save_picture(GRID, render.grid([render.to_uint8(image) for image in final], done[0].grid_columns))
    summary = {name: float(values.mean()) for name, values in metrics.items()}
    for name, values in history.losses.items():
        if values:
            summary[f"loss_{name}_first"], summary[f"loss_{name}_last"] = values[0], values[-1]
    steps_done = len(history.steps)
    timings = {
        "model_load_seconds": loaded - started,
        "data_seconds": read - loaded,
        "fit_seconds": fitted - read,
        "steps": steps_done,
        "seconds_per_step": (fitted - read) / max(steps_done, 1),
    }
    hparams = {**method_hparams(method), "model": str(cfg.model.name), "target": str(target), "images": len(records)}  # the target used
    logger.log_hyperparams(hparams, metrics={f"hparams/{k}": v for k, v in summary.items() if math.isfinite(v)})
    writer.add_scalars({f"metrics/{k}": v for k, v in summary.items() if math.isfinite(v)})
    results = {
        **run_header(method, cfg, target, trainer),
        "images": records,
        "metrics": summary,
        "history": {"steps": history.steps, **history.losses},
        "chunks": len(done),
        "stopped": stopped,
        "timings": {**timings, "write_seconds": time.perf_counter() - fitted, "run_seconds": time.perf_counter() - started},
    }
    writer.finish(results)
    logger.finalize("success" if stopped is None else "failed")
    if stopped is not None:
        raise VizkitError(f"{method.name} stopped: {stopped}. What was logged up to then is kept in {run_dir}")
    return results


def _fit(cfg: Any, run_dir: Path, method: OptimizationMethod, model: torch.nn.Module, problem: Any, chunk: int | None, writer: Any):
    """One problem fitted by a Trainer of its own; ``chunk``: its number when the batch runs in chunks
    (its loss curves are tagged ``loss/NAME/chunkK`` and its checkpoint is ``image-K.ckpt``)."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from vizkit.optimize.lightning import OptimizationTask, step_loader
    from vizkit.optimize.loop import frozen
    from vizkit.runner import _trainer

    # loss curves every few steps (each logged step costs ~1-2 ms), pictures every log_every
    # a checkpoint of the image (its parameters and the optimizer's state, not the network's weights)
    # when the fit ends (the whole fit is one epoch): checkpoints/image.ckpt
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="image" if chunk is None else f"image-{chunk}", every_n_epochs=1,
                                 save_on_train_epoch_end=True, save_top_k=1, enable_version_counter=False)
    trainer, logger = _trainer(cfg.get("trainer", {}), run_dir, log_every_n_steps=min(method.config.log_every, 8), max_steps=method.config.steps,
                               enable_checkpointing=True, callbacks=[checkpoint])
    writer = writer or output.RunWriter(run_dir, method.name, logger.experiment)
    task = OptimizationTask(problem, method.config, lambda step, pixels: writer.add_image_batch(problem.names, pixels, step),
                            suffix="" if chunk is None else f"/chunk{chunk}")
    task.writer = writer
    with frozen(model):
        try:
            trainer.fit(task, train_dataloaders=step_loader(method.config.steps))
        except SIGTERMException:  # Lightning's own reaction to SIGTERM, after the step we stopped at and its checkpoint
            pass
    return trainer, logger, task


def _shown_name(name: str, samples: list) -> str:
    sample = _input_of(name, samples)
    return name if sample is None else sample.name + "".join(name.partition("@")[1:])


GRID = "grid"  # images/grid.png: the batch side by side; an input called grid becomes grid_2
MAX_START_IMAGES = 256  # an optimization's images are one batch: a data set's worth is a mistake, said before decoding


def _input_of(name: str, samples: list) -> Any:
    """The input a result called ``input3`` or ``input3@layer2`` came from (how a method that starts
    from images names its results; the run shows the input's own name instead), or None."""
    match = re.fullmatch(r"input(\d+)(@.*)?", name)
    return samples[int(match.group(1))] if match is not None and int(match.group(1)) < len(samples) else None


def _plain(value: Any) -> Any:
    """OmegaConf lists and dicts as Python ones."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
