"""What an optimized image should excite: the foundation's targets, weighted sums of them, diversity.

An ``Objective`` is a list of (target, weight) terms evaluated from **one** forward: the layers the
terms read are recorded on the way (``vizkit.core.hooks.layer_outputs``), and the forward stops after the
deepest one unless a class term needs the logits. Scores are per image, to be maximized:

    class:C                 the class logit (Simonyan et al. 2014 optimize the unnormalized score)
    channel:LAYER:C         the channel's mean activation (lucent's ``channel``; a ViT block's: the
                            embedding dimension averaged over the patch tokens, ``vizkit.core.layouts``)
    neuron:LAYER:C:Y:X      one activation
    layer:LAYER             the mean squared activation of the layer (Deep Dream's ||a||², per unit)

Channel and layer objectives are means over positions, not the sums attribution uses, so that one
learning rate suits layers of any size; with Adam the scale hardly matters anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from vizkit.core.errors import ConfigError
from vizkit.core.hooks import layer_outputs
from vizkit.core.targets import ClassTarget, ChannelTarget, channel_of, LayerTarget, NeuronTarget, Target, parse_target, resolve_spec


@dataclass(frozen=True)
class Term:
    target: Target
    weight: float = 1.0


def term_score(target: Target, logits: torch.Tensor | None, activations: dict[str, torch.Tensor],
               model: nn.Module | None = None, input_size: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """One term's per-image score from a forward's logits and recorded layers (a channel or neuron
    term reads the layer in its model's layout: ``model`` and the forward's ``input_size``)."""
    if isinstance(target, ClassTarget):
        if logits is None or logits.dim() != 2:
            raise ConfigError(f"a class objective needs a model that outputs [B, classes] logits, got {None if logits is None else tuple(logits.shape)}")
        indices = target.indices.to(logits.device)
        if indices.numel() == 1:
            indices = indices.expand(logits.shape[0])
        if indices.numel() != logits.shape[0]:
            raise ConfigError(f"{indices.numel()} classes for a batch of {logits.shape[0]} images")
        if int(indices.max()) >= logits.shape[1] or int(indices.min()) < 0:
            raise ConfigError(f"class index out of range: the model has {logits.shape[1]} classes")
        return logits.gather(1, indices.view(-1, 1)).squeeze(1)
    output = activations[target.layer]
    if isinstance(target, LayerTarget):
        return output.flatten(1).pow(2).mean(1)
    channel = channel_of(output, model, target.layer, input_size, target.channel)
    if isinstance(target, ChannelTarget):
        return channel.flatten(1).mean(1)
    assert isinstance(target, NeuronTarget)
    if channel.dim() != 3 or not (0 <= target.y < channel.shape[1] and 0 <= target.x < channel.shape[2]):
        raise ConfigError(f"neuron ({target.y}, {target.x}) is out of range: layer '{target.layer}' maps have shape {tuple(channel.shape[1:])}")
    return channel[:, target.y, target.x]


class Objective:
    """A weighted sum of terms, evaluated from one forward. ``extra_layers``: more layers to record
    in the same forward (a diversity term's layer), returned by ``evaluate``."""

    def __init__(self, terms: Sequence[Term], extra_layers: dict[str, nn.Module] | None = None) -> None:
        if not terms:
            raise ConfigError("an objective needs at least one target")
        self.terms = list(terms)
        self.modules: dict[str, nn.Module] = {}
        for term in self.terms:
            if not isinstance(term.target, ClassTarget):
                self.modules[term.target.layer] = term.target.module
        self.modules.update(extra_layers or {})
        self.needs_logits = any(isinstance(term.target, ClassTarget) for term in self.terms)

    def evaluate(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """(per-image weighted score [B], the recorded layers, the logits or None)."""
        logits, activations = layer_outputs(model, x, self.modules, logits=self.needs_logits)
        score = sum(term.weight * term_score(term.target, logits, activations, model, x.shape[-2:]) for term in self.terms)
        return score, activations, logits

    def __str__(self) -> str:
        return " + ".join(f"{term.weight:g}*{term.target}" if term.weight != 1 else str(term.target) for term in self.terms)


def parse_terms(spec: Any, model: nn.Module, batch: int) -> list[Term]:
    """Terms from a target string (``"channel:layer3:5"``), a list of strings, or a list of
    ``{target: ..., weight: ...}`` mappings (a Hydra list of dicts)."""
    items = [spec] if isinstance(spec, str) else list(spec or [])
    terms = []
    for item in items:
        if isinstance(item, str):
            text, weight = item, 1.0
        elif hasattr(item, "get") and item.get("target") is not None:
            text, weight = str(item.get("target")), float(item.get("weight", 1.0))
            unknown = set(item.keys()) - {"target", "weight"}
            if unknown:
                raise ConfigError(f"an objective term takes 'target' and 'weight', not {', '.join(sorted(map(str, unknown)))}")
        else:
            raise ConfigError(f"cannot read objective term {item!r}; use 'channel:LAYER:C' or {{target: 'channel:LAYER:C', weight: 1.0}}")
        parsed = parse_target(text)
        if parsed.kind == "predicted":
            raise ConfigError("an optimized image has no prediction to explain: give target=class:..., channel:..., neuron:... or layer:...")
        terms.append(Term(resolve_spec(parsed, model, batch), weight))
    if not terms:
        raise ConfigError("no objective given: set target=channel:LAYER:C (or class:..., neuron:..., layer:...)")
    return terms


def diversity(activations: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the images' Gram matrices at a layer (lucent's ``diversity``
    with the sign flipped: a loss to minimize). Zero for a batch of one."""
    batch = activations.shape[0]
    if batch < 2:
        return activations.new_zeros(())
    flat = activations.flatten(2)
    grams = torch.nn.functional.normalize((flat @ flat.transpose(1, 2)).flatten(1), dim=1)
    similarity = grams @ grams.T
    return (similarity.sum() - similarity.diagonal().sum()) / (batch * (batch - 1))
