"""What every class activation map shares: the layer's activation (and, where the weighting needs it,
the gradient of the target's score) captured in one pass, read channels first in any layout, combined
into one map per input, rectified, upsampled to the input.

A CAM is only its weighting. A subclass of ``CamMethod`` implements ``combine(inputs)``, returning the
map at the layer's resolution, ``[B,1,h,w]``; most do it by ``weights(inputs)``, ``[B,K,1,1]`` or
``[B,K,h,w]``, which the default ``combine`` multiplies into the activation and sums over channels
(Grad-CAM: the pooled gradient). ``needs_gradient`` says whether the capture takes the backward pass
(Eigen-CAM, Score-CAM and Ablation-CAM need only the activation and forwards of their own, made
through ``inputs.model`` on ``inputs.x``). Several layers are captured in one forward and one backward
by ``layers_activations_and_gradients`` (FullGrad's bias layers, with the input's gradient); the
one-layer capture is that with one layer.

The layer defaults to the backbone's last feature stage (``vizkit.core.models.default_layer``), the
layouts are ``vizkit.core.layouts``' (NCHW, channels-last stages, ViT tokens over the patch grid).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vizkit.core.errors import ConfigError
from vizkit.core.hooks import capture_output, forward_hook
from vizkit.core.layouts import LAYOUTS, channels_first, layout_of
from vizkit.core.models import default_layer, find_layer
from vizkit.methods.base import AttributionMethod
from vizkit.probes.gradients import column_gradients


@dataclass
class CamConfig:
    layer: str = ""  # a named_modules() name (vizkit-layers MODEL); "" = the last feature stage in timm's feature_info
    layout: str = "auto"  # auto (from feature_info's channel count; tokens for a ViT's [B,N,C]), nchw, nhwc, tokens
    relu: bool = True  # keep only evidence for the target (the papers' ReLU)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got '{self.layout}'")


@dataclass
class CamInputs:
    """What a CAM's weighting may read: the layer's activation and the score's gradient there
    (``[B,K,h,w]``, channels first, float32; ``gradient`` None unless ``needs_gradient``), and the model,
    input, target, layer and layout, for weightings that run forwards of their own."""

    activation: torch.Tensor
    gradient: torch.Tensor | None
    model: Any
    x: torch.Tensor
    target: Any
    layer: str
    layout: str


def layer_activation_and_gradient(model, x, target, layer: str, method_name: str, gradient: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's output for x and (``gradient``) the gradient of the target's summed score with
    respect to it; without it, one forward under no_grad."""
    (activation,), (grad,), _ = layers_activations_and_gradients(model, x, target, [layer], method_name, gradient=gradient)
    return activation, grad


def layers_activations_and_gradients(model, x, target, layers: list[str], method_name: str, gradient: bool = True, *,
                                     input_gradient: bool = False, required: bool = True, choose: str = "method.layer=NAME",
                                     ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None], torch.Tensor | None]:
    """Several layers' outputs for x and (``gradient``) the gradients of the target's summed score with
    respect to them, from one forward and one backward: (activations, gradients, the input's gradient
    when ``input_gradient``, else None), detached. A target set's K targets make K backwards of the one
    forward, and each gradient ``[K, ...]``. The backward stops at the shallowest layer unless
    ``input_gradient``; without ``gradient``, one forward under no_grad.

    A layer that runs more than once is refused. ``required``: a layer that never runs (before the
    target) or that the score does not depend on is refused too; otherwise its activation (never run)
    and gradient are None, for a method that takes many layers by default (FullGrad: a bias the
    score does not see contributes nothing). ``choose`` ends the refusals: the field to change."""
    modules = {layer: find_layer(model, layer) for layer in layers}
    x = x.detach().requires_grad_(gradient and input_gradient)
    with torch.enable_grad() if gradient else torch.no_grad(), ExitStack() as stack:
        captured = {layer: stack.enter_context(capture_output(module, layer)) for layer, module in modules.items()}
        score = target.score(model, x)
    activations: list[torch.Tensor | None] = []
    for layer, outputs in captured.items():
        if len(outputs) > 1 or (required and not outputs):
            raise _runs_not_once(method_name, layer, "never" if not outputs else f"{len(outputs)} times", "the target", choose)
        activations.append(outputs[0] if outputs else None)
    if not gradient:
        return [None if a is None else a.detach() for a in activations], [None] * len(layers), None
    wanted = ([x] if input_gradient else []) + [a for a in activations if a is not None and a.requires_grad]
    # a target set's [B, K] scores: K vector-Jacobian products of the one graph, each gradient [K, ...]
    backward = column_gradients if score.dim() == 2 else lambda s, inputs: torch.autograd.grad(s.sum(), inputs, allow_unused=True)
    found = iter(backward(score, wanted) if wanted else ())
    input_grad = next(found) if input_gradient else None
    if input_gradient and input_grad is None:
        input_grad = torch.zeros_like(x)
    gradients = [next(found) if a is not None and a.requires_grad else None for a in activations]
    for layer, grad in zip(layers, gradients):
        if required and grad is None:
            raise ConfigError(f"{method_name}: the target's score does not depend on layer '{layer}'; choose a layer before the target")
    return [None if a is None else a.detach() for a in activations], gradients, input_grad


