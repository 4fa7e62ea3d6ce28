"""FullGrad (Srinivas & Fleuret 2019, "Full-Gradient Representation for Neural Network Visualization",
NeurIPS).

A piecewise-linear network (ReLU, max-pooling, batch norms in eval mode) is, around x,
f(x) = grad_x f . x + sum_l grad_{b_l} f . b_l: the input's gradient times the input, plus every bias
times its gradient (the tests check this sum against the logit). FullGrad maps both parts. With g = dS/dx
the gradient of the target's score S (a class logit) at the input x (``[B,3,H,W]``, the model's input
space), and for each bias layer l its bias b_l (``[K]``) and G_l = dS/dz_l the gradient at its output
z_l (``[B,K,h,w]``, channels first), so that b_l,k G_l,k = grad_{b_l,k} f per position:

    psi(t)   = upsample( rescale( |t| ) )        rescale: (t - min t) / (max t - min t + eps), per map
    FullGrad = sum_c psi(x_c g_c) + sum_l sum_k psi(b_l,k G_l,k)

each map t being one image's colour channel c, or one channel k of one layer, rescaled to [0, 1] at its
own resolution, then upsampled bilinearly (align_corners=False) to the input's size: the paper's eq.
with its post-processing operator psi = bilinearUpsample(rescale(abs(.))), applied per channel as its
sum over c in c_l writes it. The map is unitless, between 0 and 3 + the layers' channel count; it is
not scaled further, so a positive affine map of it gives any [0, 1] version. A classifier's Linear
bias has no positions and no map (the authors' code keeps only the bias-gradients shaped like images).

The layers (``layers``, default: every ``nn.Conv2d`` and ``nn.BatchNorm2d`` of exactly that type with
a bias, in ``named_modules`` order, the layers pytorch-grad-cam's ``FullGrad`` takes; a listed layer
may also be a subclass of those, an ``nn.Linear``, ``nn.LayerNorm`` or ``nn.GroupNorm``). A
batch norm's bias is its effective one in eval mode, beta - mean * gamma / sqrt(var + eps) (its
output is (gamma / sqrt(var + eps)) z + that), as the authors' code and pytorch-grad-cam compute it;
a layer normalization's is its beta, where the decomposition above is no longer exact (its output is
not affine in its input). A default layer that the forward never reaches (a channel target stops the
forward at its layer) or that the score does not depend on has G = 0 and contributes nothing; a listed
one is refused. Cost: one forward and one backward to the input.

This is pytorch-grad-cam's ``FullGrad`` (1.5.7) with the default ``layers``: the same layers,
effective biases, abs, per-channel min-max scaling before the resize (with its 1e-7: ``eps``) and
bilinear resize (cv2's, half-pixel centres), summed over channels and layers, up to its final per-image
min-max scaling of the sum, which we leave out (as for Layer-CAM's several layers). Rescaling each
channel and summing over channels before upsampling (bilinear upsampling is linear) costs one upsample
per layer instead of one per channel; only rounding differs. The eps is not scale-free: a channel whose
|b G| spans r is scaled to at most r / (r + eps) instead of 1 (1 % less at r = 1e-5); against ``eps=0``,
the paper's rescale (a constant map, from a 1x1 output or a zero bias, as 0), it moved random-weight
resnet18's map by 1.3e-4 of its [0, 1] scale. The authors' code
(idiap/fullgrad-saliency) rescales each layer as one map, all its channels together (eps 1e-6), and
upsamples with align_corners=True; we follow the paper's per-channel psi, as pytorch-grad-cam does.
torchcam has no FullGrad.

Layouts: a layer's gradient is read channels first as every CAM reads its activation (``layout``:
a ViT's tokens over the patch grid, an NHWC stage); with ``layout=auto`` a 4-D output whose axis 1
does not hold the bias's channels but whose last axis does is read as NHWC (a Linear inside a
ConvNeXt block).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vizkit.core.errors import ConfigError
from vizkit.core.layouts import LAYOUTS, layout_of
from vizkit.core.models import find_layer
from vizkit.methods.attribution.cam import CamMethod, feature_map, layers_activations_and_gradients

BIAS_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.LayerNorm, nn.GroupNorm)


@dataclass
class FullGradConfig:
    layers: list[str] = field(default_factory=list)  # the bias layers; [] = every Conv2d and BatchNorm2d with a bias (pytorch-grad-cam's)
    layout: str = "auto"  # of the layers' outputs: auto, nchw, nhwc, tokens (as every CAM's)
    eps: float = 1e-7  # added to each map's range before rescaling: 1e-7 = pytorch-grad-cam's; 0 = the paper's rescale

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            raise ConfigError(f"layers is a list of layer names, e.g. layers=[{self.layers}]")
        self.layers = list(self.layers)
        bad = [name for name in self.layers if not isinstance(name, str) or not name]
        if bad or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers must name distinct layers, e.g. layers=[layer3.0.bn1,layer4.1.bn2]; got {self.layers}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got '{self.layout}'")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not 0 <= self.eps < float("inf"):
            raise ConfigError(f"eps must be a number >= 0, got {self.eps!r}")


def default_bias_layers(model: nn.Module) -> list[str]:
    """pytorch-grad-cam's choice: every ``nn.Conv2d`` and ``nn.BatchNorm2d`` (that exact type: not
    timm's BatchNormAct2d, whose output is after its activation) with a bias."""
    return [name for name, module in model.named_modules()
            if type(module) in (nn.Conv2d, nn.BatchNorm2d) and module.bias is not None]


