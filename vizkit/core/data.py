"""Inputs: image files, folders and globs, a data set in ImageFolder layout, the embedded shapes set.

Every source is an ``Inputs`` data set: its entries (names, sources, labels) known up front, each
input decoded when the DataLoader asks for it (``input_loader``: batch size, worker processes,
pinned memory, from the ``data`` config), already resized and cropped as the model's timm data
config says (``timm.data.create_transform`` without its final Normalize), as pixels in [0, 1]; the
runner normalizes. Images open with PIL's decompression-bomb limit as an error, and any mode
(grayscale, palette, RGBA, 16-bit) is converted to 8-bit RGB. An input that cannot be read is left
out of its batch and listed (``collate``), never a crash halfway through a scan.
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
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from vizkit.core.errors import ConfigError, VizkitError, closest, did_you_mean

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
                # a phone photo's pixels are stored sideways, with the turn in its EXIF orientation tag
                ImageOps.exif_transpose(image, in_place=True)
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
    return [path for path, _ in _expand(paths)]


def _expand(paths: Sequence[str]) -> list[tuple[Path, str]]:
    """``expand_paths`` with each file's name stem: relative to the folder it was found in (so
    ``photos/a/cat.jpg`` and ``photos/b/cat.jpg`` read ``a_cat`` and ``b_cat``), else the file's stem."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ConfigError("no images given; set data.paths=[IMAGE, FOLDER, 'GLOB*.png', ...]")
    found: list[tuple[Path, str]] = []
    for text in map(str, paths):
        path = Path(text).expanduser()
        if any(ch in text for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True) if Path(m).is_file())
            if not matches:
                raise ConfigError(f"no files match '{text}'")
            found += [(match, match.stem) for match in matches]
        elif path.is_dir():
            images = folder_images(path)
            if not images:
                raise ConfigError(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += [(image, _relative_stem(image, path)) for image in images]
        elif path.is_file():
            found.append((path, path.stem))
        else:
            siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
            raise ConfigError(f"image not found: {path}{did_you_mean(path.name, siblings)}")
    return found


def folder_images(folder: Path) -> list[Path]:
    """The image files under a folder, recursively, sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _relative_stem(path: Path, folder: Path) -> str:
    return str(path.relative_to(folder).with_suffix(""))


MAX_NAME = 160  # characters of a result's name: a file name (+ ".png") must stay under 255 bytes


def unique_names(stems: Sequence[str], reserved: Sequence[str] = ()) -> list[str]:
    """File-system- and tag-safe names, made unique by a numeric suffix (two folders may hold cat.jpg)
    and never one of ``reserved`` (a run's own pictures, such as an optimization's ``grid``). A name
    from deeply nested folders is cut to ``MAX_NAME`` characters, its end kept and a digest of the whole
    added, so two long paths still give two names."""
    import hashlib

    names, seen = [], set(reserved)
    for stem in stems:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "image"
        if len(base) > MAX_NAME:
            digest = hashlib.sha1(base.encode()).hexdigest()[:10]
            base = f"{digest}_{base[-(MAX_NAME - 11):].lstrip('._')}"
        name, n = base, 2
        while name in seen:
            name, n = f"{base}_{n}", n + 1
        seen.add(name)
        names.append(name)
    return names


def load_images(paths: Sequence[str], data_config: dict[str, Any]) -> list[Sample]:
    """Every image read into memory (an unreadable one is an error): for the few images an
    optimization starts from; runs stream their inputs through ``open_inputs`` instead."""
    inputs = ImageFiles.from_paths(paths, data_config)
    return [inputs.load(index) for index in range(len(inputs))]


def load_shapes(count: int, split: str, start: int, data_config: dict[str, Any]) -> list[Sample]:
    """``count`` images of the embedded shapes set (``split``: train, val or test), with labels and masks."""
    inputs = ShapeImages(count, split, start, data_config)
    return [inputs.load(index) for index in range(len(inputs))]


def load_samples(data: Any, data_config: dict[str, Any]) -> list[Sample]:
    """The samples a ``data`` config describes, all in memory (an unreadable image is an error)."""
    inputs = open_inputs(data, data_config)
    return [inputs.load(index) for index in range(len(inputs))]


# ------------------------------------------------------------------ streamed inputs


@dataclass(frozen=True)
class Entry:
    """What is known of an input before it is decoded."""

    name: str  # unique within a run, safe as a file name and a TensorBoard tag
    source: str  # a path, or "shapes:SPLIT:INDEX"
    label: int | None = None


class Inputs(Dataset):
    """A run's inputs, decoded one at a time where the DataLoader asks (in its worker processes when
    ``data.workers`` > 0), so a scan holds a batch of pixels, never the data set.

    ``entries`` are known up front (names, sources, labels). An item is ``{"index", "pixels",
    "mask"}``, or ``{"index", "error"}`` for an input that cannot be read: ``collate`` takes it out of
    the batch and lists it under ``"skipped"``, so one bad file never stops a scan halfway.
    """

    entries: list[Entry]
    has_masks = False  # whether every input comes with its object's mask
    classes: list[str] | None = None  # the class names the labels index, where the data defines them

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> Sample:
        """Input ``index`` decoded, or a VizkitError that names it and says what is wrong."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            sample = self.load(index)
        except VizkitError as error:
            return {"index": index, "error": str(error)}
        return {"index": index, "pixels": sample.pixels, "mask": sample.mask}


