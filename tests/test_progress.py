"""The console's progress bar and the run's TensorBoard log, on the real Lightning Trainer that
``make_trainer`` builds: a predict bar counts the passes through the model (a many-pass method's one
batch is no longer ``0/1`` for minutes), a fit's reads ``step N/M``; the log holds no ``epoch`` scalar
and no ``hparams.yaml`` of Lightning's; an optimization's losses are reported per image."""
from __future__ import annotations

import copy

import pytorch_lightning as pl
import torch
from conftest import read_events
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vizkit
from vizkit.optimize.loop import History, join_histories, run_steps
from vizkit.run.fit import OptimizationTask, step_loader
from vizkit.run.progress import Progress
from vizkit.run.settings import TrainerConfig
from vizkit.run.trainer import make_trainer

CPU = TrainerConfig(accelerator="cpu", progress_bar=True)
PASSES_PER_INPUT = 3  # two forwards of the model and one of a deep copy, as a metric's randomized model


class ManyPasses(pl.LightningModule):
    """A task shaped as vizkit's (its network under ``model``) whose method costs several forwards per
    input: two on the batch, one on a deep copy of the model. Records, at each batch's start, the bar's
    total then (None until a batch has ended)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        self.totals: list[int | None] = []

    def predict_step(self, batch, batch_idx):
        (images,) = batch
        self.totals.append(self.trainer.progress_bar_callback.predict_progress_bar.total)
        with torch.no_grad():
            self.model(images)
            self.model(images.flip(-1))
            copy.deepcopy(self.model)(images)
        return {}


def test_the_predict_bar_counts_passes_through_the_model(tmp_path, capsys):
    inputs = 5
    loader = DataLoader(TensorDataset(torch.rand(inputs, 3, 8, 8)), batch_size=2)
    task = ManyPasses()
    trainer, _ = make_trainer(CPU, tmp_path, label="many_passes")
    trainer.predict(task, dataloaders=loader, return_predictions=False)
    bar = trainer.progress_bar_callback
    assert isinstance(bar, Progress)
    assert bar.passes == inputs * PASSES_PER_INPUT and bar.inputs_done == bar.inputs_total == inputs
    assert bar.predict_progress_bar.n == bar.predict_progress_bar.total == inputs * PASSES_PER_INPUT
    # unknown during the first batch, then the passes an input took so far times the inputs
    assert task.totals == [None, inputs * PASSES_PER_INPUT, inputs * PASSES_PER_INPUT]
    assert not task.model._forward_hooks  # removed at the end
    shown = capsys.readouterr()
    assert "many_passes 15/15 passes" in shown.err and "inputs 5/5" in shown.err and "passes" not in shown.out


def _fit(tmp_path, problem, steps: int, suffix: str = ""):
    config = vizkit.create_method("class_model", steps=steps).config
    task = OptimizationTask(problem, config, lambda step, pixels: None, suffix=suffix)
    trainer, logger = make_trainer(CPU, tmp_path, max_steps=steps, log_every_n_steps=1)
    trainer.fit(task, train_dataloaders=step_loader(steps))
    return trainer, logger, task


def test_the_fit_bar_counts_steps_and_the_log_holds_no_epoch_nor_hparams_yaml(tmp_path, capsys, embedded):
    problem = vizkit.create_method("class_model", steps=3).problem(embedded, "class:star")
    trainer, logger, task = _fit(tmp_path, problem, 3)
    bar = trainer.progress_bar_callback.train_progress_bar
    assert (bar.desc, bar.n, bar.total) == ("step", 3, 3)
    shown = capsys.readouterr()
    assert "step 3/3" in shown.err and "loss=" in shown.err and "Epoch" not in shown.err + shown.out
    scalars = read_events(logger.log_dir).Tags()["scalars"]
    assert "loss/total" in scalars and "loss/score" in scalars and "epoch" not in scalars
    assert not list(tmp_path.rglob("hparams.yaml"))
    assert [event.value for event in read_events(logger.log_dir).Scalars("loss/total")] == task.history.losses["total"]
    assert OptimizationTask(problem, task.config, lambda *_: None, suffix="/chunk1").progress_label == "chunk 1 step"


def test_losses_are_reported_per_image(embedded, embedded_samples):
    """The optimizer's total sums its images' losses; what is reported is their mean, like the parts:
    a batch of two copies of one problem reports what the problem alone does."""
    for name, fields, one, two in [
        ("class_model", {}, {"target": "class:star"}, {"target": ["class:star", "class:star"]}),
        ("deep_dream", {"octaves": 1}, {"images": embedded_samples[:1]}, {"images": embedded_samples[:1].repeat(2, 1, 1, 1)}),
    ]:
        method = vizkit.create_method(name, steps=2, **fields)
        alone, pair = (run_steps(method.problem(embedded, **fields), method.config).history for fields in (one, two))
        assert alone.losses.keys() == pair.losses.keys() and (alone.images, pair.images) == (1, 2)
        for key in alone.losses:
            torch.testing.assert_close(torch.tensor(pair.losses[key]), torch.tensor(alone.losses[key]), rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def test_chunks_join_as_one_batch_would_report():
    """Per-image numbers of chunks of 2 images and of 1: their mean over the 3 images."""
    big, small = History([1], {"total": [1.0], "score": [3.0]}, images=2), History([1], {"total": [4.0], "score": [0.0]}, images=1)
    joined = join_histories([big, small])
    assert joined.losses == {"total": [2.0], "score": [2.0]} and joined.images == 3
