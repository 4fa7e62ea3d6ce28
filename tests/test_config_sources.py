"""Configs from outside vizkit's own conf/, through the real `vizkit` command: a folder of the user's
own (``--config-dir`` and ``hydra.searchpath``), presets shipped by an installed plugin (the
``vizkit.configs`` entry points; vizkit-rise ships ``method/rise_fine``), and a plugin whose config
package is missing (reported and skipped)."""
from __future__ import annotations

import subprocess

from conftest import VIZKIT
from test_registry import make_distribution, vizkit_with

MINE = """\
# @package _global_
# a user's own experiment: guided backprop on the star class
defaults:
  - override /method: guided_backprop
target: class:star
method:
  reduce: abs_sum
"""


def write_experiment(folder):
    (folder / "experiment").mkdir(parents=True)
    (folder / "experiment" / "mine.yaml").write_text(MINE)


def assert_ran_mine(run):
    assert run.returncode == 0, run.stderr
    results = run.results
    assert results["method"]["name"] == "guided_backprop" and results["method"]["config"]["reduce"] == "abs_sum"
    assert [item["target"]["name"] for item in results["inputs"]] == ["star"] * 6


def test_a_config_folder_of_the_users_own_through_config_dir(vizkit_cli, tmp_path):
    write_experiment(tmp_path / "my_conf")
    assert_ran_mine(vizkit_cli("--config-dir", "my_conf", "+experiment=mine", "trainer.progress_bar=false"))


def test_a_config_folder_of_the_users_own_through_hydra_searchpath(vizkit_cli, tmp_path):
    write_experiment(tmp_path / "elsewhere" / "conf")
    run = vizkit_cli(f"hydra.searchpath=[file://{tmp_path / 'elsewhere' / 'conf'}]", "+experiment=mine", "trainer.progress_bar=false")
    assert_ran_mine(run)


def test_a_plugins_preset_is_found_once_the_plugin_is_installed(vizkit_cli):
    """vizkit-rise declares ``vizkit-rise = "vizkit_rise.conf"`` in ``vizkit.configs``; its
    ``method/rise_fine.yaml`` starts from ``rise`` and sets a finer grid and more masks."""
    listed = subprocess.run([str(VIZKIT), "--help"], capture_output=True, text=True, timeout=120)
    assert "rise_fine" in listed.stdout.split("== Configuration groups")[1]
    run = vizkit_cli("method=rise_fine", "method.masks=64", "trainer.progress_bar=false")
    assert run.returncode == 0, run.stderr
    results = run.results
    assert results["method"]["name"] == "rise"
    assert results["method"]["config"]["cells"] == 12 and results["method"]["config"]["masks"] == 64  # preset, then the override
    assert run.run_dir.name.endswith("_rise_fine") and len(results["inputs"]) == 6


def test_a_plugin_whose_config_package_is_missing_is_reported_and_skipped(tmp_path):
    make_distribution(tmp_path, "vizkit-lost", {"vizkit-lost": "lost_plugin.conf"}, {}, group="vizkit.configs")
    result = vizkit_with(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert "skipping the configs of plugin 'vizkit-lost' from vizkit-lost: 'lost_plugin.conf' is not an importable package" in result.stderr
    assert "rise_fine" in result.stdout  # the other plugins' presets are still there
