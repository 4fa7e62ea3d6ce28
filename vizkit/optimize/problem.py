"""One image optimization, as a module whose only trainable parameters are the image's.

A method builds a ``Problem`` (see ``OptimizationMethod.setup``): the frozen model, an image
parameterization, and a ``loss(step)``. The same problem runs under a plain torch loop
(``vizkit.optimize.loop.run_steps``, for Python users) or a Lightning ``fit``
(``vizkit.run.fit``, for the ``vizkit`` command): both build the optimizer with
``make_optimizer``, call ``loss`` through ``closure`` (L-BFGS re-evaluates it), and ``after_step``
once per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vizkit.core.errors import ConfigError, VizkitError
from vizkit.core.models import accepted_input_size
from vizkit.optimize.parameterization import ImageParameterization
from vizkit.core.pixels import PixelSpace

OPTIMIZERS = ("adam", "lbfgs", "sgd")


@dataclass
class OptimizationConfig:
    """Fields every optimization method shares; a method's Config subclasses this."""

    steps: int = 256
    lr: float = 0.05
    optimizer: str = "adam"  # adam | lbfgs | sgd
    log_every: int = 32  # images to TensorBoard every this many steps (and at the first and last)
    seed: int = 0  # the image's initialization and the random transforms; the global RNG is untouched
    max_loss: float = 1e12  # a |loss| above this (or a NaN) stops the run: the optimization diverged
    chunk_size: int = 0  # images optimized together at most, one chunk after the other (0: as many as fit in memory)

    def __post_init__(self) -> None:
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 0:
            raise ConfigError(f"chunk_size must be a whole number >= 0 (0: as many images as fit in memory), got {self.chunk_size!r}")
        for name in ("steps", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'")


def resized_to(pixels: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Pixels at ``size`` (the model's, ``accepted_input_size``; None: as they are): bilinear,
    differentiable, antialiased when it shrinks."""
    if size is None or tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    shrink = pixels.shape[-2] > size[0] or pixels.shape[-1] > size[1]
    return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=shrink)


class Diverged(VizkitError):
    """The loss became NaN/inf or exploded; what was logged so far is kept."""


class Problem(nn.Module):
    """The image, the frozen model and the loss. Subclasses implement ``compute_loss``; ``measure``
    and ``after_step`` are optional. ``names``: one per image, for tags and file names;
    ``grid_columns``: how a run lays a batch out in ``images/grid.png`` (None: about square)."""

    grid_columns: int | None = None
    # what ``compute_loss``'s total is over the batch: the "sum" of the images' losses (each image's
    # gradient is then its own loss's, whatever the batch) or their "mean" (a total with a term of the
    # whole batch: feature_viz's diversity); ``per_image`` reads it
    total_over_batch: str = "sum"
    # for a method that starts from input images: each image's (input row, part), the part naming what
    # of the input it shows beyond the input itself ("" for one image per input; inversion: the layer)
    origins: list[tuple[int, str]] | None = None

    def __init__(self, model: nn.Module, image: ImageParameterization, pixels: PixelSpace, names: list[str]) -> None:
        super().__init__()
        if len(names) != image.batch:
            raise ValueError(f"{len(names)} names for {image.batch} images")
        self.model = model
        self.image = image
        self.names = list(names)
        self.register_buffer("mean", pixels.mean.float().reshape(1, -1, 1, 1).clone())
        self.register_buffer("std", pixels.std.float().reshape(1, -1, 1, 1).clone())

    def from_inputs(self, origins: list[tuple[int, str]]) -> "Problem":
        """Name the images after the inputs they start from: ``input{row}`` or ``input{row}@{part}``
        (a run shows the input's own name in place of ``input{row}``)."""
        if len(origins) != len(self.names):
            raise ValueError(f"{len(origins)} origins for {len(self.names)} images")
        self.origins = [(int(row), str(part)) for row, part in origins]
        self.names = [f"input{row}" + (f"@{part}" if part else "") for row, part in self.origins]
        return self

    def trainable(self) -> list[nn.Parameter]:
        return list(self.image.parameters())

    def pixels(self) -> torch.Tensor:
        """The images now, pixels in [0, 1], [B,3,H,W]."""
        return self.image()

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """What the model sees of pixels: normalized and, for a model that takes one input size only (a
        ViT, Swin, MaxViT: timm's ``fixed_input_size``) or multiples of its patch, resized to the nearest
        it takes after any transform (a jitter, a scale or an octave changes the size; the resize is
        differentiable, antialiased when it shrinks)."""
        return (resized_to(pixels, accepted_input_size(self.model, pixels.shape[-2:])) - self.mean) / self.std

    def compute_loss(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the scalar to minimize, named parts of it as scalars for the loss curves): the total as
        ``total_over_batch`` says, each part a mean over the images (or a number of the whole batch)."""
        raise NotImplementedError

    def per_image(self, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What a run reports of a loss, detached: the total per image (the mean of the images' losses,
        whatever ``total_over_batch``) and the parts as they are (means over the images). The
        optimizer's own loss is ``total`` unchanged: reporting it per image moves no pixel, and a batch of
        copies of one problem reports what one of them does."""
        total = total.detach()
        if self.total_over_batch == "sum":
            total = total / len(self.names)
        return total, {name: value.detach() for name, value in parts.items()}

    def loss(self, step: int, max_loss: float = float("inf")) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``compute_loss``, checked: ``max_loss`` bounds the total the optimizer minimizes (as computed, not
        per image), so a batch stops where it always did."""
        total, parts = self.compute_loss(step)
        value = float(total.detach())
        if not torch.isfinite(total.detach()) or abs(value) > max_loss:
            why = "is not a number" if value != value else ("is infinite" if abs(value) == float("inf") else f"exploded to {value:.3g} (max_loss {max_loss:g})")
            raise Diverged(f"the loss {why} at step {step}: lower method.lr, or raise the regularizers' weights")
        return total, parts

    def after_step(self, step: int) -> None:
        """Between steps (``step`` counts from 1): keep the image valid, apply priors that are not
        penalties (Yosinski's blur and clipping)."""
        self.image.project_()

    @torch.no_grad()
    def measure(self) -> dict[str, torch.Tensor]:
        """Per-image numbers for ``results.json`` once the optimization ends (name -> [B])."""
        return {}


class ProjectedLBFGS(torch.optim.LBFGS):
    """L-BFGS for an image that ``after_step`` projects back into [0, 1] between steps.

    torch's L-BFGS scales its next direction by curvature pairs (s, y) that assume the parameters
    moved only where it moved it. A projection moves them too, and a pair recorded across the jump can
    shrink the direction until the loss changes along it by less than float32 resolves. The strong
    Wolfe line search then fails and returns a step of 0; the next call starts from the same point with
    the same memory and fails the same way, so the run stalls for good. Measured: neural style on the
    embedded model stalled at step 14 of 40 on another CPU (style drop 9.4× instead of 21×); a 1e-6
    relative jitter on the gradients reproduces it here (1 draw in 8). When a step leaves every
    parameter where it was, the memory is dropped and the step is taken again as steepest descent (a
    restart, as L-BFGS-B does after a failed line search).
    """

    def step(self, closure):  # type: ignore[override]
        before = [p.detach().clone() for p in self._params]
        loss = super().step(closure)
        if all(torch.equal(p, b) for p, b in zip(self._params, before)):
            self.state[self._params[0]] = {}
            loss = super().step(closure)
        return loss


def make_optimizer(name: str, parameters: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr)
    if name == "lbfgs":
        # one L-BFGS step is one outer iteration; its line search keeps large lr stable
        return ProjectedLBFGS(parameters, lr=lr, max_iter=1, history_size=50, line_search_fn="strong_wolfe")
    raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{name}'")


def closure_for(problem: Problem, optimizer: torch.optim.Optimizer, step: int, max_loss: float, record: Callable) -> Callable[[], torch.Tensor]:
    """The closure ``optimizer.step`` evaluates (L-BFGS may call it several times per step)."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        total, parts = problem.loss(step, max_loss)
        total.backward()
        record(total, parts)
        return total

    return closure
