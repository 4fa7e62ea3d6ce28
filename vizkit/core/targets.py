"""Targets: what a method explains or optimizes.

Users write targets as strings (``target=`` on the command line, or in Python):

    predicted               each input's top-1 class (the default)
    class:INDEX | class:NAME  a class, by index or by name (``class:tabby``, ``class:triangle``)
    channel:LAYER:C         channel C of a layer, summed over space (a ViT block's: embedding
                            dimension C over the patch tokens; ``vizkit.core.layouts``)
    neuron:LAYER:C:Y:X      one activation: "retain this neuron, set all others to zero, backpropagate"
    layer:LAYER             a whole layer (its activation norm; for optimization methods)

LAYER is a ``named_modules()`` name such as ``layer4.1.conv2`` (``vizkit-layers MODEL`` lists them).
``parse_target`` turns text into a ``TargetSpec``; ``resolve_target`` turns a spec (or an int, a
sequence of ints, a tensor) into a target object bound to a model, whose ``score(model, x)`` gives one
differentiable number per input.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from vizkit.core.errors import ConfigError, did_you_mean

TARGET_FORMS = "predicted, class:INDEX, class:NAME, channel:LAYER:C, neuron:LAYER:C:Y:X, layer:LAYER"


@dataclass(frozen=True)
class TargetSpec:
    """A parsed target string, not yet bound to a model."""

    kind: str  # predicted | class | channel | neuron | layer
    class_ref: str | None = None
    layer: str | None = None
    channel: int | None = None
    y: int | None = None
    x: int | None = None

    def __str__(self) -> str:
        parts = {
            "predicted": [],
            "class": [self.class_ref],
            "channel": [self.layer, self.channel],
            "neuron": [self.layer, self.channel, self.y, self.x],
            "layer": [self.layer],
        }[self.kind]
        return ":".join([self.kind, *map(str, parts)])


def _int(text: str, what: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"target '{spec}': {what} must be an integer, got '{text}'; expected one of: {TARGET_FORMS}") from None


def parse_target(spec: str) -> TargetSpec:
    text = str(spec).strip()
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    if kind == "predicted" and not rest:
        return TargetSpec("predicted")
    if kind == "class" and rest:
        return TargetSpec("class", class_ref=rest)
    if kind == "layer" and rest:
        return TargetSpec("layer", layer=rest)
    if kind in ("channel", "neuron"):
        # layer names contain dots, never colons: the numbers are the trailing fields
        fields = rest.split(":")
        numbers = {"channel": 1, "neuron": 3}[kind]
        if len(fields) == numbers + 1 and fields[0]:
            layer, *values = fields
            values = [_int(v, name, text) for v, name in zip(values, ("channel", "y", "x"))]
            return TargetSpec(kind, layer=layer, channel=values[0], y=(values + [None] * 3)[1], x=(values + [None] * 3)[2])
    raise ConfigError(f"cannot read target '{text}'; expected one of: {TARGET_FORMS}")


# ---------------------------------------------------------------- resolved targets


def scores_on_one_input(target: Any, model: nn.Module, x_one: torch.Tensor, batch: int) -> torch.Tensor:
    """The scores of a batch's ``batch`` targets, all on the same single input ``x_one`` ([1,C,H,W]):
    one forward instead of ``batch`` (integrated gradients' gray or black baseline)."""
    if target.kind == "class":
        return target.select(model(x_one).expand(batch, -1))
    return target.score(model, x_one).expand(batch)  # channel, neuron, layer: the same for every row


def is_clean_input(model: nn.Module, x: torch.Tensor, clean_model: nn.Module, clean: torch.Tensor) -> bool:
    """Whether a forward of ``model`` on ``x`` is the one on the clean batch: the same model and the same
    storage, shape and strides (methods pass ``x.detach()`` views of it)."""
    return model is clean_model and x.data_ptr() == clean.data_ptr() and x.shape == clean.shape and x.stride() == clean.stride()


@dataclass(frozen=True)
class ClassTarget:
    """One class per input; the score is the class logit (pre-softmax, as Simonyan et al. 2014)."""

    indices: torch.Tensor  # [B] long
    names: tuple[str, ...] = ()
    kind: str = field(default="class", init=False)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._checked(model(x))

    def _checked(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2:
            raise ConfigError(f"a class target needs a model that outputs [B, classes] logits, got shape {tuple(logits.shape)}")
        if logits.shape[0] != self.indices.shape[0]:
            raise ConfigError(f"{self.indices.shape[0]} class targets for a batch of {logits.shape[0]}")
        bad = self.indices[(self.indices < 0) | (self.indices >= logits.shape[1])]
        if bad.numel():
            raise ConfigError(f"class index {int(bad[0])} is out of range: the model has {logits.shape[1]} classes (0..{logits.shape[1] - 1})")
        return logits

    def take(self, rows: torch.Tensor) -> "ClassTarget":
        """The targets of some inputs, in order (e.g. one per perturbed copy of an input)."""
        return ClassTarget(self.indices[rows.to(self.indices.device)], self.names)

    def to(self, device: Any) -> "ClassTarget":
        return ClassTarget(self.indices.to(device), self.names)

    def select(self, logits_or_probs: torch.Tensor) -> torch.Tensor:
        return logits_or_probs.gather(1, self.indices.to(logits_or_probs.device).view(-1, 1)).squeeze(1)

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.select(self.logits(model, x))

    def __str__(self) -> str:
        indices = self.indices.tolist()
        return "class:" + ",".join(str(i) for i in (indices if len(set(indices)) > 1 else indices[:1]))


class PredictedClassTarget(ClassTarget):
    """Each input's top-1 class, read from the first forward a method makes on the clean input.

    Gradient methods and occlusion start with exactly that forward, so the prediction costs no pass
    of its own (and ``clean_logits`` serves the runner's top-5). A method that first touches
    ``indices`` or runs on other inputs gets them from one no-grad forward of its own, as before.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_x", x)
        object.__setattr__(self, "_indices", None)
        object.__setattr__(self, "names", ())
        object.__setattr__(self, "clean_logits", None)

    @property
    def indices(self) -> torch.Tensor:  # type: ignore[override]
        if self._indices is None:
            with torch.no_grad():
                self._record(self._model(self._x))
        return self._indices

    def _record(self, logits: torch.Tensor) -> None:
        object.__setattr__(self, "clean_logits", logits.detach())
        object.__setattr__(self, "_indices", logits.detach().argmax(1))

    def _is_clean_input(self, model: nn.Module, x: torch.Tensor) -> bool:
        return is_clean_input(model, x, self._model, self._x)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        if self._indices is None and logits.dim() == 2 and self._is_clean_input(model, x):
            self._record(logits)
        return self._checked(logits)

    def to(self, device: Any) -> "ClassTarget":
        return self if self._x.device == torch.device(device) else ClassTarget(self.indices.to(device))

    def __repr__(self) -> str:
        return "PredictedClassTarget()" if self._indices is None else f"PredictedClassTarget({self._indices.tolist()})"


def channel_of(output: torch.Tensor, model: nn.Module, layer: str, input_size: tuple[int, int], channel: int) -> torch.Tensor:
    """Channel ``channel`` of a layer's output in any layout (``vizkit.core.layouts``): ``[B, H, W]``
    for a feature map or a token sequence, ``[B]`` for a vector."""
    from vizkit.core.layouts import channels_first

    maps = channels_first(output, model, layer, input_size)
    if maps.dim() < 2 or not 0 <= channel < maps.shape[1]:
        raise ConfigError(f"channel {channel} is out of range: layer '{layer}' has {maps.shape[1] if maps.dim() >= 2 else 0} channels "
                          f"(output shape {tuple(output.shape[1:])})")
    return maps[:, channel]


@dataclass(frozen=True)
class ChannelTarget:
    """Channel C of a layer's output, summed over its spatial positions (a token layer's: over its patch tokens)."""

    layer: str
    module: nn.Module
    channel: int
    kind: str = field(default="channel", init=False)

    def activation(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The channel's map ``[B, H, W]`` (a token layer's: the embedding dimension over the patch grid)."""
        from vizkit.core.hooks import layer_output

        return channel_of(layer_output(model, x, self.module, self.layer), model, self.layer, x.shape[-2:], self.channel)

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.activation(model, x).flatten(1).sum(1)

    def from_output(self, output: torch.Tensor, model: nn.Module, input_size: Any) -> torch.Tensor:
        """The score from the layer's output, captured in a forward made for other targets too."""
        return channel_of(output, model, self.layer, input_size, self.channel).flatten(1).sum(1)

    def take(self, rows: torch.Tensor) -> "ChannelTarget":
        """The same target for perturbed copies: it does not depend on which input a row came from."""
        return self

    def __str__(self) -> str:
        return f"channel:{self.layer}:{self.channel}"


@dataclass(frozen=True)
class NeuronTarget:
    """One activation of a layer: channel C at spatial position (Y, X)."""

    layer: str
    module: nn.Module
    channel: int
    y: int
    x: int
    kind: str = field(default="neuron", init=False)

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._at(ChannelTarget(self.layer, self.module, self.channel).activation(model, x))

    def from_output(self, output: torch.Tensor, model: nn.Module, input_size: Any) -> torch.Tensor:
        """The score from the layer's output, captured in a forward made for other targets too."""
        return self._at(channel_of(output, model, self.layer, input_size, self.channel))

    def _at(self, channel_map: torch.Tensor) -> torch.Tensor:
        if channel_map.dim() != 3 or not (0 <= self.y < channel_map.shape[1] and 0 <= self.x < channel_map.shape[2]):
            raise ConfigError(
                f"neuron ({self.y}, {self.x}) is out of range: layer '{self.layer}' channel maps have shape {tuple(channel_map.shape[1:])}"
            )
        return channel_map[:, self.y, self.x]

    def take(self, rows: torch.Tensor) -> "NeuronTarget":
        """The same target for perturbed copies: it does not depend on which input a row came from."""
        return self

    def __str__(self) -> str:
        return f"neuron:{self.layer}:{self.channel}:{self.y}:{self.x}"


@dataclass(frozen=True)
class LayerTarget:
    """A whole layer; the score is the squared L2 norm of its activation (Deep Dream's objective)."""

    layer: str
    module: nn.Module
    kind: str = field(default="layer", init=False)

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from vizkit.core.hooks import layer_output

        return self.from_output(layer_output(model, x, self.module, self.layer), model, x.shape[-2:])

    def from_output(self, output: torch.Tensor, model: nn.Module, input_size: Any) -> torch.Tensor:
        """The score from the layer's output, captured in a forward made for other targets too."""
        return output.flatten(1).pow(2).sum(1)

    def take(self, rows: torch.Tensor) -> "LayerTarget":
        """The same target for perturbed copies: it does not depend on which input a row came from."""
        return self

    def __str__(self) -> str:
        return f"layer:{self.layer}"


Target = ClassTarget | ChannelTarget | NeuronTarget | LayerTarget


# ---------------------------------------------------------------- resolution


def class_index(ref: str, class_names: Sequence[str] | None, num_classes: int | None) -> int:
    """A class reference (an index or a name) as an index, with close matches on failure."""
    ref = ref.strip()
    if ref.lstrip("-").isdigit():
        index = int(ref)
        if num_classes is not None and not 0 <= index < num_classes:
            raise ConfigError(f"class index {index} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
        return index
    if not class_names:
        raise ConfigError(f"class '{ref}': this model has no class names; use class:INDEX")
    wanted = _normalize(ref)
    hits = [i for i, name in enumerate(class_names) if wanted in (_normalize(a) for a in name.split(","))]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        listed = ", ".join(f"{i} ({class_names[i]})" for i in hits)
        raise ConfigError(f"class name '{ref}' is ambiguous: {listed}; use class:INDEX")
    aliases = [a.strip() for name in class_names for a in name.split(",")]
    raise ConfigError(f"unknown class name '{ref}'{did_you_mean(ref, aliases) or '; use class:INDEX'}")


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", " ").replace("-", " ")


def resolve_spec(spec: TargetSpec, model: nn.Module, batch_size: int, predicted: torch.Tensor | None = None) -> Target:
    """Bind a parsed target to a model. ``predicted`` ([B] class indices) serves ``predicted``."""
    from vizkit.core.models import class_names, find_layer, num_classes

    if spec.kind == "predicted":
        if predicted is None:
            raise ConfigError("target 'predicted' needs the model's predictions")
        return ClassTarget(predicted.long())
    if spec.kind == "class":
        index = class_index(spec.class_ref, class_names(model), num_classes(model))
        return ClassTarget(torch.full((batch_size,), index, dtype=torch.long))
    module = find_layer(model, spec.layer)
    if spec.kind == "channel":
        return ChannelTarget(spec.layer, module, spec.channel)
    if spec.kind == "neuron":
        return NeuronTarget(spec.layer, module, spec.channel, spec.y, spec.x)
    return LayerTarget(spec.layer, module)


def resolve_target(target: Any, model: nn.Module, x: torch.Tensor) -> Target:
    """Any accepted target form, bound to `model` for the batch `x`."""
    if isinstance(target, (ClassTarget, ChannelTarget, NeuronTarget, LayerTarget)):
        return target
    batch_size = x.shape[0]
    if target is None or (isinstance(target, str) and target.strip().lower() == "predicted"):
        return PredictedClassTarget(model, x.detach())
    if isinstance(target, TargetSpec):
        return resolve_spec(target, model, batch_size)
    if isinstance(target, str):
        return resolve_spec(parse_target(target), model, batch_size)
    _check_class_indices(target)
    if isinstance(target, numbers.Real) or (isinstance(target, torch.Tensor) and target.dim() == 0):  # a whole number (checked above)
        target = int(target)
        return ClassTarget(torch.full((batch_size,), target, dtype=torch.long, device=x.device))
    indices = torch.as_tensor(target, dtype=torch.long, device=x.device).reshape(-1)
    if indices.numel() != batch_size:
        raise ConfigError(f"got {indices.numel()} class targets for a batch of {batch_size}")
    return ClassTarget(indices)


def _check_class_indices(target: Any) -> None:
    """Class targets given as numbers must be whole numbers, not booleans: ``True`` would be class 1
    and ``2.7`` class 2, silently."""
    if hasattr(target, "tolist") and not isinstance(target, numbers.Number):  # a tensor or an array: plain Python values
        values = torch.as_tensor(target).flatten().tolist()
    else:
        values = list(target) if isinstance(target, (list, tuple)) else [target]
    for value in values:
        if isinstance(value, bool):
            raise ConfigError(f"a class target must be a class index or name, got the boolean {value!r}")
        if not isinstance(value, numbers.Integral) and not (isinstance(value, numbers.Real) and float(value).is_integer()):
            if isinstance(value, numbers.Real):
                raise ConfigError(f"a class target must be a whole class index, got {value!r}")
            raise ConfigError(f"a class target must be a class index, a name or 'class:...', got {value!r} ({type(value).__name__})")
