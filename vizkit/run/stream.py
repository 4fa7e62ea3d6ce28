"""Streaming a run's inputs through ``Trainer.predict``, written out batch by batch.

A data-set run cannot keep its results in memory until the end: 50,000 attribution maps are ~10 GB.
So the inputs are decoded by the DataLoader (``vizkit.core.data.input_loader``), a task's ``predict_step``
turns a batch into tensors, and on every device ``consume`` turns those into pictures on disk and a
small record per input as soon as the batch is done; Lightning keeps no predictions
(``return_predictions=False``). When the scan ends the records (plain data) are gathered on rank 0,
which writes the run's summary.

Inputs that cannot be read are left out of their batch by ``collate``; each is reported by path as
it is met and counted at the end, and the run goes on.
"""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vizkit.core import interrupt
from vizkit.core.data import DataConfig, Inputs, input_loader
from vizkit.core.errors import VizkitError
from vizkit.output.writer import RunWriter
from vizkit.run.settings import TrainerConfig
from vizkit.run.trainer import collect_on_rank_zero, make_trainer

log = logging.getLogger("vizkit")

# (this device's writer, a task's predict_step output) -> {input index: its record}
Consume = Callable[[RunWriter, dict[str, Any]], dict[int, dict[str, Any]]]
# batches whose writing may lag behind the model: bounds the memory the queue holds
PENDING_BATCHES = 2


@dataclass
class Streamed:
    """What a streamed run leaves for rank 0 to summarize (the other ranks of a multi-device run get
    ``on_rank_zero`` false and no records: rank 0 writes everything)."""

    trainer: Any
    logger: Any
    writer: RunWriter
    on_rank_zero: bool = True
    records: list[dict[str, Any]] = field(default_factory=list)  # in input order, the skipped left out
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"source", "error"}, in input order
    states: list[Any] = field(default_factory=list)  # every rank's ``rank_state()``, in rank order, on rank 0's device


def _consumer(consume: Consume | None, inputs: Inputs, run_dir: Path, render: Any = None):
    import pytorch_lightning as pl

    class Consumer(pl.Callback):
        """Per batch, on every device: report the unreadable inputs, ``consume`` the rest in a writer
        thread, so that encoding a batch's pictures (zlib and numpy release the GIL) overlaps the
        model's work on the next; at most ``PENDING_BATCHES`` wait, in order."""

        def __init__(self) -> None:
            self.records: dict[int, dict[str, Any]] = {}
            self.skipped: list[tuple[int, str]] = []
            self.writer: RunWriter | None = None
            self.pending: deque[Future] = deque()
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vizkit-writer")

        def drain(self, keep: int = 0) -> None:
            while len(self.pending) > keep:
                self.records.update(self.pending.popleft().result())  # a writing error surfaces here

        def on_predict_start(self, trainer, pl_module) -> None:
            logger = trainer.logger
            self.writer = RunWriter(run_dir, logger.experiment, log_dir=Path(logger.log_dir), rank=trainer.global_rank, render=render)

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            for index, error in batch["skipped"]:
                log.warning("skipping %s: %s", inputs.entries[index].source, error)
                self.skipped.append((index, error))
            if consume is not None and batch["pixels"] is not None:
                self.pending.append(self.pool.submit(consume, self.writer, outputs))
                self.drain(keep=PENDING_BATCHES)
            interrupt.check()  # SIGINT/SIGTERM: this batch was the last

        def close(self) -> None:
            try:
                self.drain()
            finally:
                self.pool.shutdown(wait=True)

    return Consumer()


def stream(trainer_config: TrainerConfig, data: DataConfig, run_dir: Path, task: Any, inputs: Inputs, method_name: str,
           consume: Consume | None = None, rank_state: Callable[[], Any] | None = None, render: Any = None) -> Streamed:
    """``task`` over the inputs by the Trainer ``trainer_config`` asks for, read as ``data`` says, ``consume`` per batch on every
    device with that device's RunWriter. Returns the ``Streamed`` run, on rank 0 with every rank's
    records, every rank's ``rank_state()`` (a scan's state: plain data and tensors) and its writer
    ready for the run's summary (drawing maps as ``render``, a ``vizkit.core.pictures.Render``, says; ``method_name``
    names the progress bar);
    raises when no input could be read. Everything crosses ranks in one
    exchange, after which the ranks need each other no more (rank 0 may then raise alone)."""
    consumer = _consumer(consume, inputs, run_dir, render)
    trainer, logger = make_trainer(trainer_config, run_dir, callbacks=[consumer], label=method_name)
    loader = input_loader(data, inputs, str(trainer_config.accelerator))
    try:
        trainer.predict(task, dataloaders=loader, return_predictions=False)
    except interrupt.RunInterrupted:
        pass  # a signal: what finished is written below, as any run's
    finally:
        consumer.close()
    writer = consumer.writer
    writer.end_rank()  # before the gather's barrier: rank 0 then adopts the closed archives
    mine = {"records": consumer.records, "skipped": consumer.skipped, "state": rank_state() if rank_state is not None else None}
    rank_zero_only = interrupt.received() is not None and trainer.world_size > 1
    if rank_zero_only:
        # the other ranks may not have been signalled: no barrier that could wait for them forever;
        # each rank's pictures are on disk, rank 0 summarizes its own inputs
        ranks = [mine] if trainer.global_rank == 0 else None
    else:
        ranks = collect_on_rank_zero(trainer, mine, run_dir, "stream", map_location=trainer.strategy.root_device)
    if ranks is None:
        return Streamed(trainer, logger, writer, on_rank_zero=False)
    if rank_zero_only:
        log.warning("interrupted: results.json summarizes rank 0's inputs only; every rank's pictures are in images/")
    else:
        writer.adopt_rank_maps(trainer.world_size)
    records = {index: record for rank in ranks for index, record in rank["records"].items()}
    skipped = sorted(item for rank in ranks for item in rank["skipped"])
    if skipped and len(skipped) == len(inputs) and interrupt.received() is None:
        first_index, first_error = skipped[0]
        raise VizkitError(f"none of the {len(inputs)} input(s) could be read; the first: {first_error}")
    if skipped:
        log.warning("skipped %d unreadable input(s) of %d; results.json lists them under 'skipped'", len(skipped), len(inputs))
    return Streamed(trainer, logger, writer, records=[records[index] for index in sorted(records)],
                    skipped=[{"source": inputs.entries[index].source, "error": error} for index, error in skipped],
                    states=[rank["state"] for rank in ranks])
