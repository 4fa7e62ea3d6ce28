"""Reference images in pixel space: what "absence of signal" looks like for integrated gradients'
baseline and for the deletion/insertion substrates.

    black    every pixel 0
    gray     every pixel 0.5
    blur     the image under a Gaussian blur, 11 taps, sigma 5: the RISE authors' insertion substrate
             (Petsiuk et al. 2018); also a baseline for integrated gradients (Sturmfels et al. 2020)
    uniform  uniform noise in [0, 1], from a seeded generator
    PATH     an image file, resized to the input's size (integrated gradients only)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vizkit.core.errors import ConfigError

NAMED = ("black", "gray", "blur", "uniform")


def check_baseline(owner: str, name: str, allow_path: bool) -> None:
    """Config validation: a named baseline, or (where allowed) a path to an existing image file."""
    if name in NAMED:
        return
    if allow_path and Path(name).expanduser().is_file():
        return
    choices = ", ".join(NAMED) + (", or the path of an image file" if allow_path else "")
    problem = f"no such file '{name}'" if allow_path and ("/" in name or "." in name) else f"unknown baseline '{name}'"
    raise ConfigError(f"{owner}: {problem}; choose {choices}")


def gaussian_blur(pixels: "torch.Tensor", kernel_size: int = 11, sigma: float = 5.0) -> "torch.Tensor":
    """Each channel convolved with a normalized ``kernel_size``-tap Gaussian (separable), borders
    reflected (replicated for images too small to reflect); the output has the input's shape."""
    import torch
    import torch.nn.functional as F

    radius = kernel_size // 2
    offsets = torch.arange(kernel_size, dtype=torch.float32, device=pixels.device) - radius
    taps = torch.exp(-offsets**2 / (2 * sigma**2))
    taps = (taps / taps.sum()).to(pixels.dtype)
    channels = pixels.shape[1]
    mode = "reflect" if min(pixels.shape[-2:]) > radius else "replicate"
    padded = F.pad(pixels, (radius, radius, radius, radius), mode=mode)
    rows = F.conv2d(padded, taps.view(1, 1, 1, -1).expand(channels, 1, 1, kernel_size), groups=channels)
    return F.conv2d(rows, taps.view(1, 1, -1, 1).expand(channels, 1, kernel_size, 1), groups=channels)


def pixel_baseline(name: str, images: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """The baseline `name` for `images` ([B,C,H,W] pixels in [0, 1]), in pixel space, shaped alike.
    A baseline that is the same for every input (black, gray, an image file) comes back as one image
    expanded over the batch (stride 0 along it), so that a caller can run the model on it once."""
    if name in ("black", "gray"):
        return images.new_full((1, *images.shape[1:]), 0.0 if name == "black" else 0.5).expand_as(images)
    if name == "blur":
        return gaussian_blur(images)
    if name == "uniform":
        generator = torch.Generator(device=images.device).manual_seed(seed)
        return torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return image_file(Path(name).expanduser(), images)


def image_file(path: Path, like: torch.Tensor) -> torch.Tensor:
    from PIL import Image

    from vizkit.core.data import open_image

    height, width = like.shape[-2:]
    image = open_image(path).resize((width, height), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return pixels.to(like).unsqueeze(0).expand_as(like)