class ImageFiles(Inputs):
    """Image files, each resized and cropped as the model's data config says."""

    def __init__(self, files: Sequence[Path], names: Sequence[str], labels: Sequence[int | None], data_config: dict[str, Any],
                 classes: list[str] | None = None) -> None:
        self.entries = [Entry(name, str(path), label) for name, path, label in zip(names, files, labels)]
        self.transform = pixel_transform(data_config)
        self.classes = classes

    @classmethod
    def from_paths(cls, paths: Sequence[str], data_config: dict[str, Any]) -> "ImageFiles":
        found = _expand(paths)
        return cls([path for path, _ in found], unique_names([stem for _, stem in found]), [None] * len(found), data_config)

    def load(self, index: int) -> Sample:
        entry = self.entries[index]
        return Sample(entry.name, self.transform(open_image(Path(entry.source))), entry.source, entry.label)


LABEL_RULES = ("auto", "classes", "folders")


def folder_labels(folders: list[str], model_classes: Sequence[str] | None, rule: str = "auto") -> tuple[list[int], list[str]]:
    """Each class folder's label, and the class names the labels index.

    ``folders``: the folders' positions in name order, as torchvision's ImageFolder gives them (right
    for ImageNet's synset folders, which are in the model's class order). ``classes``: each folder is
    the model's class of that name, whatever the model's order. ``auto``: ``classes`` when every
    folder is named after a class, ``folders`` when none is; a mix (``star/`` beside ``circles/``) is
    refused by name, since either reading would label some folders wrongly without a word.
    """
    if rule not in LABEL_RULES:
        raise ConfigError(f"data.labels must be one of {', '.join(LABEL_RULES)}, got '{rule}'")
    known = list(model_classes or [])
    strangers = [folder for folder in folders if folder not in known]
    if rule == "folders" or (rule == "auto" and known and len(strangers) == len(folders)) or (rule == "auto" and not known):
        return list(range(len(folders))), list(folders)
    if strangers:
        hints = ", ".join(f"'{folder}'" + (f" (closest: {', '.join(closest(folder, known, 3))})" if closest(folder, known, 3) else "")
                          for folder in strangers[:8])
        more = f" and {len(strangers) - 8} more" if len(strangers) > 8 else ""
        why = ("some class folders are named after the model's classes and some are not" if rule == "auto"
               else "data.labels=classes needs every class folder named after one of the model's classes")
        raise ConfigError(f"{why}: not a class: {hints}{more}. Rename those folders, or label by folder position "
                          f"in name order with data.labels=folders")
    return [known.index(folder) for folder in folders], known