def layer_bias(module: nn.Module, layer: str) -> torch.Tensor:
    """The bias ``[K]`` the layer adds to each output channel (a batch norm's effective one, from its
    running statistics), detached, or a one-line refusal."""
    if not isinstance(module, BIAS_LAYERS):
        raise ConfigError(f"fullgrad: layer '{layer}' is a {type(module).__name__}; a bias layer is a Conv2d, BatchNorm2d, "
                          f"Linear, LayerNorm or GroupNorm")
    act = getattr(module, "act", None)
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        raise ConfigError(f"fullgrad: layer '{layer}' ({type(module).__name__}) applies an activation after its bias; "
                          f"its output is not bias plus a linear map")
    if isinstance(module, nn.BatchNorm2d):
        if module.running_mean is None or module.running_var is None:
            raise ConfigError(f"fullgrad: batch norm '{layer}' keeps no running statistics, so its bias depends on the batch")
        scale = module.running_mean if module.weight is None else module.running_mean * module.weight
        shift = -(scale / torch.sqrt(module.running_var + module.eps))  # pytorch-grad-cam's operations, in its order
        return (shift if module.bias is None else shift + module.bias).detach()
    bias = getattr(module, "bias", None)
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1:
        raise ConfigError(f"fullgrad: layer '{layer}' ({type(module).__name__}) has no bias per channel")
    return bias.detach()


def rescale(maps: torch.Tensor, eps: float) -> torch.Tensor:
    """Each map ``[B,K,h,w]`` -> (t - min t) / (max t - min t + eps), per (input, channel); a constant
    map (with eps 0) becomes 0."""
    shifted = maps - maps.amin((2, 3), keepdim=True)
    span = shifted.amax((2, 3), keepdim=True) + eps
    return shifted / torch.where(span > 0, span, 1)


class FullGrad(CamMethod):
    name = "fullgrad"
    description = "FullGrad: input-gradient times input and every bias times its gradient, each channel rescaled, summed (Srinivas & Fleuret 2019)"
    Config = FullGradConfig

    def layer_names(self, model: nn.Module) -> list[str]:
        return self.config.layers or default_bias_layers(model)

    def check(self, model: nn.Module) -> None:
        for layer in self.config.layers:
            layer_bias(find_layer(model, layer), layer)

    def compute(self, model, x, target, pixels):
        self.check(model)
        layers, size, eps = self.layer_names(model), x.shape[-2:], self.config.eps
        gradients, input_gradient = layers_activations_and_gradients(  # the activations are not needed
            model, x, target, layers, self.name, input_gradient=True, required=bool(self.config.layers),
            choose="method.layers=[...]")[1:]
        total = rescale((input_gradient.float() * x.float()).abs(), eps).sum(1, keepdim=True)  # sum_c psi(x_c g_c)
        for layer, gradient in zip(layers, gradients):
            if gradient is None:  # a default layer the score does not reach: G = 0
                continue
            bias = layer_bias(find_layer(model, layer), layer).float()
            gradient = self.channels_first(gradient, model, layer, size, bias.numel())
            term = rescale((bias.view(1, -1, 1, 1) * gradient.float()).abs(), eps).sum(1, keepdim=True)  # sum_k, at (h, w)
            total = total + F.interpolate(term, size=size, mode="bilinear", align_corners=False)
        return total

    def channels_first(self, gradient: torch.Tensor, model: nn.Module, layer: str, size, channels: int) -> torch.Tensor:
        """The gradient at the layer's output as ``[B,K,h,w]``, K its bias's channels, or a refusal."""
        layout = layout_of(gradient, model, layer, size, self.config.layout)
        if self.config.layout == "auto" and gradient.dim() == 4:
            counts = {"nchw": gradient.shape[1], "nhwc": gradient.shape[-1]}
            layout = next((name for name in (layout, "nchw", "nhwc") if counts.get(name) == channels), layout)
        maps = feature_map(gradient, model, layer, size, layout, self.name)
        if maps.shape[1] != channels:
            raise ConfigError(f"fullgrad: layer '{layer}' adds a bias of {channels} channels but its output {tuple(gradient.shape)} "
                              f"has {maps.shape[1]} read as {layout}; set method.layout=nchw, nhwc or tokens")
        return maps
