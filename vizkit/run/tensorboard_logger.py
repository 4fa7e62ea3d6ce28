"""The run's TensorBoard logger: Lightning's, less two things vizkit does not want in a run's log."""
from __future__ import annotations

from typing import Any, Mapping

from lightning_fabric.loggers.tensorboard import TensorBoardLogger as FabricTensorBoardLogger
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only


class RunLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger without its ``epoch`` scalar (Lightning adds one to every logged
    step; an optimization's single epoch is noise beside its loss curves) and without its
    ``hparams.yaml`` (Lightning writes ``{}`` there, the hparams it was given; the run writes that file
    itself, with the run's own, when it ends)."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        super().log_metrics({name: value for name, value in metrics.items() if name != "epoch"}, step)

    @rank_zero_only
    def save(self) -> None:
        FabricTensorBoardLogger.save(self)  # the events flushed; Lightning's own save would add hparams.yaml
