"""Inputs: image files of every mode, folders and globs, safe decoding, the shapes set."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_image
from PIL import Image

from vizkit.core import data
from vizkit.core.errors import ConfigError, VizkitError

CONFIG = {"input_size": (3, 48, 48), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0, "crop_mode": "center"}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "I;16"])
def test_every_image_mode_becomes_rgb_at_the_model_size(tmp_path, mode):
    path = write_image(tmp_path / f"img_{mode.replace(';', '')}.png", size=(90, 70), mode=mode)
    (sample,) = data.load_images([str(path)], CONFIG)
    assert sample.pixels.shape == (3, 48, 48)
    assert 0.0 <= sample.pixels.min() and sample.pixels.max() <= 1.0


def test_sixteen_bit_images_keep_their_range(tmp_path):
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(tmp_path / "white16.png")
    (sample,) = data.load_images([str(tmp_path / "white16.png")], CONFIG)
    assert sample.pixels.min() > 0.99  # not clipped to 255/65535


def test_folders_and_globs_expand_in_order_with_unique_names(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_image(tmp_path / folder / "cat.png")
    write_image(tmp_path / "dog.jpg")
    samples = data.load_images([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "*.jpg")], CONFIG)
    assert [s.name for s in samples] == ["cat", "cat_2", "dog"]


def test_missing_path_suggests_close_names(tmp_path):
    write_image(tmp_path / "kitten.png")
    with pytest.raises(ConfigError, match="image not found.*kiten.png.*closest: kitten.png"):
        data.load_images([str(tmp_path / "kiten.png")], CONFIG)


def test_empty_glob_and_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="no files match"):
        data.load_images([str(tmp_path / "*.png")], CONFIG)
    with pytest.raises(ConfigError, match="holds no image files"):
        data.load_images([str(tmp_path)], CONFIG)


def test_truncated_image_is_named(tmp_path):
    path = write_image(tmp_path / "photo.png", size=(64, 64))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(VizkitError, match="cannot read image .*photo.png"):
        data.load_images([str(path)], CONFIG)


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 1000)
    path = write_image(tmp_path / "big.png", size=(40, 40))  # 1600 px: over the limit, under twice it
    with pytest.raises(VizkitError, match="too many pixels"):
        data.load_images([str(path)], CONFIG)


def test_shapes_are_deterministic_with_labels_and_masks():
    first = data.load_shapes(3, "test", 5, CONFIG)
    again = data.load_shapes(3, "test", 5, CONFIG)
    other_split = data.load_shapes(3, "val", 5, CONFIG)
    for a, b, c in zip(first, again, other_split):
        assert torch.equal(a.pixels, b.pixels) and a.label == b.label
        assert not torch.equal(a.pixels, c.pixels)
        assert a.mask.shape == (1, 48, 48) and 0 < a.mask.float().mean() < 0.6
    with pytest.raises(ConfigError, match="train"):
        data.load_shapes(1, "holdout", 0, CONFIG)


# ------------------------------------------------------------------------ hostile data configs


def test_a_plain_string_path_is_one_path_not_its_characters(tmp_path):
    """`data.paths=cat.png` on the command line replaces the YAML list with one string; it once became
    ['c', 'a', 't', ...], and a path such as /some/dir/cat.png scanned `/`."""
    write_image(tmp_path / "cat.png")
    (tmp_path / "more").mkdir()
    write_image(tmp_path / "more" / "dog.png")
    one = data.open_inputs({"kind": "images", "paths": str(tmp_path / "cat.png")}, CONFIG)
    assert [entry.source for entry in one.entries] == [str(tmp_path / "cat.png")]
    folder = data.open_inputs({"kind": "images", "paths": str(tmp_path / "more")}, CONFIG)
    assert [entry.name for entry in folder.entries] == ["dog"]
    with pytest.raises(ConfigError, match=r"image not found: .*/img$"):
        data.open_inputs({"kind": "images", "paths": str(tmp_path / "img")}, CONFIG)


def _class_folders(root, names):
    for name in names:
        (root / name).mkdir(parents=True)
        write_image(root / name / "0.png")


def test_imagefolder_with_some_folders_not_named_after_classes_is_refused_by_name(tmp_path):
    """star/ beside circles/: reading folders by position would label star images 'square' without a
    word (the embedded model's classes are circle, square, triangle, star, cross, hexagon)."""
    classes = ["circle", "square", "triangle", "star", "cross", "hexagon"]
    _class_folders(tmp_path, ["star", "circles"])
    with pytest.raises(ConfigError, match=r"some class folders are named after the model's classes and some are not: "
                                          r"not a class: 'circles' \(closest: circle.*data\.labels=folders"):
        data.image_folder(tmp_path, CONFIG, model_classes=classes)
    by_position = data.image_folder(tmp_path, CONFIG, model_classes=classes, labels="folders")
    assert [(entry.name, entry.label) for entry in by_position.entries] == [("circles_0", 0), ("star_0", 1)]
    assert by_position.classes == ["circles", "star"]
    with pytest.raises(ConfigError, match=r"data.labels=classes needs every class folder named after one of the model's classes"):
        data.image_folder(tmp_path, CONFIG, model_classes=classes, labels="classes")
    with pytest.raises(ConfigError, match="data.labels must be one of auto, classes, folders"):
        data.image_folder(tmp_path, CONFIG, model_classes=classes, labels="names")


def test_imagefolder_labels_classes_reads_the_models_order(tmp_path):
    classes = ["circle", "square", "triangle", "star", "cross", "hexagon"]
    _class_folders(tmp_path, ["star", "circle"])
    for rule in ("auto", "classes"):
        inputs = data.open_inputs({"kind": "imagefolder", "root": str(tmp_path), "labels": rule}, CONFIG, classes)
        assert [(entry.name, entry.label) for entry in inputs.entries] == [("circle_0", 0), ("star_0", 3)] and inputs.classes == classes


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stores its pixels sideways with an EXIF turn; read without it, a portrait photo
    was analysed lying on its side."""
    pixels = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high
    pixels[:, :20] = 255  # the stored left half is white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90° clockwise to display
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = data.open_image(tmp_path / "phone.jpg")
    assert shown.size == (20, 40)  # displayed 20 wide, 40 high
    top, bottom = np.asarray(shown)[:20].mean(), np.asarray(shown)[20:].mean()
    assert top > 200 and bottom < 50  # the stored left half is the displayed top


def test_names_from_deeply_nested_folders_stay_short_and_distinct(tmp_path):
    stems = ["a/" * 150 + "cat", "b/" * 150 + "cat", "grid"]
    names = data.unique_names(stems, reserved=["grid"])
    assert all(len(name.encode()) + len(".png") < 255 for name in names)
    assert len(set(names)) == 3 and names[2] == "grid_2" and names[0].endswith("a_a_cat")
