"""Several targets per input: maps for the top-k classes, or for a list of targets, from shared passes.

Users write a target set as

    top:K                        each input's K most probable classes, most probable first
    [class:3, class:7]           a list of targets (``target=[class:3,class:7]`` on the command line;
                                 any form of ``vizkit.core.targets``: ``[channel:layer4:3, channel:layer4:9]``)

Not to be confused with a list of class indices given to ``attribute`` in Python, which is one class
per *input*; a target set is K targets for *every* input, and ``attribute_targets`` takes it.

A ``TargetSet`` is bound to a model: its column k is an ordinary target (``column(k)``) and
``scores(model, x)`` gives all K scores, ``[B, K]``, from one forward: the logits and every layer a
channel, neuron or layer column reads are captured together. That is what lets a gradient method take
K vector-Jacobian products of one graph, and occlusion or a CAM read K scores off the same passes.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from vizkit.core.errors import ConfigError
from vizkit.core.targets import (ClassTarget, PredictedClassTarget, Target, TargetSpec, is_clean_input, parse_target, resolve_spec,
                                 resolve_target)

SET_FORMS = "top:K, or a list of targets such as [class:3,class:7]"


def parse_target_set(value: Any) -> tuple[TargetSpec, ...] | int | None:
    """``top:K`` -> K; a list (or tuple) of target strings -> their specs; anything else (one target) -> None."""
    if isinstance(value, str):
        kind, _, rest = value.strip().partition(":")
        if kind.lower() != "top":
            return None
        if not rest.strip().isdigit() or int(rest) < 1:
            raise ConfigError(f"cannot read target '{value}': top:K needs a whole number K >= 1 (top:5)")
        return int(rest)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"an empty target list; give {SET_FORMS}")
        specs = []
        for item in value:
            if not isinstance(item, str) or item.strip().lower().startswith("top:"):
                raise ConfigError(f"a target list holds target strings such as class:3 or channel:layer4:7, got {item!r}; "
                                  f"top:K stands alone (target=top:5)")
            specs.append(parse_target(item))
        texts = [str(spec) for spec in specs]
        repeated = sorted({text for text in texts if texts.count(text) > 1})
        if repeated:
            raise ConfigError(f"target list names {', '.join(repeated)} more than once")
        return tuple(specs)
    return None


def is_target_set(value: Any) -> bool:
    """Whether ``value`` asks for several targets per input: ``top:K``, or a list holding target strings (a
    list of numbers is one class per input)."""
    if isinstance(value, str):
        return value.strip().lower().startswith("top:")
    return isinstance(value, TargetSet) or (isinstance(value, (list, tuple)) and any(isinstance(item, str) for item in value))


class TargetSet:
    """K targets for every input of a batch; ``column(k)`` is target k as an ordinary target."""

    kind = "set"

    def __init__(self, columns: Sequence[Target], labels: Sequence[str]) -> None:
        self._columns = list(columns)
        self.labels = list(labels)  # what each column is called in file names and tags: class_3, channel_layer4_7

    def __len__(self) -> int:
        return len(self._columns)

    def column(self, k: int) -> Target:
        return self._columns[k]

    def columns(self) -> list[Target]:
        return list(self._columns)

    @property
    def kinds(self) -> set[str]:
        return {column.kind for column in self._columns}

    def class_indices(self) -> torch.Tensor:
        """``[B, K]``: every column's class per input (all columns are class targets)."""
        return torch.stack([column.indices for column in self.columns()], 1)

    def take(self, rows: torch.Tensor) -> "TargetSet":
        return TargetSet([column.take(rows) for column in self.columns()], self.labels)

    def to(self, device: Any) -> "TargetSet":
        return TargetSet([column.to(device) if column.kind == "class" else column for column in self.columns()], self.labels)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's logits on x, checked against every column (class columns only)."""
        logits = model(x)
        self._record(model, x, logits)
        for column in self._columns:
            column._checked(logits)
        return logits

    def select(self, logits_or_probs: torch.Tensor) -> torch.Tensor:
        """``[B, K]``: each class column's entry of ``[B, classes]``."""
        return logits_or_probs.gather(1, self.class_indices().to(logits_or_probs.device))

    def _record(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> None:
        """A predicted column reads its classes from this forward when it runs on the clean input."""
        for column in self._columns:
            if isinstance(column, PredictedClassTarget) and column._indices is None and column._is_clean_input(model, x):
                column._record(logits)

    def scores(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``[B, K]``, differentiable: every column's score from one forward."""
        from vizkit.core.hooks import layer_outputs

        layers = {column.layer: column.module for column in self._columns if column.kind != "class"}
        classes = any(column.kind == "class" for column in self._columns)
        logits, outputs = layer_outputs(model, x, layers, logits=classes) if layers else (model(x), {})
        if classes:
            self._record(model, x, logits)
        return torch.stack([_score_from(column, logits, outputs, model, x) for column in self._columns], 1)

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.scores(model, x)

    def __str__(self) -> str:
        return "[" + ",".join(str(column) for column in self._columns) + "]"


class TopClasses(TargetSet):
    """Each input's K most probable classes, most probable first, read from the first forward a method
    makes on the clean input (no pass of its own, as the default target ``predicted``)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, k: int) -> None:
        self.k, self._model, self._x = k, model, x
        self._indices: torch.Tensor | None = None
        self.clean_logits: torch.Tensor | None = None
        self.labels = [f"top{rank + 1}" for rank in range(k)]

    def __len__(self) -> int:
        return self.k

    @property
    def kinds(self) -> set[str]:  # known before the classes are
        return {"class"}

    @property
    def _columns(self) -> list[Target]:  # type: ignore[override]
        return [ClassTarget(index) for index in self.indices.unbind(1)]

    @property
    def indices(self) -> torch.Tensor:
        """``[B, K]`` class indices."""
        if self._indices is None:
            with torch.no_grad():
                self._remember(self._model(self._x))
        return self._indices

    def class_indices(self) -> torch.Tensor:
        return self.indices

    def _remember(self, logits: torch.Tensor) -> None:
        if logits.dim() != 2:
            raise ConfigError(f"top:{self.k} needs a model that outputs [B, classes] logits, got shape {tuple(logits.shape)}")
        if self.k > logits.shape[1]:
            raise ConfigError(f"top:{self.k} asks for more classes than the model has ({logits.shape[1]})")
        self.clean_logits = logits.detach()
        self._indices = logits.detach().topk(self.k, 1).indices

    def _record(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> None:
        if self._indices is None and is_clean_input(model, x, self._model, self._x):
            self._remember(logits)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        self._record(model, x, logits)
        return logits

    def scores(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(model, x)
        return logits.gather(1, self.indices.to(logits.device))

    def take(self, rows: torch.Tensor) -> TargetSet:
        taken = self.indices[rows.to(self.indices.device)]
        return TargetSet([ClassTarget(index) for index in taken.unbind(1)], self.labels)

    def to(self, device: Any) -> TargetSet:
        return self if self._x.device == torch.device(device) else TargetSet([ClassTarget(i.to(device)) for i in self.indices.unbind(1)], self.labels)

    def __str__(self) -> str:
        return f"top:{self.k}"


def _score_from(column: Target, logits: torch.Tensor | None, outputs: dict[str, torch.Tensor], model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(column, ClassTarget):
        return column.select(column._checked(logits))
    return column.from_output(outputs[column.layer], model, x.shape[-2:])


def label_of(spec: TargetSpec) -> str:
    """A column's name in file names and tags: ``class:3`` -> ``class_3``, ``channel:layer4.1:7`` -> ``channel_layer4.1_7``."""
    return str(spec).replace(":", "_").replace("/", "_")


def resolve_target_set(value: Any, model: nn.Module, x: torch.Tensor) -> TargetSet:
    """A target set (``top:K``, a list of target strings, or a ``TargetSet``) bound to ``model`` for the batch ``x``."""
    if isinstance(value, TargetSet):
        return value
    parsed = parse_target_set(value)
    if parsed is None:
        raise ConfigError(f"not a target set: {value!r}; give {SET_FORMS}")
    if isinstance(parsed, int):
        return TopClasses(model, x.detach(), parsed)
    columns = [resolve_target(str(spec), model, x) if spec.kind == "predicted" else resolve_spec(spec, model, x.shape[0]) for spec in parsed]
    return TargetSet([column.to(x.device) if column.kind == "class" else column for column in columns], [label_of(spec) for spec in parsed])
