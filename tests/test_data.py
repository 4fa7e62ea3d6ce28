"""Inputs: image files of every mode, folders and globs, safe decoding, the shapes set."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_image
from PIL import Image

from vizkit import data
from vizkit.errors import ConfigError, VizkitError

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
