"""Guided backpropagation (Springenberg, Dosovitskiy, Brox & Riedmiller 2015, "Striving for Simplicity").

The gradient of the target's score, except that each ReLU passes a gradient back only where both its
forward input and the incoming gradient are positive, and any other activation passes its local
derivative times the positive part of the incoming gradient, ``f'(x)·relu(g)`` (``vizkit.probes.relu_rules``:
GELU, SiLU, Hardswish, Mish, ELU, LeakyReLU, ReLU6; on a ReLU this is the paper's rule exactly). Works
with modules, in-place modules and functional calls; refuses activations it has no rule for rather than
return a silently wrong map, and every non-ReLU one with ``relu_only=true``. On ReLU networks with
``reduce=none`` the [B,3,H,W] result equals captum's ``GuidedBackprop``.
"""
from __future__ import annotations

from dataclasses import dataclass

from vizkit.probes.gradients import ChannelReductionConfig, input_gradient, reduce_channels
from vizkit.methods.base import AttributionMethod
from vizkit.probes.relu_rules import ActivationRuleConfig, relu_rule


@dataclass
class GuidedBackpropConfig(ChannelReductionConfig, ActivationRuleConfig):
    """guided_backprop's fields: ``reduce`` over colour channels, ``relu_only``."""


class GuidedBackprop(AttributionMethod):
    name = "guided_backprop"
    description = "guided backpropagation: gradients through ReLUs gated forward and backward (Springenberg et al. 2015)"
    Config = GuidedBackpropConfig
    target_kinds = frozenset({"class", "channel", "neuron"})
    rule = "guided"

    def compute(self, model, x, target, pixels):
        with relu_rule(self.rule, self.name, self.config.relu_only):
            gradient = input_gradient(model, x, target)
        return reduce_channels(gradient, self.config.reduce)

    compute_targets = compute  # a target set: one forward, K backwards of the same graph
