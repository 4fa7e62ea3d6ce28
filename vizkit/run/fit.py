"""A ``Problem`` as a Lightning ``fit``: the image's parameters are the only ones it trains.

Lightning owns the device, precision, progress bar and the loss scalars (``log_every_n_steps``); the
images at chosen steps go to TensorBoard through ``on_images``. The scalars ``loss/*`` and the
``history`` are per image (``Problem.per_image``: the total a mean over the images, as the parts);
the optimizer minimizes the problem's own total. ``loss/total`` also shows on the progress bar
(``vizkit.run.progress``). The network stays frozen and in eval mode (Lightning would put the whole
module in train mode: BatchNorm on a single image then fails). A diverged loss ends the fit after
the step that diverged; ``stopped`` says why.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from vizkit.core import interrupt
from vizkit.optimize.loop import History
from vizkit.optimize.problem import Diverged, OptimizationConfig, Problem, make_optimizer


class _Steps(Dataset):
    """One item per optimizer step: the fit's only "data" is the step count."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> int:
        return index


def step_loader(steps: int) -> DataLoader:
    return DataLoader(_Steps(steps), batch_size=None, shuffle=False)


class OptimizationTask(pl.LightningModule):
    def __init__(self, problem: Problem, config: OptimizationConfig, on_images: Callable[[int, torch.Tensor], None], suffix: str = "") -> None:
        super().__init__()
        self.suffix = suffix  # "/chunkK" when a batch runs in chunks: loss/total/chunkK, ...
        self.problem = problem
        self.config = config
        self.on_images = on_images
        self.history = History(images=len(problem.names))
        self.stopped: str | None = None

    @property
    def progress_label(self) -> str:
        """What the progress bar (``vizkit.run.progress``) calls a step of this fit."""
        return f"chunk {self.suffix.removeprefix('/chunk')} step" if self.suffix else "step"

    def train(self, mode: bool = True) -> "OptimizationTask":
        super().train(mode)
        self.problem.model.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the image is what was trained; the frozen network's weights are the user's model file
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("problem.image.")}

    def configure_optimizers(self):
        return make_optimizer(self.config.optimizer, self.problem.trainable(), self.config.lr)

    def on_train_start(self) -> None:
        self._log_images(0)

    def training_step(self, batch, batch_idx):
        step = batch_idx + 1
        try:
            total, parts = self.problem.loss(step, self.config.max_loss)
        except Diverged as error:
            self.stopped = str(error)
            self.trainer.should_stop = True
            return None  # Lightning skips the backward and the optimizer step
        shown, shown_parts = self.problem.per_image(total, parts)
        self.history.add(step, shown, shown_parts)
        self.log(f"loss/total{self.suffix}", shown, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        self.log_dict({f"loss/{k}{self.suffix}": v for k, v in shown_parts.items()}, on_step=True, on_epoch=False, prog_bar=False, batch_size=1)
        return total

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.stopped is not None:
            return
        step = batch_idx + 1
        self.problem.after_step(step)
        stopping = interrupt.received() is not None  # SIGINT/SIGTERM: this step was the last
        if step % self.config.log_every == 0 or step == self.config.steps or stopping:
            self._log_images(step)
        if stopping:
            self.trainer.should_stop = True
            # the image's checkpoint now: on SIGTERM Lightning leaves the fit before the epoch's end, where it saves one
            saver = self.trainer.checkpoint_callback
            if saver is not None and saver.dirpath is not None:
                self.trainer.save_checkpoint(str(Path(saver.dirpath) / f"{saver.filename}{saver.FILE_EXTENSION}"))

    @torch.no_grad()
    def _log_images(self, step: int) -> None:
        self.on_images(step, self.problem.pixels().detach().float().cpu())
