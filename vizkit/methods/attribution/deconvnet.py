"""Deconvnet (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks").

Backpropagate the target's score, but let each ReLU rectify the *gradient* instead of gating it by
the forward activation: ``relu(grad_out)`` (``vizkit.probes.relu_rules``). Same model coverage and checks as
guided backprop; with ``reduce=none`` the result equals captum's ``Deconvolution``.
"""
from __future__ import annotations

from vizkit.probes.gradients import ChannelReductionConfig
from vizkit.methods.attribution.guided_backprop import GuidedBackprop


class DeconvnetConfig(ChannelReductionConfig):
    """deconvnet's fields: ``reduce`` over colour channels."""


class Deconvnet(GuidedBackprop):
    name = "deconvnet"
    description = "deconvnet: backpropagation with ReLUs applied to the gradient (Zeiler & Fergus 2014)"
    Config = DeconvnetConfig
    rule = "deconvnet"
