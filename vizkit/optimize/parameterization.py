"""Image parameterizations: what the optimizer changes when it draws a picture for a unit.

Each one is an ``nn.Module`` whose only parameters are the image's and whose ``forward()`` returns a
batch of valid pixels [B,3,H,W] in [0, 1]; the model's normalization is applied elsewhere.

    pixels   the image itself (Simonyan et al. 2014), kept in [0, 1] by clamping after each step
    fourier  a scaled spectrum with decorrelated colour (Olah et al. 2017), as lucent's
             ``fft_image`` + ``to_valid_rgb(decorrelate=True)``
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vizkit.core.errors import ConfigError

KINDS = ("pixels", "fourier")

# Square root of ImageNet's colour covariance (lucid/lucent ``color_correlation_svd_sqrt``): mixing
# channels with it makes the optimizer's steps decorrelated in colour, as natural images are.
COLOR_CORRELATION_SVD_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))


class ImageParameterization(nn.Module):
    """A batch of images, ``batch`` x 3 x ``height`` x ``width``, drawn from its parameters."""

    batch: int
    height: int
    width: int

    def forward(self) -> torch.Tensor:
        """Pixels [B,3,H,W] in [0, 1], differentiable with respect to the parameters."""
        raise NotImplementedError

    def project_(self) -> None:
        """Bring the parameters back to where they are valid; called after every optimizer step."""


class PixelImage(ImageParameterization):
    """Plain pixels (Simonyan et al. 2014: the image itself is the parameter)."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        if init.dim() != 4 or init.shape[1] != 3:
            raise ConfigError(f"pixel image: init must be pixels shaped [B,3,H,W]; got {list(init.shape)}")
        self.batch, _, self.height, self.width = init.shape
        self.pixels = nn.Parameter(init.detach().to(torch.float32).clamp(0.0, 1.0).clone())

    def forward(self) -> torch.Tensor:
        return self.pixels

    @torch.no_grad()
    def project_(self) -> None:
        # Clamping (projected gradient ascent) rather than a sigmoid keeps the gradient the plain
        # image gradient of the paper.
        self.pixels.clamp_(0.0, 1.0)


class FourierImage(ImageParameterization):
    """Fourier-space parameterization with decorrelated colour (Olah et al. 2017, "Feature
    Visualization", Distill; as lucent's ``fft_image`` + ``to_valid_rgb(decorrelate=True)``).

    image  = irfft2(spectrum * s, norm="ortho") / 4,  s = 1 / max(|f|, 1 / max(H, W)) ** decay_power
    pixels = sigmoid(C @ image)  over channels,  C = colour correlation / its largest column norm

    Scaling down high frequencies makes a gradient step change low frequencies as much as high ones,
    so the optimizer no longer favours the high-frequency patterns that pixel images drift into.
    """

    def __init__(
        self,
        batch: int,
        height: int,
        width: int,
        *,
        decay_power: float = 1.0,
        scale: float = 0.01,
        generator: torch.Generator | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        if min(batch, height, width) < 1:
            raise ConfigError(f"fourier image: batch, height and width must be positive; got {batch}, {height}, {width}")
        self.batch, self.height, self.width = batch, height, width
        frequencies_y = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
        frequencies_x = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]
        frequencies = torch.sqrt(frequencies_x**2 + frequencies_y**2)  # [H, W//2+1]
        # lucent's scale; lucid also multiplies by sqrt(H*W) but pairs it with an unnormalized inverse
        # FFT, which is the same transform as this orthonormal one without the factor.
        spectrum_scale = 1.0 / frequencies.clamp(min=1.0 / max(height, width)) ** decay_power
        self.register_buffer("spectrum_scale", spectrum_scale.to(torch.float32).to(device), persistent=False)
        correlation = torch.tensor(COLOR_CORRELATION_SVD_SQRT, dtype=torch.float32)
        color_mixing = correlation / correlation.norm(dim=0).max()
        self.register_buffer("color_mixing", color_mixing.to(device), persistent=False)
        shape = (batch, 3, *frequencies.shape, 2)  # last axis: real, imaginary
        spectrum = torch.randn(shape, generator=generator, dtype=torch.float32, device=_generator_device(generator))
        self.spectrum = nn.Parameter((spectrum * scale).to(device))

    def forward(self) -> torch.Tensor:
        scaled = torch.view_as_complex(self.spectrum) * self.spectrum_scale
        image = torch.fft.irfft2(scaled, s=(self.height, self.width), norm="ortho") / 4.0  # lucid's constant
        rgb = torch.einsum("ck,bkhw->bchw", self.color_mixing, image)
        return torch.sigmoid(rgb)


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def make_image(
    kind: str,
    batch: int,
    height: int,
    width: int,
    *,
    init: torch.Tensor | None = None,
    seed: int = 0,
    device: Any = None,
) -> ImageParameterization:
    """The parameterization `kind` for a batch of images. ``pixels`` starts from `init` ([B,3,H,W] or
    [3,H,W] pixels, broadcast over the batch) or mid-gray; ``fourier`` from noise seeded by `seed`
    (its own generator: the global RNG is left alone)."""
    if kind == "pixels":
        if init is None:
            init = torch.full((batch, 3, height, width), 0.5, device=device)
        elif init.dim() == 3:
            init = init.unsqueeze(0)
        if init.dim() != 4 or init.shape[1:] != (3, height, width) or init.shape[0] not in (1, batch):
            raise ConfigError(
                f"pixel image: init shaped {list(init.shape)} does not fit a batch of {batch} images of "
                f"3x{height}x{width}; give [{batch},3,{height},{width}] or [3,{height},{width}]"
            )
        return PixelImage(init.expand(batch, 3, height, width).to(device))
    if kind == "fourier":
        if init is not None:
            raise ConfigError("fourier image: init is only for the 'pixels' parameterization; fourier starts from seeded noise")
        generator = torch.Generator().manual_seed(seed)
        return FourierImage(batch, height, width, generator=generator, device=device)
    raise ConfigError(f"unknown image parameterization '{kind}'; choose {', '.join(KINDS)}")
