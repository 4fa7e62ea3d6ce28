"""Smooth Grad-CAM++ (Omeiza, Speakman, Cintas & Weldemariam 2019, "Smooth Grad-CAM++: An Enhanced
Inference Level Visualization Technique for Deep Convolutional Neural Network Models").

Grad-CAM++ (``vizkit.methods.attribution.gradcam_plus_plus``) with each of its derivatives averaged over
noisy copies of the input, as SmoothGrad averages a saliency map. With x_m = x + sigma * eps_m (m = 1..n,
eps_m standard normal, sigma = ``noise_std`` in the model's input space), g_m = dS/dA at the layer for
x_m, A the layer's activation for the clean x (``[B,K,h,w]``, channels first) and eps the ``eps`` field:

    D1 = 1/n sum_m g_m      D2 = 1/n sum_m g_m^2      D3 = 1/n sum_m g_m^3
    alpha_k[i, j] = D2_k[i, j] / (2 D2_k[i, j] + (sum_ab A_k[a, b]) D3_k[i, j] + eps)   (0 where D2 = 0)
    w_k           = sum_ij alpha_k[i, j] * ReLU(D1_k[i, j])
    L             = ReLU( sum_k w_k * A_k )

then upsampled bilinearly to the input's size, as every CAM here. Every derivative in Grad-CAM++'s
weights is replaced by its mean over the noisy copies, the first one in the ReLU included (our reading
of the paper's averaged derivatives); the activation is the clean input's. With ``samples=1`` and
``noise_std=0`` this is ``gradcam_plus_plus`` exactly (and so pytorch-grad-cam's ``GradCAMPlusPlus``).
The paper prints alpha's numerator as the mean first derivative; torchcam's docstring calls that a
slip and uses D2, which is what gives Grad-CAM++'s alpha back for one noiseless sample: we follow that
correction. As in the paper and torchcam, g^2 and g^3 stand for the second and third derivatives of
exp(S) (Grad-CAM++'s closed form), whose exp(S_m) factors no longer cancel once averaged over copies with
different scores; they are left out, as everywhere.

Noise comes from a ``torch.Generator`` seeded with ``seed``: one ``[C,H,W]`` standard normal draw per
sample, in order, the same for every input of the batch, so an input gets the same map whatever
``batch_size`` and whichever inputs share its batch, and the global RNG is untouched (as ``smoothgrad``).
For one input on the CPU these are the draws torchcam's ``SmoothGradCAMpp`` makes after ``torch.manual_seed(seed)``
(``Normal(0, std).sample`` of the input's shape per sample, from the global RNG); for a batch torchcam
draws each input its own noise. The defaults, 4 samples of std 0.3, are torchcam's: 0.3 is in the
model's normalized input space, about 0.07 of the [0, 1] pixel range under ImageNet's normalization. Noisy copies are evaluated ``batch_size`` at a time. Cost: ``samples``
forwards and backwards (stopping at the layer) and one forward for the clean activation.

torchcam's ``SmoothGradCAMpp`` (0.5.0) differs in three ways, each checked by the tests against its
output on the same noise: its alpha sums g^3 A over the positions, D2 / (2 D2 + sum_ab D3[a, b]
A[a, b] + 1e-8), instead of the paper's sum of A times D3 at (i, j) (its ``GradCAMpp`` does the same;
the paper, the Grad-CAM++ authors' code and pytorch-grad-cam do not); and, because its hooks keep
recording during the noisy passes, its weights take ReLU of the last copy's gradient g_n instead of D1,
and its map weighs the last copy's activation A_n instead of the clean A. We follow the paper (and
Grad-CAM++ as ``gradcam_plus_plus`` computes it, its eps = 1e-6 included): torchcam's denominator is
not Grad-CAM++'s, and its last-copy terms make the map depend on the order of the draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vizkit.core.errors import ConfigError
from vizkit.core.validate import positive_integers
from vizkit.core.layouts import layout_of
from vizkit.methods.attribution.cam import CamInputs, CamMethod, feature_map, layer_activation_and_gradient
from vizkit.methods.attribution.gradcam_plus_plus import GradCamPlusPlusConfig


@dataclass
class SmoothGradCamPlusPlusConfig(GradCamPlusPlusConfig):
    """layer, layout, relu (``CamConfig``), eps (``GradCamPlusPlusConfig``) and the noise's fields."""

    samples: int = 4  # noisy copies averaged (the paper's n; torchcam's num_samples default)
    noise_std: float = 0.3  # the noise's standard deviation in the model's input space (torchcam's std default)
    batch_size: int = 8  # noisy copies per forward/backward pass
    seed: int = 0  # of the noise's own generator

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_integers(self, "samples", "batch_size")
        if isinstance(self.noise_std, bool) or not isinstance(self.noise_std, (int, float)) or not 0 <= self.noise_std < math.inf:
            raise ConfigError(f"noise_std must be a number >= 0 (the noise's standard deviation in the model's input space), got {self.noise_std!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class SmoothCamInputs(CamInputs):
    """``CamInputs`` with ``gradient`` the mean gradient D1 over the noisy copies, and the means of its
    square and cube, D2 and D3 (``[B,K,h,w]``, channels first, float32); ``activation`` is the clean input's."""

    gradient_2: torch.Tensor | None = None
    gradient_3: torch.Tensor | None = None


class SmoothGradCamPlusPlus(CamMethod):
    name = "smoothgradcam_plus_plus"
    description = "Smooth Grad-CAM++: Grad-CAM++ with its gradients' powers averaged over noisy copies of the input (Omeiza et al. 2019)"
    Config = SmoothGradCamPlusPlusConfig

    def capture(self, model, x, target, layer: str) -> SmoothCamInputs:
        """The clean activation and the noisy copies' D1, D2, D3 at ``layer``."""
        config = self.config
        activation, _ = layer_activation_and_gradient(model, x, target, layer, self.name, gradient=False)
        layout = layout_of(activation, model, layer, x.shape[-2:], config.layout)
        batch = x.shape[0]
        generator = torch.Generator(device=x.device).manual_seed(config.seed)
        per_pass = max(1, config.batch_size // batch)  # samples of every input per pass
        sums: list[torch.Tensor] = []
        for first in range(0, config.samples, per_pass):
            count = min(per_pass, config.samples - first)
            # one draw per sample (torch's CPU normal_ fills blocks of 16 values, so one [count,C,H,W] draw
            # would differ from count [1,C,H,W] draws), the same for every input
            noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype) for _ in range(count)])
            rows = torch.arange(batch, device=x.device).repeat(count)  # sample-major
            noisy = x[rows] + config.noise_std * noise.repeat_interleave(batch, 0)
            _, grad = layer_activation_and_gradient(model, noisy, target.take(rows), layer, self.name)
            grad = feature_map(grad, model, layer, x.shape[-2:], layout, self.name).float()
            for sample in grad.view(count, batch, *grad.shape[1:]):  # summed one sample after another, in order,
                square = sample * sample  # so the sums do not depend on batch_size
                powers = (sample, square, square * sample)
                sums = list(powers) if not sums else [total + power for total, power in zip(sums, powers)]
        mean, mean_2, mean_3 = (total / config.samples for total in sums)
        return SmoothCamInputs(
            activation=feature_map(activation, model, layer, x.shape[-2:], layout, self.name).float(), gradient=mean,
            model=model, x=x, target=target, layer=layer, layout=layout, gradient_2=mean_2, gradient_3=mean_3)

    def weights(self, inputs: SmoothCamInputs) -> torch.Tensor:
        grad_2, grad_3 = inputs.gradient_2, inputs.gradient_3
        total = inputs.activation.sum((2, 3), keepdim=True)  # sum_ab A_k[a, b], the clean input's
        denominator = 2 * grad_2 + total * grad_3 + self.config.eps
        alpha = torch.where((grad_2 != 0) & (denominator != 0), grad_2 / denominator, 0)
        return (inputs.gradient.clamp_min(0) * alpha).sum((2, 3), keepdim=True)  # w_k
