"""Inputs: image files, folders and globs, and the embedded shapes set.

Every source yields ``Sample``s already resized and cropped as the model's timm data config says
(``timm.data.create_transform`` without its final Normalize), as pixels in [0, 1]; the runner
normalizes. Images open with PIL's decompression-bomb limit as an error, and any mode (grayscale,
palette, RGBA, 16-bit) is converted to 8-bit RGB.
"""
from __future__ import annotations

import glob
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from vizkit.errors import ConfigError, VizkitError, did_you_mean

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default; above it we refuse instead of warning


@dataclass
class Sample:
    name: str  # unique within a run, safe as a file name and a TensorBoard tag
    pixels: torch.Tensor  # [3,H,W] in [0, 1], at the model's input size
    source: str  # a path, or "shapes:SPLIT:INDEX"
    label: int | None = None
    mask: torch.Tensor | None = None  # [1,H,W] bool: the object's pixels, where known


def pixel_transform(data_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval transform (resize, center crop, to tensor) without Normalize: PIL -> [3,H,W] in [0,1]."""
    from timm.data import create_transform
    from torchvision import transforms

    transform = create_transform(**data_config, is_training=False)
    steps = [step for step in transform.transforms if not isinstance(step, transforms.Normalize)]
    return transforms.Compose(steps)


def open_image(path: Path) -> Image.Image:
    """An 8-bit RGB image, or a VizkitError that names the file and the problem."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise VizkitError(f"refusing image {path}: too many pixels for a safe decode ({error})") from None
    except FileNotFoundError:
        raise VizkitError(f"image not found: {path}") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise VizkitError(f"cannot read image {path}: {error} (is it a complete PNG/JPEG/... file?)") from None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def expand_paths(paths: Sequence[str]) -> list[Path]:
    """Files, folders (their image files, recursively, sorted) and globs, in the order given."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ConfigError("no images given; set data.paths=[IMAGE, FOLDER, 'GLOB*.png', ...]")
    found: list[Path] = []
    for text in map(str, paths):
        path = Path(text).expanduser()
        if any(ch in text for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True) if Path(m).is_file())
            if not matches:
                raise ConfigError(f"no files match '{text}'")
            found += matches
        elif path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise ConfigError(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += images
        elif path.is_file():
            found.append(path)
        else:
            siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
            raise ConfigError(f"image not found: {path}{did_you_mean(path.name, siblings)}")
    return found


def unique_names(stems: Sequence[str]) -> list[str]:
    """File-system- and tag-safe names, made unique by a numeric suffix (two folders may hold cat.jpg)."""
    names, seen = [], set()
    for stem in stems:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "image"
        name, n = base, 2
        while name in seen:
            name, n = f"{base}_{n}", n + 1
        seen.add(name)
        names.append(name)
    return names


def load_images(paths: Sequence[str], data_config: dict[str, Any]) -> list[Sample]:
    files = expand_paths(paths)
    transform = pixel_transform(data_config)
    images = [open_image(path) for path in files]  # all read (and checked) before any work starts
    names = unique_names([path.stem for path in files])
    return [Sample(name, transform(image), str(path)) for name, image, path in zip(names, images, files)]


def load_shapes(count: int, split: str, start: int, data_config: dict[str, Any]) -> list[Sample]:
    """``count`` images of the embedded shapes set (``split``: train, val or test), with labels and masks."""
    from vizkit.shapes import SHAPE_CLASSES, render_shape, split_seed

    if count <= 0 or start < 0:
        raise ConfigError(f"data.count must be positive and data.start non-negative, got count={count}, start={start}")
    try:
        seed = split_seed(split)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    transform = pixel_transform(data_config)
    samples = []
    for index in range(start, start + count):
        shape = render_shape(index, seed=seed)
        pixels = transform(Image.fromarray(shape.image))
        mask = transform(Image.fromarray(shape.mask.astype(np.uint8) * 255).convert("RGB"))[:1] > 0.5
        name = f"{split}{index:05d}_{SHAPE_CLASSES[shape.label]}"
        samples.append(Sample(name, pixels, f"shapes:{split}:{index}", shape.label, mask))
    return samples


def load_samples(data: Any, data_config: dict[str, Any]) -> list[Sample]:
    """The samples a ``data`` config describes (``kind: images`` or ``kind: shapes``)."""
    kind = data.get("kind")
    if kind == "images":
        return load_images(list(data.get("paths") or []), data_config)
    if kind == "shapes":
        return load_shapes(int(data.get("count", 8)), str(data.get("split", "test")), int(data.get("start", 0)), data_config)
    raise ConfigError(f"unknown data kind '{kind}'; use data=images or data=shapes")
