"""Bad input: a short error naming the culprit and what would be right, exit status 2, no traceback,
and nothing earlier overwritten."""
from __future__ import annotations

import re

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
    from vizkit.core.models import embedded_card

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


def test_mistyped_field_names_the_fields_at_once(vizkit_cli):
    """Hydra's own answer would be "To append to your config use +method.windw=3": a hint that only
    leads to the right message one run later."""
    run = vizkit_cli("method=occlusion", "method.windw=3")
    assert_clean_failure(run, "method occlusion has no field 'windw'; closest: window; its fields: window, stride, fill, batch_size, score")
    assert "+method.windw" not in run.stderr and run.returncode == 2
    default = vizkit_cli("method.steps=3")  # the default method, saliency
    assert_clean_failure(default, "method saliency has no field 'steps'; its fields: reduce")


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


def test_pretrained_without_a_network_fails_fast(vizkit_cli, tmp_path):
    """Without HF_HUB_OFFLINE the hub client retried for ~70 s; one probe of the hub (here a closed
    local port) now says it is unreachable at once."""
    import os
    import time

    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    started = time.monotonic()
    run = vizkit_cli("model=resnet18", "model.pretrained=true", env={**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
                                                                    "HF_HUB_OFFLINE": "0"})
    assert_clean_failure(run, "could not load pretrained weights for 'resnet18': 127.0.0.1 is unreachable", "model.checkpoint=PATH")
    assert time.monotonic() - started < 60  # not a timing claim: the retries took over a minute


@pytest.mark.parametrize("override, message", [
    ("seed=abc", "seed must be a whole number, got 'abc'"),
    ("seed=1e23", "seed must be a whole number, got 1e+23"),
    ("tensorboard_images=abc", "tensorboard_images must be a whole number, got 'abc'; or 'all'"),
    ("tensorboard_images=-1", "tensorboard_images must be at least 0, got -1"),
    ("trainer.devices=0", "trainer.devices must be at least 1, got 0"),
    ("trainer.accelerator=tpx", "trainer.accelerator must be one of auto, cpu, gpu"),
    ("trainer.precision=17", "trainer.precision must be one of"),
])
def test_top_level_and_trainer_settings_are_checked(compose, tmp_path, override, message):
    from vizkit.core.errors import ConfigError
    from vizkit.cli.app import run

    with pytest.raises(ConfigError, match=re.escape(message)):
        run(compose(override), tmp_path / "run")


def test_a_gpu_asked_for_where_there_is_none_is_a_clear_error(vizkit_cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run = vizkit_cli("trainer.accelerator=gpu")
    assert_clean_failure(run, "trainer.accelerator=gpu, but no GPU is visible to torch here: use trainer.accelerator=auto")
    assert run.returncode == 2


def test_a_file_name_with_an_interpolation_is_explained(vizkit_cli, tmp_path):
    run = vizkit_cli("data=images", "data.paths=[" + str(tmp_path / "a${x}.png") + "]")
    assert_clean_failure(run, "Interpolation key 'x' not found", "a literal '${' in a value, such as a file name, is written '\\${'")


def test_listed_channels_a_layer_lacks_are_refused_at_the_first_batch(compose, tmp_path):
    from vizkit.core.errors import ConfigError
    from vizkit.cli.app import run

    with pytest.raises(ConfigError, match=r"channel 999 is out of range: layer 'default' has \d+ channels"):
        run(compose("method=top_patches", "method.channels=[0,999]", "data=shapes", "data.count=64", "data.batch_size=4"), tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()


def test_an_input_called_grid_does_not_collide_with_the_grid(vizkit_cli, tmp_path):
    write_image(tmp_path / "in" / "grid.png", size=(64, 64)) if (tmp_path / "in").mkdir() is None else None
    write_image(tmp_path / "in" / "cat.png", size=(64, 64), seed=1)
    run = vizkit_cli("method=deep_dream", "method.steps=3", "data=images", f"data.paths=[{tmp_path / 'in'}]", "trainer.progress_bar=false")
    assert run.returncode == 0, run.stderr
    assert [image["name"] for image in run.results["images"]] == ["cat", "grid_2"]
    assert {p.name for p in (run.run_dir / "images").iterdir()} == {"cat.png", "grid_2.png", "grid.png"}


def test_a_full_disk_is_a_clear_error_and_leaves_no_broken_archive(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) makes writes fail as a full disk does."""
    import json
    import os
    import resource
    import signal
    import subprocess

    from conftest import VIZKIT

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    run_dir = tmp_path / "run"
    completed = subprocess.run([str(VIZKIT), f"hydra.run.dir={run_dir}", "data=shapes", "data.count=16", "trainer.progress_bar=false"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=limit,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 2 and "Traceback" not in completed.stderr, completed.stderr
    assert "vizkit: error: File too large" in completed.stderr and f"what was written before is kept in {run_dir}" in completed.stderr
    assert not (run_dir / "maps.npz").exists()  # nothing half-written under a real name
    results = json.loads((run_dir / "results.json").read_text())  # what was written, and why the run failed
    assert results["status"] == "failed" and "File too large" in results["error"] and "images/" in " ".join(results["written"])
    assert json.loads((run_dir / ".vizkit-run").read_text())["status"] == "failed"


@pytest.mark.parametrize("argv, message", [
    (["data=shapes", "data.cont=3"], "data=shapes has no field 'cont'; closest: count; its fields: kind, batch_size, workers, pin_memory, split, start, count"),
    (["data.count=3"], "data=samples has no field 'count'; its fields: kind, batch_size, workers, pin_memory, paths"),
    (["model.nme=resnet18"], "model=embedded has no field 'nme'; closest: name"),
    (["trainer=cpu", "trainer.devics=2"], "trainer=cpu has no field 'devics'; closest: devices"),
])
def test_a_typo_in_a_model_data_or_trainer_field_names_the_presets_fields(argv, message):
    """The fields come from the dataclass the preset extends (its base_* schema), with the close match."""
    from vizkit.cli.app import _check_group_fields
    from vizkit.core.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        _check_group_fields(argv)
    _check_group_fields(["data=shapes", "data.count=3", "model.name=resnet18", "trainer.devices=1"])  # right fields pass
