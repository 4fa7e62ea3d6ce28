"""The inspection kind and its first method, `filters`: kernels as pictures whose pixels are exactly the
normalized weights, per input channel for deeper layers, through Python and the real `vizkit` command;
and the generic data-set scan (start, update per batch, merge across ranks, finish) with a test-only
method, so the streaming path is covered before any built-in method needs it."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import hparams_in, images_in, model_state, read_events

import vizkit
from vizkit.core import pictures as render
from vizkit.core.errors import ConfigError
from vizkit.methods.base import Inspection, InspectionMethod

GAP = 4  # render.grid's white gap between kernels
LABEL = render.strip_height(1)  # the strip under each kernel holding its index


@pytest.fixture(scope="module")
def resnet18():
    return vizkit.load_model("resnet18")  # random weights: conv1 is 3 -> 64, 7x7


def kernel_at(grid: np.ndarray, index: int, count: int, size: tuple[int, int]) -> np.ndarray:
    """Kernel ``index``'s tile in a row-major grid of ``count`` labelled tiles, ⌈√count⌉ columns."""
    columns = math.ceil(math.sqrt(count))
    row, column = divmod(index, columns)
    height, width = size
    top = row * (height + LABEL + GAP)
    return grid[top: top + height, column * (width + GAP): column * (width + GAP) + width]


def upscaled(values: torch.Tensor, scale: int) -> np.ndarray:
    """[3,k,k] grey levels -> the picture filters should draw: round(255 v), each weight scale x scale."""
    return np.kron((values.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8), np.ones((scale, scale, 1), np.uint8))


@pytest.mark.parametrize("model_name, layer, filters, kernel", [("embedded", "conv1.0", 16, 3), ("resnet18", "conv1", 64, 7)])
def test_first_conv_is_one_rgb_grid_of_its_min_max_normalized_kernels(model_name, layer, filters, kernel, embedded, resnet18):
    model = embedded if model_name == "embedded" else resnet18
    inspection = vizkit.create_method("filters", scale=3).inspect(model)
    name = f"{layer}_rgb"
    assert list(inspection.pictures) == [name] and inspection.tags[name] == f"filters/{layer}/rgb|normalize=filter"
    grid = inspection.pictures[name]
    columns = math.ceil(math.sqrt(filters))
    tile = 3 * kernel
    assert grid.dtype == np.uint8 and grid.shape == (math.ceil(filters / columns) * (tile + LABEL + GAP) - GAP, columns * (tile + GAP) - GAP, 3)
    weight = dict(model.named_modules())[layer].weight.detach().float()
    index = filters - 3  # one kernel, checked pixel for pixel: (w - min) / (max - min) over its 3 colours
    expected = (weight[index] - weight[index].min()) / (weight[index].max() - weight[index].min())
    np.testing.assert_array_equal(kernel_at(grid, index, filters, (tile, tile)), upscaled(expected, 3))
    for index in range(filters):  # every kernel spans the full range
        drawn = kernel_at(grid, index, filters, (tile, tile))
        assert drawn.min() == 0 and drawn.max() == 255
    assert inspection.metrics == pytest.approx({"filters": filters, "input_channels": 3, "kernel_height": kernel, "kernel_width": kernel,
                                                "weight_min": float(weight.min()), "weight_max": float(weight.max()),
                                                "weight_std": float(weight.std()), "grids": 1})


def test_deeper_layer_gives_one_grey_grid_per_input_channel(embedded):
    inspection = vizkit.create_method("filters", layer="layer2.0.conv1", max_channels=5, scale=2).inspect(embedded)  # 32 -> 48
    parts = [f"in_{c}" for c in range(5)]
    assert list(inspection.pictures) == [f"layer2.0.conv1_{p}" for p in parts]
    assert list(inspection.tags.values()) == [f"filters/layer2.0.conv1/{p}|normalize=filter" for p in parts]
    assert [r["input_channel"] for r in inspection.records] == list(range(5)) and inspection.metrics["grids"] == 5
    weight = embedded.layer2[0].conv1.weight.detach().float()
    grid = inspection.pictures["layer2.0.conv1_in_3"]
    assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()  # grey as RGB
    index = 47  # a filter's grids share its scale: min-max over all its input channels
    expected = ((weight[index] - weight[index].min()) / (weight[index].max() - weight[index].min()))[3]
    np.testing.assert_array_equal(kernel_at(grid, index, 48, (6, 6)), upscaled(expected.expand(3, -1, -1), 2))


