"""Guided backpropagation (Springenberg, Dosovitskiy, Brox & Riedmiller 2015, "Striving for Simplicity").

The gradient of the target's score, except that each ReLU passes a gradient back only where both its
forward input and the incoming gradient are positive (``vizkit.probes.relu_rules``). Works with ReLU modules,
in-place ReLU modules and functional ReLUs; refuses models with other rectifiers rather than return a
silently wrong map. With ``reduce=none`` the [B,3,H,W] result equals captum's ``GuidedBackprop``.
"""
from __future__ import annotations

from vizkit.probes.gradients import ChannelReductionConfig, input_gradient, reduce_channels
from vizkit.methods.base import AttributionMethod
from vizkit.probes.relu_rules import relu_rule


class GuidedBackpropConfig(ChannelReductionConfig):
    """guided_backprop's fields: ``reduce`` over colour channels."""


class GuidedBackprop(AttributionMethod):
    name = "guided_backprop"
    description = "guided backpropagation: gradients through ReLUs gated forward and backward (Springenberg et al. 2015)"
    Config = GuidedBackpropConfig
    target_kinds = frozenset({"class", "channel", "neuron"})
    rule = "guided"

    def compute(self, model, x, target, pixels):
        with relu_rule(self.rule, self.name):
            gradient = input_gradient(model, x, target)
        return reduce_channels(gradient, self.config.reduce)
