"""Method discovery through real entry points: a broken plugin is reported and skipped; two plugins
with one name is an error naming both distributions."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vizkit
from vizkit.methods import registry
from vizkit.core.errors import ConfigError

VIZKIT = Path(sys.executable).parent / "vizkit"


def make_distribution(site: Path, name: str, entry_points: dict[str, str], modules: dict[str, str], group: str = "vizkit.methods") -> None:
    """A real installed distribution (dist-info with entry_points.txt) on a path importlib scans."""
    dist_info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "\n".join(f"{key} = {value}" for key, value in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[{group}]\n{lines}\n")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)


def vizkit_with(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([str(VIZKIT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_builtins_register_through_the_entry_point_group():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="vizkit.methods") if ep.dist.name == "vizkit"}
    assert names >= {"occlusion", "saliency", "guided_backprop", "deconvnet", "class_model", "feature_viz"}
    assert set(vizkit.list_methods()) >= names
    assert set(vizkit.list_methods("optimization")) >= {"class_model", "feature_viz"}


def test_plugin_that_fails_to_import_is_reported_and_skipped(tmp_path):
    make_distribution(tmp_path, "vizkit-broken", {"broken": "broken_plugin:Broken"},
                      {"broken_plugin": "raise ImportError('needs a library that is not installed')\n"})
    result = vizkit_with(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert "skipping method plugin 'broken' from vizkit-broken 1.0" in result.stderr
    assert "needs a library that is not installed" in result.stderr
    assert result.stderr.count("skipping method plugin 'broken'") == 1
    assert "saliency" in result.stdout and "Traceback" not in result.stderr


def test_two_plugins_with_one_name_is_an_error_naming_both(tmp_path):
    make_distribution(tmp_path, "vizkit-copycat", {"saliency": "copycat_plugin:Saliency"},
                      {"copycat_plugin": "from vizkit.methods.attribution.saliency import Saliency\n"})
    result = vizkit_with(tmp_path, "--help")
    assert result.returncode == 2
    assert "'saliency' is registered by more than one plugin" in result.stderr
    assert "vizkit 0.1.0" in result.stderr and "vizkit-copycat 1.0" in result.stderr
    assert "Traceback" not in result.stderr


def test_plugin_with_a_config_omegaconf_rejects_is_skipped_alone(tmp_path):
    source = (
        "import dataclasses, typing\n"
        "from vizkit.methods.base import AttributionMethod\n"
        "@dataclasses.dataclass\n"
        "class OddConfig:\n"
        "    callback: typing.Callable = print\n"
        "class Odd(AttributionMethod):\n"
        "    name = 'odd'\n    description = 'a config OmegaConf cannot store'\n    Config = OddConfig\n"
    )
    make_distribution(tmp_path, "vizkit-odd", {"odd": "odd_plugin:Odd"}, {"odd_plugin": source})
    result = vizkit_with(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert "skipping method plugin 'odd' from vizkit-odd 1.0: its Config cannot be stored" in result.stderr
    assert "occlusion" in result.stdout


def test_entry_point_that_is_not_a_method_is_skipped(tmp_path):
    make_distribution(tmp_path, "vizkit-notamethod", {"thing": "thing_plugin:thing"}, {"thing_plugin": "thing = 42\n"})
    result = vizkit_with(tmp_path, "--help")
    assert result.returncode == 0
    assert "skipping method plugin 'thing'" in result.stderr and "not a subclass" in result.stderr


def test_create_method_from_python():
    method = vizkit.create_method("occlusion", window=16)
    assert method.config.window == 16 and method.kind == "attribution"
    with pytest.raises(ConfigError, match="unknown field.*windw.*window"):
        vizkit.create_method("occlusion", windw=3)
    with pytest.raises(ConfigError, match="unknown method 'occlusoin'.*closest: occlusion"):
        vizkit.create_method("occlusoin")


def test_config_node_carries_the_method_name_and_its_fields():
    node = registry.config_node(registry.get("occlusion"))
    fields = {f.name: f.default for f in dataclasses.fields(node)}
    assert fields["_name_"] == "occlusion" and fields["window"] == 16
    method = registry.method_from_config({"_name_": "occlusion", "window": 8, "stride": 4})
    assert (method.config.window, method.config.stride) == (8, 4)


def test_a_method_of_no_kinds_base_is_reported_and_skipped(tmp_path, monkeypatch, capsys):
    """The kind comes from the base class: a class that subclasses Method but none of the four kinds'
    bases has no way to run, and is said so by name instead of failing later."""
    source = "from vizkit.methods.base import Method\nclass Kindless(Method):\n    name = 'kindless'\n    description = 'no kind'\n"
    make_distribution(tmp_path, "vizkit-kindless", {"kindless": "kindless_plugin:Kindless"}, {"kindless_plugin": source})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.discover.cache_clear()
    try:
        found = registry.discover()
    finally:
        monkeypatch.undo()
        registry.discover.cache_clear()
    assert "kindless" not in found and "saliency" in found
    assert "skipping method plugin 'kindless' from vizkit-kindless 1.0: it subclasses none of the kinds' bases" in capsys.readouterr().err