def image_folder(root: Any, data_config: dict[str, Any], model_classes: Sequence[str] | None = None, labels: str = "auto") -> ImageFiles:
    """torchvision's ImageFolder layout: ``ROOT/CLASS/**/IMAGE``, labelled by ``folder_labels``."""
    if root in (None, "", "???"):
        raise ConfigError("data=imagefolder needs data.root=DIR: a folder with one sub-folder of images per class")
    root = Path(str(root)).expanduser()
    if not root.is_dir():
        siblings = [p.name for p in root.parent.iterdir()] if root.parent.is_dir() else []
        raise ConfigError(f"data.root: folder not found: {root}{did_you_mean(root.name, siblings)}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ConfigError(f"data.root {root} holds no class sub-folders; ImageFolder's layout is ROOT/CLASS/IMAGE")
    folder_label, classes = folder_labels(folders, model_classes, str(labels))
    files, stems, file_labels = [], [], []
    for folder, label in zip(folders, folder_label):
        for path in folder_images(root / folder):
            files.append(path)
            stems.append(_relative_stem(path, root))
            file_labels.append(label)
    if not files:
        raise ConfigError(f"the class folders of {root} hold no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageFiles(files, unique_names(stems), file_labels, data_config, classes=classes)


class ShapeImages(Inputs):
    """``count`` images of the embedded shapes set from ``start`` (``split``: train, val or test),
    rendered on demand, with labels and exact object masks."""

    has_masks = True

    def __init__(self, count: int, split: str, start: int, data_config: dict[str, Any]) -> None:
        from vizkit.core.shapes import SHAPE_CLASSES, shape_label, split_seed

        if count <= 0 or start < 0:
            raise ConfigError(f"data.count must be positive and data.start non-negative, got count={count}, start={start}")
        try:
            self.seed = split_seed(split)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.split = split
        self.classes = list(SHAPE_CLASSES)
        labels = [shape_label(index, seed=self.seed) for index in range(start, start + count)]
        self.entries = [Entry(f"{split}{index:05d}_{SHAPE_CLASSES[label]}", f"shapes:{split}:{index}", label)
                        for index, label in zip(range(start, start + count), labels)]
        self.start = start
        self.transform = pixel_transform(data_config)

    def load(self, index: int) -> Sample:
        from vizkit.core.shapes import render_shape

        entry = self.entries[index]
        shape = render_shape(self.start + index, seed=self.seed)
        pixels = self.transform(Image.fromarray(shape.image))
        mask = self.transform(Image.fromarray(shape.mask.astype(np.uint8) * 255).convert("RGB"))[:1] > 0.5
        return Sample(entry.name, pixels, entry.source, shape.label, mask)


@dataclass
class DataConfig:
    """Fields every data source shares: how the DataLoader reads it (``data=`` on the command line)."""

    kind: str = "images"
    batch_size: int = 8
    workers: int = 0  # DataLoader processes that decode the inputs (0: in the main process)
    pin_memory: Any = "auto"  # true | false | auto (pinned when the run is on a GPU)

    def open(self, data_config: dict[str, Any], model_classes: Sequence[str] | None = None) -> Inputs:
        """The inputs this source describes, not yet decoded."""
        raise NotImplementedError


@dataclass
class ImagesData(DataConfig):
    """Image files, folders (searched recursively) and globs."""

    kind: str = "images"
    paths: Any = None  # a list of paths, or one path as a string

    def open(self, data_config: dict[str, Any], model_classes: Sequence[str] | None = None) -> Inputs:
        # data.paths=cat.png replaces the YAML list with one string: one path, never its characters
        paths = self.paths
        return ImageFiles.from_paths([paths] if isinstance(paths, (str, Path)) else list(paths or []), data_config)


@dataclass
class ImageFolderData(DataConfig):
    """A data set in torchvision's ImageFolder layout, ROOT/CLASS/IMAGE, labelled by ``folder_labels``."""

    kind: str = "imagefolder"
    root: str | None = None
    labels: str = "auto"  # auto | classes | folders
    batch_size: int = 32
    workers: int = 4

    def open(self, data_config: dict[str, Any], model_classes: Sequence[str] | None = None) -> Inputs:
        return image_folder(self.root, data_config, model_classes, self.labels)


@dataclass
class ShapesData(DataConfig):
    """The procedurally generated shapes set (labels and exact object masks)."""

    kind: str = "shapes"
    split: str = "test"  # train | val | test
    start: int = 0
    count: int = 8

    def open(self, data_config: dict[str, Any], model_classes: Sequence[str] | None = None) -> Inputs:
        return ShapeImages(int(self.count), str(self.split), int(self.start), data_config)


DATA_KINDS: dict[str, type[DataConfig]] = {"images": ImagesData, "imagefolder": ImageFolderData, "shapes": ShapesData}


def data_source(values: dict[str, Any]) -> DataConfig:
    """The data config of ``values["kind"]`` from plain values, its fields checked by name."""
    import dataclasses

    kind = values.get("kind")
    if kind not in DATA_KINDS:
        raise ConfigError(f"unknown data kind '{kind}'{did_you_mean(str(kind), DATA_KINDS)}; use data=images, data=imagefolder or data=shapes")
    cls = DATA_KINDS[kind]
    fields = [field.name for field in dataclasses.fields(cls)]
    for key in values:
        if key not in fields:
            raise ConfigError(f"data={kind} has no field '{key}'{did_you_mean(str(key), fields)}; its fields: {', '.join(fields)}")
    return cls(**values)


def open_inputs(data: DataConfig | dict[str, Any], data_config: dict[str, Any], model_classes: Sequence[str] | None = None) -> Inputs:
    """The inputs a data config (or its plain values) describes, not yet decoded."""
    source = data if isinstance(data, DataConfig) else data_source(dict(data))
    return source.open(data_config, model_classes)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of ``Inputs`` items: ``index`` [B], ``pixels`` [B,3,H,W] (None when no input of the
    batch could be read), ``mask`` [B,1,H,W] (None unless every input has one) and ``skipped``: the
    ``(index, error)`` of each input left out."""
    readable = [item for item in items if "error" not in item]
    masks = [item["mask"] for item in readable]
    return {
        "index": torch.tensor([item["index"] for item in readable], dtype=torch.long),
        "pixels": torch.stack([item["pixels"] for item in readable]) if readable else None,
        "mask": torch.stack(masks) if masks and all(mask is not None for mask in masks) else None,
        "skipped": [(int(item["index"]), item["error"]) for item in items if "error" in item],
    }


def input_loader(data: DataConfig | dict[str, Any], inputs: Inputs, accelerator: str = "auto") -> DataLoader:
    """The DataLoader a data config (or plain values of its loader fields) asks for: ``batch_size``,
    ``workers`` (decoding processes; 0 decodes in the main process) and ``pin_memory`` (true | false |
    auto: pinned when the run is on a GPU), in the inputs' order."""
    if not isinstance(data, DataConfig):
        data = DataConfig(**{key: value for key, value in dict(data).items() if key != "kind"})
    batch_size, workers = int(data.batch_size), int(data.workers or 0)
    if batch_size <= 0 or workers < 0:
        raise ConfigError(f"data.batch_size must be positive and data.workers non-negative, got batch_size={batch_size}, workers={workers}")
    pin = data.pin_memory
    if str(pin) == "auto":
        pin = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return DataLoader(inputs, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                      pin_memory=bool(pin), persistent_workers=False)
