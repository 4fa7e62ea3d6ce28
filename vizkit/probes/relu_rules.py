"""Modified backward rules for guided backpropagation and the deconvnet, on ReLUs and other activations.

Forward, an activation is itself; backward, the rule replaces its gradient (``g``: the incoming gradient):

* ``guided`` (Springenberg et al. 2015): the activation's local derivative times the positive part of
  the incoming gradient, ``f'(x) * relu(g)``. On a ReLU, ``f'(x) = (x > 0)``: the paper's rule.
* ``deconvnet`` (Zeiler & Fergus 2014): the positive part of the incoming gradient, ``relu(g)``,
  whatever the activation.

ReLUs keep their own exact code path (bit-identical maps to the ReLU-only rule). The other activations
with a rule: GELU (exact and tanh), SiLU/Swish, Hardswish, Mish, ELU, LeakyReLU, ReLU6 (and any
Hardtanh clipping from 0, as ``nn.ReLU6`` calls it); ``f'(x)`` is torch's own derivative of the
activation at the forward input, so the rule is exact for each, including where it is not monotone
(GELU, SiLU, Mish go slightly negative: ``f'`` is then negative and the rule passes that sign on).
Activations with no rule (SELU, CELU, Softplus, PReLU, RReLU, a Hardtanh not starting at 0) are
refused by name, as is every non-ReLU activation with ``relu_only=True`` (the rule as the papers
define it, for ReLU networks only). Gates (sigmoid, tanh) are not activations in this sense and keep
their ordinary gradient.

The rule is installed with a ``TorchFunctionMode`` that intercepts every activation *call* for the
duration of one forward: modules (in-place or not: they call the functional forms), functions and
tensor methods. Nothing on the model is touched, so in-place activations (timm's default) and
activations written as functions are both handled, and the model is left exactly as it was. captum's
versions hook ``nn.ReLU`` modules only, treat functional ReLUs as plain ReLUs, and need
``inplace=False`` first.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from vizkit.core import hooks
from vizkit.core.errors import ConfigError

RULES = ("guided", "deconvnet")


@dataclass
class ActivationRuleConfig:
    """The field of every method with a backward rule."""

    relu_only: bool = False  # true: the papers' rule for ReLU networks only (any other activation is refused by name)

_RELUS = {F.relu, torch.relu, torch.Tensor.relu}
_INPLACE_RELUS = {F.relu_, torch.relu_, torch.Tensor.relu_}

# activation call -> (its name, the out-of-place function, its argument names after the input, in place by name)
_RULED: dict[Callable, tuple[str, Callable, tuple[str, ...], bool]] = {
    F.gelu: ("GELU", F.gelu, ("approximate",), False),
    F.silu: ("SiLU", F.silu, ("inplace",), False),
    F.hardswish: ("Hardswish", F.hardswish, ("inplace",), False),
    F.mish: ("Mish", F.mish, ("inplace",), False),
    F.elu: ("ELU", F.elu, ("alpha", "inplace"), False),
    F.elu_: ("ELU", F.elu, ("alpha",), True),
    F.leaky_relu: ("LeakyReLU", F.leaky_relu, ("negative_slope", "inplace"), False),
    F.leaky_relu_: ("LeakyReLU", F.leaky_relu, ("negative_slope",), True),
    F.relu6: ("ReLU6", F.relu6, ("inplace",), False),
    F.hardtanh: ("ReLU6", F.hardtanh, ("min_val", "max_val", "inplace"), False),  # nn.ReLU6 is Hardtanh(0, 6)
    F.hardtanh_: ("ReLU6", F.hardtanh, ("min_val", "max_val"), True),
}
# activations with no rule: refused by name rather than given a silently wrong map
_UNRULED = {F.selu: "SELU", F.celu: "CELU", F.softplus: "Softplus", F.prelu: "PReLU", F.rrelu: "RReLU"}


def _arguments(func: Callable, args: tuple, kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The activation's keyword arguments (the input left out) and whether the call is in place."""
    _, _, names, inplace_by_name = _RULED[func]
    values = {**dict(zip(names, args[1:])), **kwargs}
    return values, bool(values.pop("inplace", False)) or inplace_by_name


