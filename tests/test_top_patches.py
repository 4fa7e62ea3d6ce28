"""top_patches (Zeiler & Fergus 2014): exact top-k over a data set, states that merge into the one-device
answer, receptive-field crops with padding marked, channel choices, and runs of the real command
(one process, and two CPU processes with DDP)."""
from __future__ import annotations

import pytest
import torch
from conftest import images_in, model_state

from tiny_models import rounding, single_thread
from vizkit.core.data import load_shapes
from vizkit.core.errors import ConfigError
from vizkit.core.hooks import layer_output
from vizkit.methods.inspection.top_patches import TopPatches
from vizkit.core.models import data_config, find_layer
from vizkit.core.pixels import PixelSpace


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def shapes(embedded):
    return torch.stack([s.pixels for s in load_shapes(40, "test", 0, data_config(embedded))])


def scan(method, model, images, batch_size):
    space = PixelSpace.for_model(model)
    state = method.start(model, space)
    with torch.no_grad():
        for first in range(0, images.shape[0], batch_size):
            state = method.update(state, model, images[first:first + batch_size], torch.arange(first, min(first + batch_size, images.shape[0])), space)
    return state


def test_top_k_is_exact_against_a_brute_force_scan(embedded, shapes):
    """Batches of 7 against one of 40: different conv shapes, so an activation may round differently,
    by ≤ rounding(layer3) × the largest activation (8.9e-6 × 12.8 = 1.1e-4; measured 0 here). The
    ranking holds against that: the smallest gap between consecutive top-6 values of a channel is
    4.4× its channel's bound (2.2× the two sides' errors together), so the images cannot swap."""
    before = model_state(embedded)
    method = TopPatches(layer="layer3", k=5, channels="all")
    state = method.merge([scan(method, embedded, shapes, batch_size=7)])
    with torch.no_grad():
        activation = layer_output(embedded, PixelSpace.for_model(embedded).from_pixels(shapes), find_layer(embedded, "layer3"))
    best = activation.flatten(2).max(2).values  # [N,C]: each image's strongest response per channel
    expected_values, expected_images = best.T.topk(5, dim=1)
    atol = rounding(embedded, "layer3") * float(activation.abs().max())
    torch.testing.assert_close(state["values"], expected_values, rtol=0, atol=atol)
    distinct = expected_values[:, -1] > 0  # a channel silent on many images ties at 0: any of them is right
    assert distinct.sum() > 10 and torch.equal(state["images"][distinct], expected_images[distinct])
    for channel in (0, 7):
        for rank in range(5):
            image, y, x = (int(state[key][channel, rank]) for key in ("images", "ys", "xs"))
            assert float(activation[image, channel, y, x]) == pytest.approx(float(state["values"][channel, rank]), rel=0, abs=atol)
    assert model_state(embedded) == before


def test_states_of_several_devices_merge_into_the_one_device_answer(embedded, shapes):
    """Exact: both scans take the same per-image activations (layer2's output for an image is the same
    bit for bit in batches of 5, 8, 23 or 40: measured). Were a CPU's conv to round by batch size, values
    would move ≤ rounding(layer2) × max|a| = 5.7e-5; the ranking would hold (gaps ≥ 28× that) but one
    image's argmax location has a runner-up only 0.78× that away, so ys/xs could then differ."""
    method = TopPatches(layer="layer2", k=4, channels="all")
    whole = method.merge([scan(method, embedded, shapes, batch_size=8)])
    ranks = [scan(method, embedded, shapes[:17], batch_size=5), None]
    other = TopPatches(layer="layer2", k=4, channels="all")
    ranks[1] = other.start(embedded, PixelSpace.for_model(embedded))
    with torch.no_grad():  # the second "device" sees the rest of the data set, with its own indices
        ranks[1] = other.update(ranks[1], embedded, shapes[17:], torch.arange(17, 40), PixelSpace.for_model(embedded))
    merged = method.merge(ranks)
    for key in ("values", "images", "ys", "xs"):
        assert torch.equal(merged[key], whole[key]), key


def test_patches_are_receptive_field_crops_with_padding_marked(embedded, shapes):
    inspection = TopPatches(layer="layer2", k=3, channels=[0, 5]).inspect(embedded, shapes[:12], batch_size=5)
    assert set(inspection.pictures) == {"channel_0", "channel_5", "summary"}
    assert inspection.tags["channel_5"] == "top_patches/layer2/channel_5"
    record = inspection.records[1]
    assert record["channel"] == 5 and [p["value"] for p in record["patches"]] == sorted((p["value"] for p in record["patches"]), reverse=True)
    top, left, bottom, right = record["patches"][0]["box"]
    assert inspection.metrics["receptive_field"] == bottom - top and inspection.metrics["channels"] == 2
    for patch in (p for r in inspection.records for p in r["patches"]):  # padding marked exactly where the box leaves the image
        top, left, bottom, right = patch["box"]
        assert patch["padded"] == (top < 0 or left < 0 or bottom > 128 or right > 128)


@pytest.mark.parametrize("channels, expected", [("top:2", 2), ("all", 96), ([3], 1)])
def test_channel_choices(embedded, shapes, channels, expected):
    inspection = TopPatches(layer="layer4", k=2, channels=channels).inspect(embedded, shapes[:6])
    assert inspection.metrics["channels"] == expected
    if channels == "top:2":  # the two channels whose best activation is highest
        tops = [r["patches"][0]["value"] for r in inspection.records]
        assert tops == sorted(tops, reverse=True)


@pytest.mark.parametrize("fields, message", [
    ({"channels": "top:0"}, "channels must be top:N"),
    ({"channels": "some"}, "channels must be top:N"),
    ({"k": 0}, "k must be a positive integer"),
])
def test_bad_config(fields, message):
    with pytest.raises(ConfigError, match=message):
        TopPatches(**fields)


def test_bad_layer_and_channel(embedded, shapes):
    with pytest.raises(ConfigError, match="layer3"):
        TopPatches(layer="layr3").inspect(embedded, shapes[:2])
    with pytest.raises(ConfigError, match="out of range"):
        TopPatches(layer="layer2", channels=[500]).inspect(embedded, shapes[:2])


def test_top_patches_run(vizkit_cli):
    run = vizkit_cli("method=top_patches", "method.layer=layer3", "method.k=4", "data=shapes", "data.count=24", "data.batch_size=8",
                     "trainer.progress_bar=false", env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    results = run.results
    assert results["scanned"] == 24 and results["metrics"]["channels"] == 6
    tags = images_in(run.run_dir)
    assert "top_patches/layer3/summary" in tags and len([t for t in tags if "/channel_" in t]) == 6
    for picture in results["pictures"]:
        assert (run.run_dir / picture["png"]).is_file()


@pytest.mark.slow
def test_two_cpu_processes_find_the_same_top_patches_as_one(vizkit_cli):
    common = ("method=top_patches", "method.layer=layer3", "method.channels=all", "method.k=3", "data=shapes", "data.count=11",
              "data.batch_size=3", "trainer.accelerator=cpu", "trainer.progress_bar=false")
    single = vizkit_cli(*common)
    double = vizkit_cli(*common, "trainer.devices=2", "trainer.strategy=ddp")
    assert single.returncode == 0 and double.returncode == 0, double.stderr
    assert double.results["records"] == single.results["records"]
    assert not list(double.run_dir.glob(".*-rank*"))  # the rank files are gone
