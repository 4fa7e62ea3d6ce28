"""The console's progress bar, in the units that take time, on stderr (Lightning's own writes to stdout,
where vizkit prints its report).

- Predicting (attribution, adversarial, inspection scans), the bar counts the images that go through
  the model, not the batches: one batch of occlusion or integrated gradients is hundreds of passes and
  minutes, and a batch count sits at ``0/1`` all that time. A forward hook on the task's ``model`` adds
  each call's batch size; a deep copy of the model (a metric's randomized one) keeps the hook, so its
  passes count too. The total is unknown until the first batch ends, then estimated at each batch end
  from the passes an input has taken so far; the postfix says ``inputs k/N``.
- Fitting (an optimization), ``step 120/500`` (``chunk K step`` for a chunk of a batch run in chunks),
  the per-image loss in the postfix, where Lightning would show ``Epoch 0/-2``.

Both redraw at most every ``REFRESH_SECONDS`` (and at the end): the hook itself only adds an integer
and reads the clock.
"""
from __future__ import annotations

import sys
import time
from typing import Any

import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm, convert_inf

REFRESH_SECONDS = 0.2
PREDICT_FORMAT = "{desc} {n_fmt}/{total_fmt} passes {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
TRAIN_FORMAT = "{desc} {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


class Progress(TQDMProgressBar):
    """The bar of every Trainer vizkit makes (``make_trainer``). ``label``: what a predict bar is
    called (the method's name); a task's own ``progress_label`` comes first (a fit's ``step``).
    ``passes`` and ``inputs_done`` are the predict counts, ``inputs_total`` this device's inputs."""

    def __init__(self, label: str | None = None) -> None:
        super().__init__()
        self.label = label
        self.passes = 0
        self.inputs_done = 0  # readable or not: the postfix reaches N
        self.inputs_read = 0  # those that went through the model: what the passes are over
        self.inputs_total: int | None = None
        self._hook: Any = None
        self._live = [False]  # the hook's switch: a copy of the model outliving the scan counts no more
        self._next_draw = 0.0

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_hook": None, "_live": [False]}

    def _describe(self, pl_module: Any, default: str) -> str:
        return getattr(pl_module, "progress_label", None) or self.label or default

    # ---------------------------------------------------------------- predict: passes through the model

    def init_predict_tqdm(self) -> Tqdm:
        return Tqdm(desc=self._describe(self.trainer.lightning_module, "predict"), position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stderr, smoothing=0, unit=" passes", bar_format=PREDICT_FORMAT)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_predict_start(trainer, pl_module)
        self.passes = self.inputs_done = self.inputs_read = 0
        self.inputs_total = _inputs_in(trainer)
        self._next_draw = 0.0
        if self.is_disabled:  # another rank's (Lightning shows rank 0's only): no hook at all
            return
        model = getattr(pl_module, "model", None)
        self._live = [True]
        self._hook = (model if isinstance(model, torch.nn.Module) else pl_module).register_forward_hook(self._counter(self._live))

    def _counter(self, live: list[bool]):
        # a plain function, not a bound method: deepcopy keeps a function as it is, but would copy the
        # bar (and its trainer) along with a bound method's self
        def count(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if not live[0]:
                return
            first = args[0] if args else output
            self.passes += int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1
            if time.monotonic() >= self._next_draw:
                self._draw()

        return count

    def _draw(self) -> None:
        bar = self._predict_progress_bar
        if bar is not None and not bar.disable:
            bar.n = self.passes
            bar.refresh()
        self._next_draw = time.monotonic() + REFRESH_SECONDS

    def on_predict_batch_start(self, *_: Any, **__: Any) -> None:
        pass  # Lightning's sets the total to the batch count

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        read, skipped = _inputs_of(batch)
        first = self.inputs_read == 0
        self.inputs_read += read
        self.inputs_done += read + skipped
        bar = self._predict_progress_bar
        if bar is None or bar.disable:
            return
        total = self.inputs_total
        if total is not None and self.inputs_read:
            bar.total = self.passes + round(self.passes / self.inputs_read * max(total - self.inputs_done, 0))
        bar.set_postfix_str(f"inputs {self.inputs_done}/{'?' if total is None else total}", refresh=False)
        if first or time.monotonic() >= self._next_draw:
            self._draw()

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._stop_counting()
        bar = self._predict_progress_bar
        if bar is not None and not bar.disable:
            bar.n = self.passes
            if self.inputs_total is not None and self.inputs_done >= self.inputs_total:
                bar.total = self.passes
        super().on_predict_end(trainer, pl_module)

    def _stop_counting(self) -> None:
        self._live[0] = False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._stop_counting()  # the user's model keeps no hook of ours

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._stop_counting()

    # ---------------------------------------------------------------- fit: optimizer steps

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        total = trainer.max_steps if trainer.max_steps > 0 else convert_inf(self.total_train_batches)
        return Tqdm(desc=self._describe(trainer.lightning_module, "step"), total=total, initial=trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stderr,
                    smoothing=0, unit=" steps", bar_format=TRAIN_FORMAT)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self._next_draw = 0.0

    def on_train_epoch_start(self, *_: Any) -> None:
        pass  # Lightning's restarts the count and calls it "Epoch K": a fit's bar counts steps across epochs

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self._train_progress_bar
        if bar is None or bar.disable:
            return
        if trainer.global_step == bar.total or time.monotonic() >= self._next_draw:
            self._show_step(trainer, pl_module)

    def _show_step(self, trainer: Any, pl_module: Any) -> None:
        bar = self.train_progress_bar
        if bar.disable:
            return
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()
        self._next_draw = time.monotonic() + REFRESH_SECONDS

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.train_progress_bar.n != trainer.global_step:
            self._show_step(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.train_progress_bar.n != trainer.global_step:
            self._show_step(trainer, pl_module)
        super().on_train_end(trainer, pl_module)

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict:
        """Lightning's, ``loss/total`` (a chunk's ``loss/total/chunkK``) shown as ``loss``."""
        return {("loss" if str(key).startswith("loss/total") else key): value for key, value in super().get_metrics(trainer, pl_module).items()}


def _inputs_of(batch: Any) -> tuple[int, int]:
    """(inputs read, inputs skipped) of a batch: a ``vizkit.core.data.collate`` batch, or a tensor or a
    sequence whose first item is one."""
    if isinstance(batch, dict) and "index" in batch:
        return len(batch["index"]), len(batch.get("skipped") or [])
    first = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    return (int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1), 0


def _inputs_in(trainer: Any) -> int | None:
    """This device's inputs: its sampler's length (a distributed run's share), None when unknown."""
    loaders = trainer.predict_dataloaders
    if loaders is None:
        return None
    count = 0
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
        if sampler is None:
            sampler = getattr(loader, "sampler", None)
        try:
            count += len(sampler)
        except TypeError:  # an iterable data set
            return None
    return count