def test_layer_normalization_draws_zero_weights_mid_gray(embedded):
    model = copy.deepcopy(embedded)
    weight = model.conv1[0].weight
    with torch.no_grad():
        weight[0] = 0  # a dead kernel
        weight[1, 2, 1, 1] = 0
        weight[2, 0, 0, 0] = weight.abs().max() * 2  # the largest |w|: white
    inspection = vizkit.create_method("filters", normalize="layer", scale=1).inspect(model)
    grid = inspection.pictures["conv1.0_rgb"]
    assert inspection.tags["conv1.0_rgb"] == "filters/conv1.0/rgb|normalize=layer"
    assert (kernel_at(grid, 0, 16, (3, 3)) == 128).all()
    assert kernel_at(grid, 1, 16, (3, 3))[1, 1, 2] == 128
    assert kernel_at(grid, 2, 16, (3, 3))[0, 0, 0] == 255
    assert inspection.records[0]["weight_scale"] == pytest.approx(float(weight.detach().abs().max()))
    np.testing.assert_array_equal(kernel_at(grid, 5, 16, (3, 3)), upscaled(0.5 + weight[5].detach() / (2 * weight.abs().max().detach()), 1))


def test_model_is_left_as_it_was(resnet18):
    before, weights = model_state(resnet18), {k: v.clone() for k, v in resnet18.state_dict().items()}
    vizkit.create_method("filters", layer="layer1.0.conv2", max_channels=2).inspect(resnet18)
    assert model_state(resnet18) == before
    assert all(torch.equal(weights[k], v) for k, v in resnet18.state_dict().items())


@pytest.mark.parametrize("fields, fragments", [
    ({"layer": "layer1.0.conv3"}, ["layer 'layer1.0.conv3' not found in ResNet; closest: ", "layer1.0.conv1"]),
    ({"layer": "layer1.0.bn1"}, ["filters shows a Conv2d's kernels; layer 'layer1.0.bn1' of ResNet is a BatchNorm2d; closest: layer1.0.conv1"]),
    ({"layer": "fc"}, ["layer 'fc' of ResNet is a Linear"]),
])
def test_bad_layer_is_refused_with_the_closest_convolutions(embedded, fields, fragments):
    with pytest.raises(ConfigError) as error:
        vizkit.create_method("filters", **fields).check(embedded)
    assert all(fragment in str(error.value) for fragment in fragments), error.value


@pytest.mark.parametrize("fields, message", [({"normalize": "global"}, "normalize must be one of filter, layer"),
                                             ({"scale": 0}, "scale must be a positive integer"),
                                             ({"max_channels": -1}, "max_channels must be a positive integer")])
def test_bad_fields_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        vizkit.create_method("filters", **fields)