def feature_map(tensor: torch.Tensor, model, layer: str, input_size, layout: str, method_name: str = "a CAM") -> torch.Tensor:
    """The layer's output (or its gradient) as ``[B,C,H,W]``, or a one-line refusal."""
    maps = channels_first(tensor, model, layer, input_size, layout)
    if maps.dim() != 4:
        raise ConfigError(f"layer '{layer}' outputs shape {tuple(tensor.shape)}; {method_name} needs a [B,C,H,W] feature map "
                          f"(a convolutional layer) or a vision transformer's tokens")
    return maps


class CamMethod(AttributionMethod):
    """A class activation map (see the module docstring); subclasses set ``name``, ``description``,
    ``Config`` (a ``CamConfig``) and ``weights`` or ``combine``."""

    Config = CamConfig
    target_kinds = frozenset({"class", "channel", "neuron"})
    needs_gradient: ClassVar[bool] = True

    def check(self, model):
        find_layer(model, self.config.layer or default_layer(model))

    def capture(self, model, x, target, layer: str) -> CamInputs:
        """The layer's activation (and gradient) at ``layer``, channels first."""
        (inputs,) = self._captures(model, x, target, layer, is_set=False)
        return inputs

    def _captures(self, model, x, target, layer: str, is_set: bool) -> list[CamInputs]:
        """``CamInputs`` per column of ``target`` (a target set, or one target as its only column), from
        one forward and, for a set, one batched backward."""
        raw, gradient = layer_activation_and_gradient(model, x, target, layer, self.name, gradient=self.needs_gradient)
        columns = target.columns() if is_set else [target]  # after the forward: top:K reads its classes there
        layout = layout_of(raw, model, layer, x.shape[-2:], self.config.layout)
        activation = feature_map(raw, model, layer, x.shape[-2:], layout, self.name).float()
        gradients = [None] * len(columns) if gradient is None else list(gradient) if is_set else [gradient]
        return [CamInputs(activation=activation,
                          gradient=None if grad is None else feature_map(grad, model, layer, x.shape[-2:], layout, self.name).float(),
                          model=model, x=x, target=column, layer=layer, layout=layout)
                for grad, column in zip(gradients, columns)]

    def weights(self, inputs: CamInputs) -> torch.Tensor:
        """The channels' weights, ``[B,K,1,1]`` or per position ``[B,K,h,w]``."""
        raise NotImplementedError

    def combine(self, inputs: CamInputs) -> torch.Tensor:
        """The map at the layer's resolution, ``[B,1,h,w]``, before the ReLU."""
        return (self.weights(inputs) * inputs.activation).sum(1, keepdim=True)

    def layer_map(self, model, x, target, layer: str) -> torch.Tensor:
        """One layer's map, rectified (``relu``), upsampled bilinearly to the input's size."""
        return self._finished(self.capture(model, x, target, layer))

    def _finished(self, inputs: CamInputs) -> torch.Tensor:
        return self._upsampled(self.combine(inputs), inputs.x.shape[-2:])

    def _upsampled(self, cam: torch.Tensor, size) -> torch.Tensor:
        """A map at the layer's resolution, rectified (``relu``) and upsampled bilinearly to ``size``."""
        if self.config.relu:
            cam = cam.clamp_min(0)
        return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)

    def compute(self, model, x, target, pixels):
        return self.layer_map(model, x, target, self.config.layer or default_layer(model))

    def compute_targets(self, model, x, targets, pixels):
        """A target set's maps from one forward (and one batched backward to the layer): the activation is
        shared, each target gets its own gradient. A CAM that captures or computes its own way loops."""
        if type(self).capture is not CamMethod.capture or type(self).compute is not CamMethod.compute:
            return super().compute_targets(model, x, targets, pixels)
        layer = self.config.layer or default_layer(model)
        return torch.stack([self._finished(inputs) for inputs in self._set_captures(model, x, targets, layer, per_target=True)], 1)

    def _set_captures(self, model, x, targets, layer: str, per_target: bool) -> list[CamInputs]:
        """``_captures`` for a target set: one ``CamInputs`` per target (``per_target``), or one whose target is
        the set. A target whose layer comes before ``layer`` is refused, as it is alone: its forward stops at its
        own layer, before this one runs (in a set the forward goes on, and its gradient here would be zero)."""
        with _layers_before(model, layer, targets) as early:
            captures = self._captures(model, x, targets, layer, is_set=per_target)
        if early:
            raise _runs_not_once(self.name, layer, "never", f"the target {early[0]}", "method.layer=NAME")
        return captures


def _runs_not_once(method_name: str, layer: str, times: str, target: str, choose: str) -> ConfigError:
    """A CAM needs its layer to run exactly once before the target's score is known."""
    return ConfigError(f"{method_name}: layer '{layer}' runs {times} in one forward pass (before {target}, once); "
                       f"choose another with {choose}")


@contextmanager
def _layers_before(model, layer: str, targets):
    """Yields a list that, after the forward, holds the set's channel, neuron and layer targets whose layer
    finishes before ``layer`` does (the score of such a target does not depend on ``layer``)."""
    columns = [] if targets.kinds == {"class"} else [c for c in targets.columns() if c.kind != "class" and c.layer != layer]
    finished: list[str] = []
    early: list = []
    with ExitStack() as stack:
        for name, module in {layer: find_layer(model, layer), **{c.layer: c.module for c in columns}}.items():
            stack.enter_context(forward_hook(module, lambda *_, name=name: finished.append(name)))
        yield early
    order = {name: finished.index(name) for name in set(finished)}
    early.extend(str(c) for c in columns if order.get(c.layer, -1) < order.get(layer, len(finished)))