class _RuleActivation(torch.autograd.Function):
    """Any activation with ``rule`` as its gradient; ``f'`` by torch's own autograd at the saved input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, function: Callable, arguments: dict[str, Any], inplace: bool, rule: str, mode: "_ReluRuleMode"):
        ctx.function, ctx.arguments, ctx.rule, ctx.mode = function, arguments, rule, mode
        if rule == "guided":  # the deconvnet rule never looks at the forward pass
            ctx.save_for_backward(x.detach().clone() if inplace else x)
        output = function(x, **arguments)
        if inplace:
            ctx.mark_dirty(x)
            return x.copy_(output)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        gradient = grad_output.clamp(min=0)
        if ctx.rule == "guided":
            (x,) = ctx.saved_tensors
            with torch.enable_grad(), ctx.mode.passing_through():  # the activation's own derivative, not the rule again
                leaf = x.detach().requires_grad_(True)
                (gradient,) = torch.autograd.grad(ctx.function(leaf, **ctx.arguments), leaf, gradient)
        return gradient, None, None, None, None, None


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


class _ReluRuleMode(hooks.RuleMode):
    def __init__(self, rule: str, relu_only: bool = False) -> None:
        super().__init__()
        self.rule = rule
        self.relu_only = relu_only
        self.relu_calls = 0
        self.ruled_calls = 0  # other activations given the rule
        self.other_activations: set[str] = set()  # activations refused

    def rule_call(self, func, args, kwargs):
        if func in _RELUS or func in _INPLACE_RELUS:
            inplace = func in _INPLACE_RELUS or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            self.relu_calls += 1
            return _RuleReLU.apply(args[0], inplace, self.rule)
        if func in _RULED:
            name, function, _, _ = _RULED[func]
            arguments, inplace = _arguments(func, args, kwargs)
            if function is F.hardtanh and float(arguments.get("min_val", -1.0)) != 0.0:
                self.other_activations.add("Hardtanh")  # a clip from below zero is no rectifier
            elif self.relu_only:
                self.other_activations.add(name)
            else:
                self.ruled_calls += 1
                return _RuleActivation.apply(args[0], function, arguments, inplace, self.rule, self)
        elif func in _UNRULED:
            self.other_activations.add(_UNRULED[func])
        return func(*args, **kwargs)


@contextmanager
def relu_rule(rule: str, method: str, relu_only: bool = False) -> Iterator[_ReluRuleMode]:
    """Run a forward (and its backward) with `rule` in place of every activation's gradient
    (ReLUs only with ``relu_only``).

    Raises ``ConfigError`` after the block if the forward used an activation with no rule, or none at all.
    """
    if rule not in RULES:
        raise ConfigError(f"unknown ReLU rule '{rule}'; choose one of: {', '.join(RULES)}")
    mode = _ReluRuleMode(rule, relu_only)
    with mode:
        yield mode
    if mode.other_activations:
        names = ", ".join(sorted(mode.other_activations))
        if relu_only:
            raise ConfigError(f"{method} with relu_only=true defines its backward rule for ReLU only, but this model also uses {names}: "
                              f"the map would be silently wrong. Drop relu_only (the rule for other activations is f'(x)·relu(g)), "
                              f"or use a method without backward rules (saliency).")
        raise ConfigError(f"{method} has no backward rule for {names}, which this model uses: the map would be silently wrong. "
                          f"Rules exist for ReLU, GELU, SiLU, Hardswish, Mish, ELU, LeakyReLU and ReLU6; "
                          f"use a method without backward rules (saliency).")
    if mode.relu_calls == 0 and mode.ruled_calls == 0:
        raise ConfigError(f"{method} found no ReLU or other activation in the model's forward pass (up to the target): "
                          f"there is nothing for its rule to change")
