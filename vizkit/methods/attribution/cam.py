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

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vizkit.core.errors import ConfigError
from vizkit.core.hooks import capture_output
from vizkit.core.layouts import LAYOUTS, channels_first, layout_of
from vizkit.core.models import default_layer, find_layer
from vizkit.methods.base import AttributionMethod


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
    when ``input_gradient``, else None), detached. The backward stops at the shallowest layer unless
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
            times = "never" if not outputs else f"{len(outputs)} times"
            raise ConfigError(f"{method_name}: layer '{layer}' runs {times} in one forward pass "
                              f"(before the target, once); choose another with {choose}")
        activations.append(outputs[0] if outputs else None)
    if not gradient:
        return [None if a is None else a.detach() for a in activations], [None] * len(layers), None
    wanted = ([x] if input_gradient else []) + [a for a in activations if a is not None and a.requires_grad]
    found = iter(torch.autograd.grad(score.sum(), wanted, allow_unused=True) if wanted else ())
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
        activation, gradient = layer_activation_and_gradient(model, x, target, layer, self.name, gradient=self.needs_gradient)
        layout = layout_of(activation, model, layer, x.shape[-2:], self.config.layout)
        return CamInputs(
            activation=feature_map(activation, model, layer, x.shape[-2:], layout, self.name).float(),
            gradient=None if gradient is None else feature_map(gradient, model, layer, x.shape[-2:], layout, self.name).float(),
            model=model, x=x, target=target, layer=layer, layout=layout)

    def weights(self, inputs: CamInputs) -> torch.Tensor:
        """The channels' weights, ``[B,K,1,1]`` or per position ``[B,K,h,w]``."""
        raise NotImplementedError

    def combine(self, inputs: CamInputs) -> torch.Tensor:
        """The map at the layer's resolution, ``[B,1,h,w]``, before the ReLU."""
        return (self.weights(inputs) * inputs.activation).sum(1, keepdim=True)

    def layer_map(self, model, x, target, layer: str) -> torch.Tensor:
        """One layer's map, rectified (``relu``), upsampled bilinearly to the input's size."""
        cam = self.combine(self.capture(model, x, target, layer))
        if self.config.relu:
            cam = cam.clamp_min(0)
        return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def compute(self, model, x, target, pixels):
        return self.layer_map(model, x, target, self.config.layer or default_layer(model))
