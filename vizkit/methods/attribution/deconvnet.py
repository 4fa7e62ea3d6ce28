"""Deconvnet (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks").

Backpropagate the target's score, but let each ReLU rectify the *gradient* instead of gating it by
the forward activation: ``relu(grad_out)`` (``vizkit.probes.relu_rules``); every other activation with a
rule (GELU, SiLU, Hardswish, Mish, ELU, LeakyReLU, ReLU6) does the same. Same model coverage, checks and
``relu_only`` field as guided backprop; on ReLU networks with ``reduce=none`` the result equals
captum's ``Deconvolution``.
"""
from __future__ import annotations

from dataclasses import dataclass

from vizkit.probes.gradients import ChannelReductionConfig
from vizkit.probes.relu_rules import ActivationRuleConfig
from vizkit.methods.attribution.guided_backprop import GuidedBackprop


@dataclass
class DeconvnetConfig(ChannelReductionConfig, ActivationRuleConfig):
    """deconvnet's fields: ``reduce`` over colour channels, ``relu_only``."""


class Deconvnet(GuidedBackprop):
    name = "deconvnet"
    description = "deconvnet: backpropagation with ReLUs applied to the gradient (Zeiler & Fergus 2014)"
    Config = DeconvnetConfig
    rule = "deconvnet"
