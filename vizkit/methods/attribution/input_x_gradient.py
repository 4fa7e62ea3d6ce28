"""Input x gradient (Shrikumar et al. 2016, "Not Just a Black Box"): the gradient of the target's
score times the input, element-wise, in the model's input space:

    M(x) = sum_c x_c * dS(x)/dx_c

One forward and one backward to the input. Equals captum's ``InputXGradient`` (``reduce=none`` keeps
its [B,3,H,W]). The input is the normalized one the model sees, so a pixel at the dataset mean has
attribution 0: that is the implicit baseline; ``integrated_gradients`` makes the baseline explicit.
"""
from __future__ import annotations

from dataclasses import dataclass

from vizkit.probes.gradients import ChannelReductionConfig, input_gradient, reduce_channels
from vizkit.methods.base import AttributionMethod


@dataclass
class InputXGradientConfig(ChannelReductionConfig):
    reduce: str = "sum"  # the signed sum over colour channels; max_abs, abs_sum, none


class InputXGradient(AttributionMethod):
    name = "input_x_gradient"
    description = "input times gradient, summed over colour channels (Shrikumar et al. 2016)"
    Config = InputXGradientConfig
    target_kinds = frozenset({"class", "channel", "neuron"})

    def compute(self, model, x, target, pixels):
        gradient = input_gradient(model, x, target)
        if gradient.dim() == 5:  # a target set's [B, K, C, H, W]
            x = x.unsqueeze(1)
        return reduce_channels(x * gradient, self.config.reduce)

    compute_targets = compute  # a target set: one forward, K batched backwards
