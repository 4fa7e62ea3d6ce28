"""vizkit.core.pictures: the percentile scale against captum's, what clipping does to a sparse map's
overlay, Render's checks, captions and labelled grids drawn with PIL text."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vizkit.core import pictures as render
from vizkit.core.errors import ConfigError

visualization = pytest.importorskip("captum.attr._utils.visualization")


def maps() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"dense": torch.rand(1, 48, 48, generator=generator),
            "sparse": torch.rand(1, 48, 48, generator=generator) ** 8,
            "signed": torch.randn(1, 48, 48, generator=generator) ** 3,
            "rgb": torch.randn(3, 24, 24, generator=generator)}


@pytest.mark.parametrize("clip_percentile", [0.5, 2, 10, 50])
@pytest.mark.parametrize("kind", ["dense", "sparse", "signed", "rgb"])
def test_scale_is_captums_cumulative_sum_threshold(kind, clip_percentile):
    """captum sums the sorted |values| in float32, we in float64: rounding can move the crossing by one
    sorted value, never more (measured: the same value on all these maps)."""
    magnitude = maps()[kind].abs().numpy()
    theirs = visualization._cumulative_sum_threshold(magnitude, 100 - clip_percentile)
    ordered = np.sort(magnitude, axis=None)
    where = int(np.searchsorted(ordered, theirs))
    assert render.display_scale(maps()[kind].numpy(), clip_percentile) in ordered[max(where - 1, 0): where + 2]


def test_no_clipping_scales_to_the_max_and_clipping_saturates():
    values = maps()["sparse"]
    assert render.display_scale(values.numpy(), 0) == float(values.max())
    heat = render.colorize(values, render.Render(clip_percentile=10))
    saturated = (values[0] >= render.display_scale(values.numpy(), 10)).numpy()
    assert saturated.sum() > 1 and (heat[saturated] == render.apply_colormap("inferno", np.ones(1, np.float32))).all()


def test_clipping_makes_a_sparse_maps_overlay_visible():
    """One spike 16× the largest other value (1.5% of the map's mass, so a 2% clip saturates it): scaled to
    the max, the overlay is the input within ~1 grey level on average; clipped, ~12 (measured 1.0 and 11.8)."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 64, 64, generator=generator)
    attribution = torch.randn(1, 64, 64, generator=generator).abs()
    attribution[0, 10, 20] = 50
    image = render.to_uint8(pixels).astype(np.float32)

    def change(clip_percentile: float) -> float:
        return float(np.abs(render.overlay(pixels, attribution, render.Render(clip_percentile=clip_percentile)) - image).mean())

    assert change(0) < 2 and change(2) > 8


def test_heat_and_overlay_are_colorize_and_overlay():
    pixels, attribution, look = torch.rand(3, 48, 48), maps()["signed"], render.Render(cmap="viridis", alpha=0.8)
    heat, blended = render.heat_and_overlay(pixels, attribution, look)
    np.testing.assert_array_equal(heat, render.colorize(attribution, look))
    np.testing.assert_array_equal(blended, render.overlay(pixels, attribution, look))
    np.testing.assert_array_equal(blended, render.overlay(pixels, attribution, look, heat=heat))
    assert not np.array_equal(heat, render.colorize(attribution))  # the colormap was used


@pytest.mark.parametrize("fields, message", [
    ({"cmap": "infern"}, "cmap 'infern' is not a matplotlib colormap; closest: inferno"),
    ({"cmap": None}, "cmap must be a matplotlib colormap's name"),
    ({"alpha": 1.5}, r"alpha \(the overlay's opacity\) must be a number in \[0, 1\], got 1.5"),
    ({"alpha": -0.1}, r"alpha .* got -0.1"),
    ({"clip_percentile": 100}, r"clip_percentile .* must be a number in \[0, 100\), got 100"),
    ({"clip_percentile": -1}, r"clip_percentile .* got -1"),
    ({"clip_percentile": "2"}, r"clip_percentile .* got '2'"),
])
def test_render_check_refuses(fields, message):
    with pytest.raises(ConfigError, match=message):
        render.Render(**fields).check()


def test_render_check_accepts_the_defaults_and_the_bounds():
    for look in (render.Render(), render.Render(cmap="RdBu_r", alpha=0, clip_percentile=0), render.Render(alpha=1, clip_percentile=99.5)):
        assert look.check() is look


def test_caption_puts_text_above_the_unchanged_picture():
    picture = np.random.default_rng(0).integers(0, 256, (30, 200, 3), dtype=np.uint8)
    captioned = render.caption(picture, ["class 3 star · p=0.97 · gradcam", "second line"])
    strip = captioned[: render.strip_height(2)]
    assert captioned.shape == (30 + render.strip_height(2), 200, 3)
    np.testing.assert_array_equal(captioned[render.strip_height(2):], picture)
    assert (strip < 100).sum() > 100 and (strip[: render.strip_height(1)] < 100).any() and (strip[render.strip_height(1):] < 100).any()


def test_text_wider_than_the_picture_is_cut_with_an_ellipsis():
    text = "a caption far too long for a picture only sixty pixels wide"
    assert render.fitted(text, 60).endswith("…") and render.fitted(text, 60) != "…"
    assert render.fitted("ok", 60) == "ok" and render.fitted("12345", 3) == ""
    strip = render.caption(np.zeros((1, 60, 3), np.uint8), [text])[:-1]
    assert (strip < 100).any() and (strip[:, -render.TEXT_PADDING:] == 255).all()  # nothing drawn into the margin


def test_labels_draw_their_text_under_each_picture():
    pictures = [np.full((20, 30, 3), value, np.uint8) for value in (0, 80, 160)]
    first, second = render.grid(pictures, labels=["0", "1", "2"]), render.grid(pictures, labels=["7", "1", "12"])
    assert first.shape == second.shape == (2 * (20 + render.strip_height(1)) + 4, 2 * 30 + 4, 3)
    strip = slice(20, 20 + render.strip_height(1))
    assert not np.array_equal(first[strip, :30], second[strip, :30]) and (first[strip, :30] < 100).any()
    np.testing.assert_array_equal(first[strip, 34:64], second[strip, 34:64])  # the same label, the same pixels
    np.testing.assert_array_equal(first[:20, :30], pictures[0])


def test_grid_without_labels_is_the_plain_layout():
    pictures = [np.full((5, 3 + index, 3), 10 * index, np.uint8) for index in range(5)]
    expected = np.full((5 + 4 + 5, 3 + 4 + 5 + 2 * 4, 3), 255, np.uint8)  # 3 columns: widths 3|4|5, then 6|7 in row two
    for index, picture in enumerate(pictures):
        row, column = divmod(index, 3)
        left = sum(pictures[row * 3 + c].shape[1] + 4 for c in range(column))
        expected[row * 9: row * 9 + 5, left: left + picture.shape[1]] = picture
    np.testing.assert_array_equal(render.grid(pictures), expected)
    np.testing.assert_array_equal(render.grid(pictures, labels=None), expected)