def test_filters_run_writes_pictures_scalars_and_hparams(vizkit_cli):
    run = vizkit_cli("method=filters", "method.normalize=layer", "trainer.progress_bar=false")
    assert run.returncode == 0, run.stderr
    assert "filters: 1 picture(s), cpu: filters 16, " in run.stdout  # then what it measured
    results = run.results
    assert results["method"] == {"name": "filters", "kind": "inspection",
                                 "config": {"layer": "", "scale": 8, "normalize": "layer", "max_channels": 16}}
    assert results["pictures"] == [{"name": "conv1.0_rgb", "png": "images/conv1.0_rgb.png", "tag": "filters/conv1.0/rgb|normalize=layer"}]
    assert results["metrics"]["filters"] == 16 and results["metrics"]["kernel_height"] == 3 and results["scanned"] == 0
    assert results["records"][0]["layer"] == "conv1.0" and results["records"][0]["weight_scale"] > 0
    (event,) = images_in(run.run_dir)["filters/conv1.0/rgb|normalize=layer"]
    assert event.encoded_image_string == (run.run_dir / "images/conv1.0_rgb.png").read_bytes()  # encoded once, shown twice
    assert (event.height, event.width) == (4 * (24 + LABEL) + 3 * GAP, 4 * 24 + 3 * GAP)
    scalars = set()
    for events in (run.run_dir / "tensorboard").glob("events.out.tfevents.*"):
        scalars |= set(read_events(events).Tags()["scalars"])
    assert {"metrics/filters", "metrics/weight_std", "metrics/kernel_height"} <= scalars
    hparams = hparams_in(run.run_dir)
    assert "method.normalize" in hparams["_hparams_/session_start_info"].decode("latin-1")
    assert not {tag for tag in scalars if tag.startswith("hparams/")}  # one scalar per figure


def test_bad_layer_fails_the_command_with_the_closest_convolution(vizkit_cli):
    run = vizkit_cli("method=filters", "method.layer=layer1.0.bn1", "trainer.progress_bar=false")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "is a BatchNorm2d; closest: layer1.0.conv1" in run.stderr


# ------------------------------------------------------------------ the generic data-set scan


class MeanImage(InspectionMethod):
    """Test-only: counts the images it sees, sums them, and shows their mean; merges by adding."""

    name = "mean_image"
    description = "the mean of the scanned images (a test of the scan path)"
    needs_data = True

    @dataclass
    class Config:
        label: str = "mean"

    def start(self, model, space):
        return {"count": torch.zeros((), dtype=torch.long, device=space.mean.device), "total": None,
                "indices": torch.zeros(0, dtype=torch.long, device=space.mean.device)}

    def update(self, state, model, pixels, indices, space):
        assert not torch.is_grad_enabled() and pixels.device == indices.device == space.mean.device
        total = pixels.sum(0) if state["total"] is None else state["total"] + pixels.sum(0)
        return {"count": state["count"] + pixels.shape[0], "total": total, "indices": torch.cat([state["indices"], indices])}

    def merge(self, states):
        totals = [s["total"] for s in states if s["total"] is not None]
        return {"count": sum(s["count"] for s in states), "total": sum(totals[1:], totals[0]),
                "indices": torch.cat([s["indices"] for s in states])}

    def finish(self, state, model, space, fetch):
        mean = state["total"] / state["count"]
        first = fetch(int(state["indices"].min()))
        return Inspection(pictures={self.config.label: render.to_uint8(mean)},
                          metrics={"count": int(state["count"]), "mean_pixel": float(mean.mean()), "first_mean_pixel": float(first.mean())},
                          records=[{"indices": sorted(state["indices"].tolist())}])


MEAN_PIXEL_RTOL = 10 * 6e-8 + (3 * 128 * 128) ** 0.5 * 6e-8  # see the two mean_pixel checks


