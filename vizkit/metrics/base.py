"""The metric contract: a number that says how good an attribution map is.

A metric is a class with class attributes and one verb, ``evaluate``:

    name: str            the name users type: ``vizkit metrics=[deletion,pointing_game]``
    description: str     one line
    better: str          "higher" or "lower": which way a summary table ranks it
    needs_masks: bool    True when it compares maps with ground-truth object masks (data=shapes has them)
    needs_class: bool    True when it reads the target class's probability
    Config: type         a ``@dataclass`` of its parameters, each with a default (validated in
                         ``__post_init__`` by raising ``ConfigError``), stored in Hydra's ConfigStore
                         under group ``metrics`` so ``metrics.deletion.steps=64`` is type-checked.

``evaluate(inputs: MetricInputs) -> MetricResult`` gets one batch: the model, its input, the method's
maps, the resolved target, and masks where they exist. It returns one value per input and, for metrics
that are curves (deletion, insertion, randomization), the curve behind it. The runner logs the values
per input and their mean to ``results.json``, as TensorBoard scalars and as HParams metrics.

Like methods, metrics never modify the model (randomization works on copies), batch their own forward
passes (a ``batch_size`` field), and draw randomness from their own seeded ``torch.Generator``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from vizkit.core.configured import Configured, NoConfig
from vizkit.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from vizkit.methods.base import AttributionMethod
    from vizkit.core.pixels import PixelSpace
    from vizkit.core.targets import Target


@dataclass
class MetricInputs:
    """One batch, as a metric sees it."""

    model: "torch.nn.Module"  # eval mode, on x's device; never modify it
    x: "torch.Tensor"  # [B,3,H,W], the model's (normalized) input
    maps: "torch.Tensor"  # [B,1,H,W] (or [B,C,H,W]) float maps the method returned for x
    target: "Target"  # resolved; for a class target, target.indices holds one class per input
    pixels: "PixelSpace"  # converts x to and from pixels in [0, 1]
    method: "AttributionMethod"  # the method that made the maps (randomization runs it again)
    masks: "torch.Tensor | None" = None  # [B,1,H,W] bool object masks, where the data has them


@dataclass
class MetricResult:
    values: "torch.Tensor"  # [B] float: the metric per input
    curve: "torch.Tensor | None" = None  # [B,K]: the curve the value summarizes, if any
    curve_steps: Sequence[Any] = field(default_factory=tuple)  # K labels of the curve's x axis


class Metric(Configured):
    name: ClassVar[str]
    description: ClassVar[str]
    better: ClassVar[str] = "higher"
    needs_masks: ClassVar[bool] = False
    needs_class: ClassVar[bool] = False
    Config: ClassVar[type] = NoConfig

    def evaluate(self, inputs: MetricInputs) -> MetricResult:
        raise NotImplementedError


def positive_int(owner: str, name: str, value: Any) -> None:
    """Config validation shared by metrics: ``value`` must be an int > 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{owner}: {name} must be a positive integer, got {value!r}")
