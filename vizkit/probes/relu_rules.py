"""Modified ReLU backward rules for guided backpropagation and the deconvnet.

Forward, a ReLU is a ReLU; backward, the rule replaces its gradient:

* ``guided`` (Springenberg et al. 2015): pass a gradient only where both the forward input and the
  incoming gradient are positive: ``relu(grad_out) * (x > 0)``.
* ``deconvnet`` (Zeiler & Fergus 2014): rectify the gradient alone: ``relu(grad_out)``.

The rule is installed with a ``TorchFunctionMode`` that intercepts every ReLU *call* for the duration of
one forward: ``nn.ReLU`` modules (in-place or not, they call ``F.relu``), ``F.relu``, ``torch.relu``,
``torch.relu_`` and ``Tensor.relu``/``relu_``. Nothing on the model is touched, so in-place ReLUs
(timm's default) and ReLUs written as functions are both handled, and the model is left exactly as it
was. captum's versions hook ``nn.ReLU`` modules only, treat functional ReLUs as plain ReLUs, and need
``inplace=False`` first.

A model that uses a different rectifier (GELU, SiLU, ReLU6, LeakyReLU, ...) has no defined rule: the
map would be silently wrong, so ``relu_rule`` raises instead.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from vizkit.core import hooks
from vizkit.core.errors import ConfigError

RULES = ("guided", "deconvnet")

_RELUS = {F.relu, torch.relu, torch.Tensor.relu}
_INPLACE_RELUS = {F.relu_, torch.relu_, torch.Tensor.relu_}

# Activations for which a ReLU rule is not defined; gates (sigmoid, tanh) are not rectifiers and pass.
_OTHER_ACTIVATIONS = {
    F.gelu: "GELU", F.silu: "SiLU", F.hardswish: "Hardswish", F.mish: "Mish", F.elu: "ELU",
    F.selu: "SELU", F.celu: "CELU", F.leaky_relu: "LeakyReLU", F.leaky_relu_: "LeakyReLU",
    F.relu6: "ReLU6", F.hardtanh: "Hardtanh/ReLU6", F.hardtanh_: "Hardtanh/ReLU6", F.softplus: "Softplus",
    F.prelu: "PReLU", F.rrelu: "RReLU",
}


class _RuleReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool, rule: str) -> torch.Tensor:
        if inplace:
            ctx.mark_dirty(x)
            output = x.clamp_(min=0)
        else:
            output = x.clamp(min=0)
        ctx.rule = rule
        if rule == "guided":  # the deconvnet rule never looks at the forward pass
            ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        gradient = grad_output.clamp(min=0)
        if ctx.rule == "guided":
            (output,) = ctx.saved_tensors
            # ReLU's own backward kernel: zero where the forward output was not positive
            gradient = torch.ops.aten.threshold_backward(gradient, output, 0)
        return gradient, None, None


class _ReluRuleMode(TorchFunctionMode):
    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule
        self.relu_calls = 0
        self.other_activations: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if hooks.probing():  # vizkit's own look at the whole forward (a layer run twice?), not the explained pass
            return func(*args, **kwargs)
        if func in _RELUS or func in _INPLACE_RELUS:
            inplace = func in _INPLACE_RELUS or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            self.relu_calls += 1
            return _RuleReLU.apply(args[0], inplace, self.rule)
        if func in _OTHER_ACTIVATIONS:
            self.other_activations.add(_OTHER_ACTIVATIONS[func])
        return func(*args, **kwargs)


@contextmanager
def relu_rule(rule: str, method: str) -> Iterator[_ReluRuleMode]:
    """Run a forward (and its backward) with `rule` in place of every ReLU's gradient.

    Raises ``ConfigError`` after the block if the forward used another rectifier or no ReLU at all.
    """
    if rule not in RULES:
        raise ConfigError(f"unknown ReLU rule '{rule}'; choose one of: {', '.join(RULES)}")
    mode = _ReluRuleMode(rule)
    with mode:
        yield mode
    if mode.other_activations:
        raise ConfigError(
            f"{method} defines a backward rule for ReLU only, but this model also uses "
            f"{', '.join(sorted(mode.other_activations))}: the map would be silently wrong. "
            f"Use a ReLU network, or a method without ReLU rules (saliency)."
        )
    if mode.relu_calls == 0:
        raise ConfigError(f"{method} found no ReLU in the model's forward pass (up to the target): there is nothing for its rule to change")