def test_scan_streams_the_data_set_through_the_trainer(compose, tmp_path, embedded):
    from vizkit.cli.configs import run_settings
    from vizkit.core.data import load_samples
    from vizkit.core.models import data_config
    from vizkit.run.execute import execute

    cfg = compose("data=shapes", "data.count=10", "data.batch_size=4", "trainer.accelerator=cpu")
    results = execute(dataclasses.replace(run_settings(cfg), method=MeanImage()), tmp_path)
    pixels = torch.stack([s.pixels for s in load_samples(cfg.data, data_config(embedded))])
    assert results["scanned"] == 10 and results["target"] is None and results["method"]["kind"] == "inspection"
    assert results["records"] == [{"indices": list(range(10))}]  # every input once, batches of 4, 4, 2
    assert results["metrics"]["count"] == 10
    # per pixel a float32 sum of 10 images (≤ 10·6e-8), then a float32 mean of n = 3·128·128 (√n·6e-8):
    # 1.4e-5 relative against a float64 mean; measured 2.0e-8, 700× inside
    assert results["metrics"]["mean_pixel"] == pytest.approx(float(pixels.double().mean()), rel=MEAN_PIXEL_RTOL)
    assert results["metrics"]["first_mean_pixel"] == pytest.approx(float(pixels[0].mean()))  # fetch gives the pixels back
    assert results["pictures"] == [{"name": "mean", "png": "images/mean.png", "tag": "mean_image/mean"}]  # the default tag
    np.testing.assert_array_equal(images_in(tmp_path)["mean_image/mean"][0].encoded_image_string, (tmp_path / "images/mean.png").read_bytes())
    assert "method.label" in hparams_in(tmp_path)["_hparams_/session_start_info"].decode("latin-1")
    assert not list(tmp_path.glob(".inspect-rank*.pt"))


def test_scan_refuses_a_target_before_any_work(compose, tmp_path, embedded):
    from vizkit.cli.configs import run_settings
    from vizkit.run.execute import execute

    cfg = compose("data=shapes", "data.count=2", "target=class:star")
    with pytest.raises(ConfigError, match="mean_image takes no target"):
        execute(dataclasses.replace(run_settings(cfg), method=MeanImage()), tmp_path)
    assert not list(tmp_path.iterdir())


def test_python_inspect_batches_the_images_and_needs_them(embedded_samples, embedded):
    inspection = MeanImage().inspect(embedded, embedded_samples, batch_size=4)
    assert inspection.metrics["count"] == len(embedded_samples) and inspection.records == [{"indices": list(range(len(embedded_samples)))}]
    # as in the scan: 1.4e-5 relative against a float64 mean; measured 1.4e-8
    assert inspection.metrics["mean_pixel"] == pytest.approx(float(embedded_samples.double().mean()), rel=MEAN_PIXEL_RTOL)
    with pytest.raises(ConfigError, match="mean_image scans images"):
        MeanImage().inspect(embedded)


def test_rank_states_merge_through_files_on_rank_zero(tmp_path):
    from vizkit.run.trainer import collect_on_rank_zero

    def merge_ranks(trainer, method, state, run_dir):  # what a streamed scan does with its states
        states = collect_on_rank_zero(trainer, state, run_dir, "inspect", map_location=trainer.strategy.root_device)
        return None if states is None else method.merge(states)

    method, space = MeanImage(), SimpleNamespace(mean=torch.zeros(1, 3, 1, 1))
    parts = [torch.rand(3, 3, 4, 4), torch.rand(2, 3, 4, 4)]  # rank 0 saw inputs 0-2, rank 1 inputs 3-4
    with torch.no_grad():
        states = [method.update(method.start(None, space), None, part, torch.arange(len(part)) + 3 * rank, space) for rank, part in enumerate(parts)]
    barriers = []

    def trainer(rank):
        strategy = SimpleNamespace(barrier=barriers.append, root_device=torch.device("cpu"))
        return SimpleNamespace(world_size=2, global_rank=rank, strategy=strategy)

    assert merge_ranks(trainer(1), method, states[1], tmp_path) is None  # a non-zero rank leaves its state for rank 0
    merged = merge_ranks(trainer(0), method, states[0], tmp_path)
    assert len(barriers) == 2 and not list(tmp_path.glob(".inspect-rank*.pt"))
    assert int(merged["count"]) == 5 and merged["indices"].tolist() == [0, 1, 2, 3, 4]
    # 3 + 2 summed there, 5 here: ≤ 5·6e-8 × 5 (values < 1) = 1.5e-6 apart, inside the default atol 1e-5
    torch.testing.assert_close(merged["total"], torch.cat(parts).sum(0))
