"""Incremental occlusion (``vizkit.probes.incremental``): the outputs it gives for occluded images
equal whole forwards of those images, on the architectures issue 19 names, at 224 px and a
non-square size, for windows 8/16/32; the occlusion map equals the naive one; an op the engine does
not know makes it run dense from there, announced, and still exact.

Tolerance: the logits of a whole forward and of the incremental one differ only in the order float32
sums are taken (a convolution over a window against one over the whole map, oneDNN's blocking):
relative error ~1e-6 per layer, growing with depth; 1e-4 of the logits' scale is the issue's bound
and leaves two orders of magnitude."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
from tiny_models import reinit_batchnorm
from torch import nn

import vizkit
from vizkit.core.models import load_model
from vizkit.methods.attribution.occlusion import window_starts
from vizkit.probes.incremental import IncrementalModel


def redrawn(name: str) -> nn.Module:
    """Random weights with BatchNorm's affine parameters and statistics redrawn: timm zero-initializes the
    last gamma of every residual block, which would hide a wrong residual branch."""
    torch.manual_seed(0)
    return reinit_batchnorm(load_model(name))


def positions(height: int, width: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Corners (the flush last windows included), next to an edge, and one inside on the stride grid."""
    rows, cols = window_starts(height, window, stride), window_starts(width, window, stride)
    picks = [(rows[0], cols[-1]), (rows[-1], cols[0]), (rows[-1], cols[-1]), (rows[1], cols[-2]),
             (rows[len(rows) // 3], cols[2 * len(cols) // 3])]
    return list(dict.fromkeys(picks))


def occluded_outputs(model: nn.Module, image: torch.Tensor, window: int, boxes: list[tuple[int, int]], fill: float = 0.3):
    """(whole forwards, incremental) logits for the image with each box filled."""
    engine, why = IncrementalModel.prepare(model)
    assert engine is not None, why
    wy, wx = min(window, image.shape[-2]), min(window, image.shape[-1])
    naive = image.repeat(len(boxes), 1, 1, 1)
    for row, (y, x) in enumerate(boxes):
        naive[row, :, y:y + wy, x:x + wx] = fill
    top = torch.tensor([y for y, _ in boxes])
    left = torch.tensor([x for _, x in boxes])
    patch = torch.full((len(boxes), image.shape[1], wy, wx), fill)
    with torch.no_grad():
        run = engine.clean(image)
        return model(naive), run.occluded(top, left, patch), run.report


def assert_equal_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= 1e-4 * scale, f"max error {(actual - expected).abs().max():.3g} at scale {scale:.3g}"


ARCHITECTURES = ["embedded", "resnet18", "vgg11", "regnetx_002", "efficientnet_b0"]


@pytest.fixture(scope="module")
def models():
    return {name: redrawn(name) for name in ARCHITECTURES}


@pytest.mark.parametrize("window, stride", [(8, 4), (16, 8), (32, 16)])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_occluded_outputs_equal_whole_forwards_at_224(models, name, window, stride):
    torch.manual_seed(1)
    image = torch.randn(1, 3, 224, 224)
    naive, incremental, _ = occluded_outputs(models[name], image, window, positions(224, 224, window, stride))
    assert_equal_to_scale(incremental, naive)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_occluded_outputs_equal_whole_forwards_at_a_non_square_size(models, name):
    torch.manual_seed(2)
    image = torch.randn(1, 3, 150, 203)  # odd sides: ceil-mode pooling and the TF-style paddings meet a remainder
    naive, incremental, _ = occluded_outputs(models[name], image, 16, positions(150, 203, 16, 8))
    assert_equal_to_scale(incremental, naive)


def test_the_report_says_where_inference_turned_dense(models):
    _, _, report = occluded_outputs(models["resnet18"], torch.randn(1, 3, 224, 224), 16, [(0, 0), (100, 100)])
    assert report.dense_from is not None and "of its" in report.reason and report.unsupported == []
    _, _, report = occluded_outputs(models["efficientnet_b0"], torch.randn(1, 3, 224, 224), 16, [(0, 0), (100, 100)])
    assert report.dense_from.startswith("mean") or "global" in report.reason  # the first squeeze-excitation gate


class Shift(nn.Module):
    """An op the engine does not know (a roll moves every cell), inside a custom module."""

    def forward(self, x):
        return torch.roll(x, 1, dims=3)


def custom_model() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Shift(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return model.eval()


def test_an_unknown_op_runs_dense_from_there_announced_and_exact():
    model = custom_model()
    naive, incremental, report = occluded_outputs(model, torch.randn(1, 3, 40, 40), 8, [(0, 0), (16, 24), (32, 32)])
    assert_equal_to_scale(incremental, naive)
    assert report.dense_from.startswith("roll") and report.unsupported == [f"unsupported: {report.dense_from}"]
    method = vizkit.create_method("occlusion", window=8, stride=4)
    x = torch.randn(1, 3, 40, 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = method.attribute(model, x, target=1)
        method.attribute(model, x, target=1)
    announced = [str(w.message) for w in caught if "incremental inference turns dense at roll" in str(w.message)]
    assert len(announced) == 1  # once per method, not once per batch or call
    assert method.notes()["path"] == "incremental" and method.notes()["dense_from"].startswith("roll")
    assert_equal_to_scale(maps, vizkit.create_method("occlusion", window=8, stride=4, incremental=False).attribute(model, x, target=1))


def test_occlusion_maps_equal_the_naive_ones_and_record_the_path():
    model = redrawn("embedded")
    torch.manual_seed(4)
    x = torch.randn(2, 3, 64, 72)
    fields = {"window": 16, "stride": 8, "batch_size": 16}
    fast = vizkit.create_method("occlusion", **fields)
    naive = vizkit.create_method("occlusion", incremental=False, **fields)
    expected = naive.attribute(model, x, target=2)
    actual = fast.attribute(model, x, target=2)
    assert_equal_to_scale(actual, expected)
    assert fast.notes()["path"] == "incremental" and naive.notes() == {"path": "naive", "reason": "incremental=false"}


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            y = y * 2
        return self.head(y.mean((2, 3)))


def test_a_model_fx_cannot_trace_takes_the_naive_path_and_says_so():
    model = _Branchy().eval()
    method = vizkit.create_method("occlusion", window=8, stride=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = method.attribute(model, torch.rand(1, 3, 16, 16), target=0)
    assert maps.shape == (1, 1, 16, 16)
    assert method.notes()["path"] == "naive" and "torch.fx cannot trace _Branchy" in method.notes()["reason"]
    assert any("naive occlusion" in str(w.message) for w in caught)


def test_the_command_shows_the_fallback_as_one_line_of_its_own(capsys):
    """The ``vizkit`` command's warning display (``vizkit.cli.app``): vizkit's own warnings as ``vizkit: warning:``
    on a line of their own (``tqdm.write``: never glued to a progress bar's line), no file:line prefix;
    anyone else's handed to the display it replaced (here pytest's)."""
    from tqdm import tqdm

    from vizkit.cli.app import _vizkit_warnings_as_notes

    method = vizkit.create_method("occlusion", window=8, stride=8)
    with warnings.catch_warnings(), _vizkit_warnings_as_notes(), tqdm(total=2, file=sys.stderr, mininterval=0) as bar:
        warnings.simplefilter("always")
        bar.update(1)
        method.attribute(_Branchy().eval(), torch.rand(1, 3, 16, 16), target=0)
        warnings.warn("someone else's", UserWarning)
    err = capsys.readouterr().err.replace("\r", "\n")
    said = [line for line in err.splitlines() if "naive occlusion" in line]
    assert len(said) == 1 and said[0].startswith("vizkit: warning: occlusion: torch.fx cannot trace"), err
    assert "UserWarning" not in err and "vizkit: warning: someone else's" not in err  # pytest records that one itself


# ---------------------------------------------------------------- approximate occlusion


def test_drilling_down_on_every_window_gives_the_exact_map():
    """drill_down=1 evaluates every window the coarse pass left: the approximate path, nothing approximated."""
    model = redrawn("embedded")
    torch.manual_seed(5)
    x = torch.randn(1, 3, 64, 64)
    exact = vizkit.create_method("occlusion", window=16, stride=8).attribute(model, x, target=1)
    method = vizkit.create_method("occlusion", window=16, stride=8, approximate=True, drill_down=1.0)
    assert_equal_to_scale(method.attribute(model, x, target=1), exact)
    assert method.notes()["approximate"] is True and method.notes()["path"] == "incremental"


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1) - a.flatten(1).mean(1, keepdim=True), b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_approximate_maps_track_the_exact_ones_on_shapes(embedded):
    """The defaults (coarse pass at twice the stride, 10 % of the windows drilled into) on 12 held-out
    shapes: mean Pearson correlation ≥ 0.95 and the same most important pixel in ≥ 90 % of them.
    Measured: 12 images mean 0.982, 24 mean 0.984 (lowest 0.950), 50 mean 0.985 (lowest 0.881), the
    same maximum in all of them."""
    from vizkit.core.data import load_shapes
    from vizkit.core.models import data_config
    from vizkit.core.pixels import PixelSpace

    samples = load_shapes(12, "test", 0, data_config(embedded))
    x = PixelSpace.for_model(embedded).from_pixels(torch.stack([sample.pixels for sample in samples]))
    exact = vizkit.create_method("occlusion", batch_size=16).attribute(embedded, x)
    approximate = vizkit.create_method("occlusion", batch_size=16, approximate=True).attribute(embedded, x)
    assert pearson(approximate, exact).mean() >= 0.95
    assert (approximate.flatten(1).argmax(1) == exact.flatten(1).argmax(1)).float().mean() >= 0.9


def test_a_run_records_the_path_and_labels_approximate_maps(compose, tmp_path):
    from conftest import images_in

    from vizkit.cli.app import run

    exact = run(compose("data=shapes", "data.count=2", "method=occlusion"), tmp_path / "exact")
    assert exact["method"]["notes"]["path"] == "incremental" and "approximate" not in exact["method"]["notes"]
    results = run(compose("data=shapes", "data.count=2", "method=occlusion", "method.approximate=true"), tmp_path / "approximate")
    assert results["method"]["notes"]["approximate"] is True and results["method"]["config"]["drill_down"] == 0.1
    assert all(record["caption"].endswith("occlusion (approximate)") for record in results["inputs"])
    tags = images_in(tmp_path / "approximate")
    assert tags and all(tag.endswith("/panel_approximate") for tag in tags)
    naive = run(compose("data=shapes", "data.count=2", "method=occlusion", "method.incremental=false"), tmp_path / "naive")
    assert naive["method"]["notes"] == {"path": "naive", "reason": "incremental=false"}


@pytest.mark.parametrize("fields, message", [
    ({"drill_down": 1.5}, "drill_down is a share of the windows in [0, 1]"),
    ({"projective_threshold": 0}, "projective_threshold is a share of a map's side in (0, 1]"),
    ({"coarse_factor": 0}, "coarse_factor must be a positive integer"),
])
def test_malformed_approximate_settings_get_one_line_errors(fields, message):
    from vizkit.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace("]", r"\]").replace(")", r"\)")):
        vizkit.create_method("occlusion", approximate=True, **fields)
