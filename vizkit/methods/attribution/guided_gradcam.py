"""Guided Grad-CAM (Selvaraju et al. 2017, sec. 3.1): guided backpropagation's gradient, multiplied
pixel by pixel with the Grad-CAM map upsampled to the input's size:

    M = reduce_c( G_c(x) * upsample(L_GradCAM) )

high-resolution like guided backprop, class-discriminative like Grad-CAM. Costs both methods' passes
(two forwards, two backwards): the guided ReLU rule changes every gradient above the layer too, so the
two backwards cannot share a graph. captum's ``GuidedGradCam`` upsamples with nearest-neighbour by
default; this one is bilinear, as the paper and ``gradcam``.
"""
from __future__ import annotations

from dataclasses import dataclass

from vizkit.probes.gradients import ChannelReductionConfig, input_gradient, reduce_channels
from vizkit.methods.attribution.gradcam import GradCam, GradCamConfig
from vizkit.methods.base import AttributionMethod
from vizkit.probes.relu_rules import ActivationRuleConfig, relu_rule


@dataclass
class GuidedGradCamConfig(GradCamConfig, ChannelReductionConfig, ActivationRuleConfig):
    """guided_gradcam's fields: Grad-CAM's ``layer``/``layout``/``relu``, ``reduce`` over colour channels and
    ``relu_only`` (guided backprop's)."""

    def __post_init__(self) -> None:
        GradCamConfig.__post_init__(self)
        ChannelReductionConfig.__post_init__(self)


class GuidedGradCam(AttributionMethod):
    name = "guided_gradcam"
    description = "guided Grad-CAM: guided backprop times the upsampled Grad-CAM map (Selvaraju et al. 2017)"
    Config = GuidedGradCamConfig
    target_kinds = frozenset({"class", "channel", "neuron"})

    def check(self, model):
        self._gradcam().check(model)

    def _gradcam(self) -> GradCam:
        return GradCam(layer=self.config.layer, layout=self.config.layout, relu=self.config.relu)

    def compute(self, model, x, target, pixels):
        config = self.config
        cam = self._gradcam().compute(model, x, target, pixels)
        with relu_rule("guided", self.name, config.relu_only):
            guided = input_gradient(model, x, target)
        return reduce_channels(guided * cam, config.reduce)
