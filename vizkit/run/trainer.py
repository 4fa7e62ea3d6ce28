"""The Lightning side of a run: its Trainer, the predict task's base, timing with gradients, and the
one exchange of plain data between the ranks of a multi-device run."""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from vizkit.core.errors import ConfigError
from vizkit.core.pixels import PixelSpace
from vizkit.output.writer import TENSORBOARD_DIR
from vizkit.run.settings import TrainerConfig


def make_trainer(config: TrainerConfig, run_dir: Path, *, label: str | None = None, **settings: Any):
    """The Trainer the settings ask for, logging to ``RUN/tensorboard`` (``vizkit.run.tensorboard_logger``),
    with vizkit's progress bar when ``config.progress_bar`` (``vizkit.run.progress``: passes through the
    model when predicting, called ``label``, e.g. the method's name; steps when fitting); ``settings``:
    more Trainer arguments (an optimization's max_steps, callbacks). Returns (trainer, TensorBoard logger)."""
    import pytorch_lightning as pl

    from vizkit.run.progress import Progress
    from vizkit.run.tensorboard_logger import RunLogger

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning's own use of a deprecated torch API
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # an optimization's frozen network is in eval mode on purpose
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")  # a short optimization logs its last step anyway
    warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")  # the run's own earlier chunks
    # Lightning's tips and device banner go to INFO; vizkit says which device it used itself
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero", "pytorch_lightning.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logger = RunLogger(save_dir=str(run_dir), name=TENSORBOARD_DIR, version="", default_hp_metric=False)
    callbacks = list(settings.pop("callbacks", None) or [])
    if config.progress_bar:  # Lightning refuses a bar among the callbacks when it is told to show none
        callbacks.append(Progress(label))
    try:
        trainer = pl.Trainer(
            accelerator=config.accelerator,
            devices=config.devices,
            strategy=config.strategy,
            precision=config.precision,
            inference_mode=False,  # with torch.enable_grad() in predict_step: gradients inside prediction
            logger=logger,
            enable_model_summary=False,
            enable_progress_bar=bool(config.progress_bar),
            default_root_dir=str(run_dir),
            callbacks=callbacks,
            **{"enable_checkpointing": False, **settings},
        )
    except (ValueError, RuntimeError, TypeError) as error:  # Lightning's own messages are clear
        raise ConfigError(f"trainer: {error}") from None
    return trainer, logger


def pixel_task():
    """The base of the predict tasks: a LightningModule holding the model and its input
    normalization, which ``space(images)`` gives on the batch's device. A task implements
    ``predict_batch(batch)`` for a ``vizkit.core.data.collate`` batch with at least one readable input."""
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
