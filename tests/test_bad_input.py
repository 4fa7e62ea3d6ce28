"""Bad input: a short error naming the culprit and what would be right, exit status 2, no traceback,
and nothing earlier overwritten."""
from __future__ import annotations

import pytest
from conftest import write_image


def assert_clean_failure(run, *fragments):
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr
    for fragment in fragments:
        assert fragment in run.stderr, run.stderr


def test_missing_image(vizkit_cli, tmp_path):
    write_image(tmp_path / "cat.png")
    run = vizkit_cli("data=images", f"data.paths=[{tmp_path / 'cta.png'}]")
    assert_clean_failure(run, "image not found", "cta.png", "closest: cat.png")
    assert run.returncode == 2


def test_corrupt_image(vizkit_cli, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    run = vizkit_cli("data=images", f"data.paths=[{tmp_path / 'broken.jpg'}]")
    assert_clean_failure(run, "cannot read image", "broken.jpg")


def test_unknown_model_lists_close_names(vizkit_cli):
    run = vizkit_cli("model.name=resnet81")
    assert_clean_failure(run, "unknown model 'resnet81'", "resnet18")


def test_unknown_layer_lists_close_names(vizkit_cli):
    run = vizkit_cli("target=channel:layer5:0")
    assert_clean_failure(run, "layer 'layer5' not found", "layer4")


def test_class_index_out_of_range(vizkit_cli):
    run = vizkit_cli("target=class:99")
    assert_clean_failure(run, "class index 99 is out of range", "classes")


def test_unknown_class_name_lists_close_names(vizkit_cli):
    from vizkit.models import embedded_card

    name = embedded_card()["classes"][0]
    run = vizkit_cli(f"target=class:{name[:-1] + name[-1] * 2}")
    assert_clean_failure(run, "unknown class name", name)


def test_target_kind_the_method_cannot_use(vizkit_cli):
    run = vizkit_cli("method=occlusion", "target=channel:layer1:0")
    assert_clean_failure(run, "occlusion cannot explain a channel target", "class")


@pytest.mark.parametrize("override,message", [("method.window=-4", "window must be a positive integer"),
                                              ("method.stride=0", "stride must be a positive integer")])
def test_bad_occlusion_geometry(vizkit_cli, override, message):
    run = vizkit_cli("method=occlusion", override)
    assert_clean_failure(run, message)


def test_unknown_method_gets_hydras_list(vizkit_cli):
    run = vizkit_cli("method=saliancy")
    assert_clean_failure(run, "saliancy", "Available options", "saliency", "occlusion")


def test_mistyped_field_fails_with_hydras_message(vizkit_cli):
    run = vizkit_cli("method=occlusion", "method.windw=3")
    assert_clean_failure(run, "windw")


def test_appended_unknown_field_is_not_silently_dropped(vizkit_cli):
    run = vizkit_cli("method=occlusion", "+method.windw=3")
    assert_clean_failure(run, "unknown field(s) windw", "window")


def test_pretrained_offline_says_how_to_use_a_local_checkpoint(vizkit_cli, tmp_path):
    # offline and with an empty hub cache: no network is used, and a warm cache elsewhere cannot hide the path
    empty_cache = tmp_path / "hf-home"
    run = vizkit_cli("model=resnet18", "model.pretrained=true", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(empty_cache)})
    assert_clean_failure(run, "could not load pretrained weights for 'resnet18'", "model.checkpoint=PATH")


def test_an_earlier_run_is_never_overwritten(vizkit_cli, tmp_path):
    run_dir = tmp_path / "pinned"
    first = vizkit_cli(f"hydra.run.dir={run_dir}", "data=shapes", "data.count=1")
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    second = vizkit_cli(f"hydra.run.dir={run_dir}", "data=shapes", "data.count=1", "method=occlusion")
    assert_clean_failure(second, "already holds an earlier vizkit run (finished); nothing was changed in it")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
