"""The runner in-process: composed configs (Hydra's compose API on conf/) through a real Trainer."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import images_in, write_image

from vizkit.core.errors import ConfigError
from vizkit.core.models import embedded_card
from vizkit.cli.app import run


def test_class_name_target_on_the_embedded_model(compose, tmp_path):
    name = embedded_card()["classes"][2]
    results = run(compose("data=shapes", "data.count=3", f"target=class:{name}"), tmp_path)
    assert {(r["target"]["index"], r["target"]["name"]) for r in results["inputs"]} == {(2, name)}


@pytest.mark.parametrize("method", ["saliency", "guided_backprop", "deconvnet"])
def test_channel_and_neuron_targets_through_the_runner(compose, tmp_path, method):
    for i, target in enumerate(["channel:layer3:5", "neuron:layer2.0:3:4:4"]):
        results = run(compose("data=shapes", "data.count=2", f"method={method}", f"target={target}"), tmp_path / str(i))
        for record in results["inputs"]:  # the caption reports the target's score where a class would have a probability
            assert record["target"] == {"kind": target.split(":")[0], "spec": target, "score": pytest.approx(record["target"]["score"])}
            assert record["caption"] == f"{target} score={record['target']['score']:.3g} · {method}"
        with np.load(tmp_path / str(i) / "maps.npz") as maps:
            assert all(maps[f].shape == (1, 128, 128) and np.isfinite(maps[f]).all() for f in maps.files)


def test_shapes_runs_report_labels_and_accuracy(compose, tmp_path):
    results = run(compose("data=shapes", "data.count=6", "data.batch_size=4", "method=occlusion", "method.window=32", "method.stride=32"), tmp_path)
    classes = embedded_card()["classes"]
    assert [r["label_name"] for r in results["inputs"]] == [classes[r["label"]] for r in results["inputs"]]
    assert results["metrics"]["top1_accuracy"] >= 5 / 6
    assert [r["name"] for r in results["inputs"]] == sorted(r["name"] for r in results["inputs"])  # input order kept across batches


def test_any_timm_model_on_user_images(compose, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, mode in enumerate(["RGB", "L", "RGBA"]):
        write_image(folder / f"p{i}.png", size=(150, 100), mode=mode, seed=i)
    results = run(compose("model.name=test_resnet", "model.num_classes=7", "data=images", f"data.paths=[{folder}]", "method=guided_backprop"), tmp_path / "run")
    assert [r["name"] for r in results["inputs"]] == ["p0", "p1", "p2"]
    assert results["model"]["data_config"]["input_size"] == [3, 160, 160]  # from timm's data config
    assert sorted(images_in(tmp_path / "run")) == ["p0/panel", "p1/panel", "p2/panel"]
    assert all(len(r["top5"]) == 5 and r["top5"][0]["name"] == str(r["top5"][0]["index"]) for r in results["inputs"])


def test_attribution_maps_of_the_embedded_model_point_at_the_object(compose, tmp_path):
    """Sanity of the whole chain (data, normalization, model, method): occlusion's strongest drop lies on
    the object for most held-out images."""
    from vizkit.core.data import load_shapes
    from vizkit.core.models import data_config, load_model

    run(compose("data=shapes", "data.count=12", "method=occlusion", "method.window=24", "method.stride=8", "method.score=logit"), tmp_path)
    samples = {s.name: s for s in load_shapes(12, "test", 0, data_config(load_model("embedded")))}
    hits = 0
    with np.load(tmp_path / "maps.npz") as maps:
        for name in maps.files:
            peak = np.unravel_index(np.argmax(maps[name][0]), maps[name][0].shape)
            hits += bool(samples[name].mask[0][peak])
    assert hits >= 9, f"occlusion peak on the object in {hits}/12 images"


def test_the_kind_comes_from_the_base_class_and_picks_the_run_family(compose, tmp_path):
    """A class cannot declare one kind and run as another; the run family is chosen by base class,
    and a method of no kind's base is refused before any work."""
    import dataclasses

    from vizkit.cli.configs import run_settings
    from vizkit.methods.base import AttributionMethod, Method, OptimizationMethod
    from vizkit.methods.optimization.fooling_images import FoolingImages
    from vizkit.run.attribution import AttributionRun
    from vizkit.run.execute import execute, family_of
    from vizkit.run.optimization import OptimizationRun

    with pytest.raises(TypeError, match="declares kind='optimization' but subclasses AttributionMethod"):
        type("Sneaky", (AttributionMethod,), {"kind": "optimization", "name": "sneaky", "description": ""})
    assert FoolingImages.kind == "optimization" and issubclass(FoolingImages, OptimizationMethod)
    assert family_of(FoolingImages) is OptimizationRun and family_of(AttributionMethod) is AttributionRun

    class Kindless(Method):
        name, description = "kindless", "no family"

    with pytest.raises(ConfigError, match="Kindless subclasses none of the method bases"):
        execute(dataclasses.replace(run_settings(compose()), method=Kindless()), tmp_path)
    assert not list(tmp_path.iterdir())


def test_layers_command_lists_addressable_layers():
    listed = subprocess.run([str(Path(sys.executable).parent / "vizkit-layers"), "embedded", "--filter", "layer4"],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert rows[0][0] == "layer4" and all(row[0].startswith("layer4") for row in rows)
    assert any(row[1] == "ReLU" for row in rows)
    assert rows[0][2:] == ["96x4x4", "gradcam"]  # the layer each family's default picks is marked
    from vizkit.cli.layers import layer_table
    from tiny_models import timm_model

    vit = {name: (shape, roles) for name, _, shape, roles in layer_table(timm_model("test_vit"), (3, 160, 160))}
    assert vit["blocks.5.norm1"] == ("64x10x10 (tokens)", "gradcam, top_patches") and vit["patch_embed.proj"][1] == "filters"
    assert vit["blocks.0.mlp.act"][1] == "inversion"
    unknown = subprocess.run([str(Path(sys.executable).parent / "vizkit-layers"), "resnet81"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "closest: resnet18" in unknown.stderr and "Traceback" not in unknown.stderr
