"""Grad-CAM++ (Chattopadhyay et al. 2018, "Grad-CAM++: Generalized Gradient-Based Visual Explanations for
Deep Convolutional Networks", WACV).

Each channel's weight sums its positive gradients, each weighed by a coefficient alpha that gives small
but widespread evidence its share. With A the layer's activation (``[B,K,h,w]``, channels first),
g = dS/dA the gradient of the target's score S (a class logit) there, and eps the ``eps`` field:

    alpha_k[i, j] = g_k[i, j]^2 / (2 g_k[i, j]^2 + (sum_ab A_k[a, b]) g_k[i, j]^3 + eps)   (0 where g = 0)
    w_k           = sum_ij alpha_k[i, j] * ReLU(g_k[i, j])
    L             = ReLU( sum_k w_k * A_k )

then upsampled bilinearly to the input's size, as every CAM here. alpha is the paper's eq. 19 with the
higher derivatives of exp(S) written through the first (its closed form for a network piecewise linear
in A): the exp(S) factors cancel inside alpha; the paper's weights keep one, a positive number per
input, which this map (like pytorch-grad-cam's) leaves out, so it keeps Grad-CAM's units.

This is pytorch-grad-cam's ``GradCAMPlusPlus`` (1.5.7) operation for operation, its eps = 1e-6
included, up to its per-image min-max scaling of the map (``vizkit.methods.attribution.gradcam`` says
why that scaling is all that separates the maps). That eps is not scale-free: it competes with 2 g^2, so
where the gradients are small it changes the weights (random-weight resnet18's ``layer4`` at 64 px:
median g^2 = 3e-5, 30 times eps), and where g^2 falls below it (|g| < 1e-3) it dominates and the
weights tend to sum ReLU(g)^3 / eps. ``eps=0`` gives eq. 19 as written, without an eps as in the authors'
code (a vanishing denominator gives alpha = 0).

The sum over (a, b) multiplies the activation's total with the gradient at (i, j), as in eq. 19, the
authors' code and pytorch-grad-cam. torchcam's ``GradCAMpp`` differs: its denominator sums
g[a, b]^3 A[a, b] over the positions instead, and its source divides alpha in place on a masked copy
(``alpha[idx][mask].div_(...)``, a no-op), so its weights are sum_ij g^2 ReLU(g). We follow the paper
and pytorch-grad-cam, the reference the tests compare with.

Where the layer's activation is a ReLU's (a ResNet stage, a VGG block) sum_ab A >= 0 and the
denominator of every positive gradient is at least 2 g^2; at a layer with signed activations (a batch
norm, a transformer's norm) it can vanish and the weights blow up, as in every implementation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vizkit.core.errors import ConfigError
from vizkit.methods.attribution.cam import CamConfig, CamInputs, CamMethod


@dataclass
class GradCamPlusPlusConfig(CamConfig):
    """layer, layout, relu (``CamConfig``) and ``eps``."""

    eps: float = 1e-6  # added to alpha's denominator: 1e-6 = pytorch-grad-cam's; 0 = the paper's eq. 19 as written

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not self.eps >= 0:
            raise ConfigError(f"eps must be a number >= 0, got {self.eps!r}")


class GradCamPlusPlus(CamMethod):
    name = "gradcam_plus_plus"
    description = "Grad-CAM++: a layer's activations weighted by their positive gradients, each weighed by alpha (Chattopadhyay et al. 2018)"
    Config = GradCamPlusPlusConfig

    def weights(self, inputs: CamInputs) -> torch.Tensor:
        grad, activation = inputs.gradient, inputs.activation
        grad_2 = grad**2
        grad_3 = grad_2 * grad
        total = activation.sum((2, 3), keepdim=True)  # sum_ab A_k[a, b]
        denominator = 2 * grad_2 + total * grad_3 + self.config.eps
        alpha = torch.where((grad != 0) & (denominator != 0), grad_2 / denominator, 0)
        return (grad.clamp_min(0) * alpha).sum((2, 3), keepdim=True)  # w_k
