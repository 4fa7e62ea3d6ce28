"""Gradient saliency (Simonyan, Vedaldi & Zisserman 2014, "Deep Inside Convolutional Networks").

    M(x) = max_c |dS(x)/dx_c|

S is the target's score: a class logit (pre-softmax, as in the paper), a channel's summed activation,
or one neuron. Matches captum's ``Saliency(abs=True)`` followed by the max over colour channels.
"""
from __future__ import annotations

from vizkit.probes.gradients import ChannelReductionConfig, input_gradient, reduce_channels
from vizkit.methods.base import AttributionMethod


class SaliencyConfig(ChannelReductionConfig):
    """saliency's fields: ``reduce`` over colour channels."""


class Saliency(AttributionMethod):
    name = "saliency"
    description = "gradient saliency |dS/dx|, max over colour channels (Simonyan et al. 2014)"
    Config = SaliencyConfig
    target_kinds = frozenset({"class", "channel", "neuron"})

    def compute(self, model, x, target, pixels):
        return reduce_channels(input_gradient(model, x, target), self.config.reduce)

    compute_targets = compute  # a target set: one forward, K batched backwards, [B, K, C, H, W] reduced alike
