"""Running a ``Problem``: the frozen-model guard and the plain torch loop (Python users; the
``vizkit`` command runs the same problem under Lightning, ``vizkit.run.fit``)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from vizkit.core.hooks import evaluating
from vizkit.optimize.problem import Diverged, OptimizationConfig, Problem, closure_for, make_optimizer


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """The model in eval mode with no parameter asking for a gradient, for the duration: autograd
    then computes the image's gradient only (lucent computes every weight's), and BatchNorm uses its
    running statistics. Flags and mode are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        with evaluating(model):
            yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@dataclass
class History:
    """The loss and its parts at every step (the last evaluation of each step), per image as
    ``Problem.per_image`` reports them: ``total`` the mean of the images' losses, each part a mean over
    the images; a batch of one image and a batch of its copies read the same. ``images``: how many
    images the numbers are over (what a chunk weighs when chunks are joined)."""

    steps: list[int] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)
    images: int = 1

    def add(self, step: int, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        if self.steps and self.steps[-1] == step:  # L-BFGS evaluated this step again
            for values in self.losses.values():
                values.pop()
            self.steps.pop()
        self.steps.append(step)
        for name, value in {"total": total, **parts}.items():
            self.losses.setdefault(name, []).append(float(value.detach()))

    def first_and_last(self, name: str) -> tuple[float, float]:
        values = self.losses[name]
        return values[0], values[-1]


@dataclass
class Optimized:
    """What ``OptimizationMethod.optimize`` returns."""

    images: torch.Tensor  # [B,3,H,W] pixels in [0, 1], detached
    names: list[str]
    metrics: dict[str, torch.Tensor]  # name -> [B]
    history: History
    stopped: str | None = None  # why the run stopped early (a diverged loss), else None


def join(parts: list[Optimized]) -> Optimized:
    """The results of a batch optimized in chunks, as one: images, names and metrics in order, the loss
    histories joined (``join_histories``), ``stopped`` the first chunk's reason, if any."""
    if len(parts) == 1:
        return parts[0]
    return Optimized(
        images=torch.cat([part.images for part in parts]),
        names=[name for part in parts for name in part.names],
        metrics={key: torch.cat([part.metrics[key] for part in parts]) for key in parts[0].metrics},
        history=join_histories([part.history for part in parts]),
        stopped=next((part.stopped for part in parts if part.stopped), None),
    )


def join_histories(histories: list[History]) -> History:
    """The chunks' loss histories as one, up to the shortest chunk: at each step the mean of the chunks'
    numbers weighted by their images (each is a mean over its chunk's images), what one batch of them
    all would report."""
    if len(histories) == 1:
        return histories[0]
    weights = [history.images for history in histories]
    joined = History(images=sum(weights))
    steps = min(len(history.steps) for history in histories)
    joined.steps = histories[0].steps[:steps]
    for name in histories[0].losses:
        columns = [history.losses[name][:steps] for history in histories]
        joined.losses[name] = [sum(weight * value for weight, value in zip(weights, values)) / joined.images for values in zip(*columns)]
    return joined


def run_steps(problem: Problem, config: OptimizationConfig, on_step: Callable[[int, Problem], None] | None = None) -> Optimized:
    """``config.steps`` optimizer steps on ``problem`` in plain torch. A diverged loss ends the loop
    early with the images as they were; ``stopped`` says why."""
    history = History(images=len(problem.names))
    optimizer = make_optimizer(config.optimizer, problem.trainable(), config.lr)
    stopped = None

    def record(step: int) -> Callable:
        return lambda total, parts: history.add(step, *problem.per_image(total, parts))

    with frozen(problem.model):
        if on_step is not None:
            on_step(0, problem)
        for step in range(1, config.steps + 1):
            try:
                optimizer.step(closure_for(problem, optimizer, step, config.max_loss, record(step)))
            except Diverged as error:
                stopped = str(error)
                break
            problem.after_step(step)
            if on_step is not None:
                on_step(step, problem)
        with torch.no_grad():
            images = problem.pixels().detach().float()
        metrics = problem.measure()
    return Optimized(images, problem.names, {k: v.detach().float() for k, v in metrics.items()}, history, stopped)
