"""Deconvnet (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks").

Backpropagate the target's score, but let each ReLU rectify the *gradient* instead of gating it by
the forward activation: ``relu(grad_out)`` (``vizkit.relu_rules``). Same model coverage and checks as
guided backprop; with ``reduce=none`` the result equals captum's ``Deconvolution``.
"""
from __future__ import annotations

from dataclasses import dataclass

from vizkit.gradients import check_reduction
from vizkit.methods.attribution.guided_backprop import GuidedBackprop


@dataclass
class DeconvnetConfig:
    reduce: str = "max_abs"  # over colour channels: max_abs, abs_sum, sum, none (the signed RGB reconstruction)

    def __post_init__(self) -> None:
        check_reduction("deconvnet", self.reduce)


class Deconvnet(GuidedBackprop):
    name = "deconvnet"
    description = "deconvnet: backpropagation with ReLUs applied to the gradient (Zeiler & Fergus 2014)"
    Config = DeconvnetConfig
    rule = "deconvnet"
