"""Layer-CAM (Jiang et al. 2021, "LayerCAM: Exploring Hierarchical Class Activation Maps for
Localization", IEEE TIP).

Each activation is weighed by its own positive gradient, so shallow layers, whose gradients are not
uniform over the image, give fine maps too. With A a layer's activation (``[B,K,h,w]``, channels
first) and g = dS/dA the gradient of the target's score S there:

    L = ReLU( sum_k ReLU(g_k) * A_k )        (elementwise, per position)

then upsampled bilinearly to the input's size, as every CAM here. One layer's map keeps the score's
units, as Grad-CAM's.

``layers=[a,b,...]`` combines several layers as pytorch-grad-cam combines its ``target_layers``
(``BaseCAM.compute_cam_per_layer``, ``aggregate_multi_layers``, ``scale_cam_image``): each layer's
map is rectified, min-max scaled to [0, 1] at the layer's own resolution, upsampled to the input's
size, and the layers' maps are averaged. That map is unitless, in [0, 1]: each layer's map is in the
score's units, but their ranges differ from layer to layer, and only their shapes are averaged. Scaling
before upsampling is what pytorch-grad-cam does, and it is not the same as scaling after: an
interior extreme of the layer's map is blurred by the upsampling, so the two differ where layers mix.
pytorch-grad-cam then min-max scales the mean once more; we leave the mean as it is (a positive
affine map of ours gives pytorch-grad-cam's). A constant layer map (nothing positive) counts as 0.
Each layer costs one forward and one backward (that stops at it); pytorch-grad-cam runs one forward
and one full backward for all of them.

This is pytorch-grad-cam's ``LayerCAM`` (1.5.7), one layer or several, up to its per-image min-max
scaling of the map (``vizkit.methods.attribution.gradcam`` says why that scaling is all that separates
the maps) and its 1e-7 in each layer's scaling. torchcam's ``LayerCAM`` weighs the same way but fuses
layers otherwise (``fuse_cams``): each layer's map (min-max scaled by default) passed through
tanh(2 * map), the paper's eq. 9 for shallow layers, upsampled, and the layers' elementwise maximum
taken; we follow pytorch-grad-cam.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vizkit.core.errors import ConfigError
from vizkit.core.models import default_layer, find_layer
from vizkit.methods.attribution.cam import CamConfig, CamInputs, CamMethod


@dataclass
class LayerCamConfig(CamConfig):
    """layer, layout, relu (``CamConfig``) and ``layers``."""

    layers: list[str] = field(default_factory=list)  # several layers' maps, each scaled to [0, 1], averaged; [] = just `layer`

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layers, str):
            raise ConfigError(f"layers is a list of layer names, e.g. layers=[{self.layers}]")
        self.layers = list(self.layers)
        bad = [name for name in self.layers if not isinstance(name, str) or not name]
        if bad or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers must name distinct layers, e.g. layers=[layer3,layer4]; got {self.layers}")
        if self.layers and self.layer:
            raise ConfigError(f"give layer={self.layer} or layers={self.layers}, not both")


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map ``[B,1,h,w]`` scaled to [0, 1]; a constant map becomes 0."""
    low, high = maps.amin((2, 3), keepdim=True), maps.amax((2, 3), keepdim=True)
    span = high - low
    return (maps - low) / torch.where(span > 0, span, 1)


class LayerCam(CamMethod):
    name = "layercam"
    description = "Layer-CAM: a layer's activations times their positive gradients; several layers averaged (Jiang et al. 2021)"
    Config = LayerCamConfig

    def layer_names(self, model) -> list[str]:
        return self.config.layers or [self.config.layer or default_layer(model)]

    def check(self, model):
        for layer in self.layer_names(model):
            find_layer(model, layer)

    def weights(self, inputs: CamInputs) -> torch.Tensor:
        return inputs.gradient.clamp_min(0)  # per position: [B,K,h,w]

    def compute(self, model, x, target, pixels):
        layers = self.layer_names(model)
        if len(layers) == 1:
            return self.layer_map(model, x, target, layers[0])
        maps = []
        for layer in layers:
            cam = self.combine(self.capture(model, x, target, layer))
            if self.config.relu:
                cam = cam.clamp_min(0)
            maps.append(F.interpolate(min_max(cam), size=x.shape[-2:], mode="bilinear", align_corners=False))
        return torch.stack(maps).mean(0)
