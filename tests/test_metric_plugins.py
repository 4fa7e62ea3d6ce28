"""Metrics are plugins, exactly like methods: the built-ins register through the entry-point group
``vizkit.metrics``; a broken plugin is reported and skipped; two with one name is an error naming
both; a third-party metric (vizkit-sparsity's ``gini``, installed from plugins/) shows in the help,
runs in ``metrics=[...]`` and joins the compare_attribution experiment.

Fake plugins are real distributions (dist-info with entry_points.txt, ``make_distribution`` from
test_registry) on a folder prepended to sys.path, and discovery runs in-process: its cache is
cleared before and after, so every other test sees the installed metrics only."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from test_registry import make_distribution
from vizkit import metrics
from vizkit.cli.configs import store_metric_configs
from vizkit.core.errors import ConfigError, PluginError
from vizkit.metrics import METRICS, create_metric, get_metric

VIZKIT = Path(sys.executable).parent / "vizkit"
BUILT_IN = {"deletion", "insertion", "pointing_game", "mask_energy", "randomization", "road_morf", "road_lerf", "average_drop",
            "increase_in_confidence", "infidelity", "sensitivity_max"}


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder importlib scans for distributions, with metric discovery fresh before and after."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    metrics.discover.cache_clear()
    yield folder
    monkeypatch.undo()  # the fake distributions leave sys.path before discovery runs again
    metrics.discover.cache_clear()
    store_metric_configs()  # the ConfigStore's metrics=all again holds the installed metrics only


def metric_source(class_name: str, name: str, body: str = "", config: str = "") -> str:
    """A plugin module with one metric class (``config``: the source of a ``Config`` dataclass)."""
    return (
        "import dataclasses, typing\n"
        "from vizkit.metrics.base import Metric, MetricResult\n"
        f"{config}\n"
        f"class {class_name}(Metric):\n"
        f"    name = {name!r}\n    description = 'a test metric'\n{body}"
        "    def evaluate(self, inputs):\n        return MetricResult(values=inputs.maps.flatten(1).sum(1))\n"
    )


# ---------------------------------------------------------------- built-ins


def test_builtins_register_through_the_entry_point_group():
    own = {ep.name: ep.value for ep in entry_points(group="vizkit.metrics") if ep.dist.name == "vizkit"}
    assert set(own) == BUILT_IN
    assert all(value.startswith("vizkit.metrics.") for value in own.values())
    for name, value in own.items():  # METRICS is what the entry points load, and still a mapping
        module, _, attribute = value.partition(":")
        assert METRICS[name].__module__ == module and METRICS[name].__name__ == attribute
    assert set(METRICS) >= BUILT_IN | {"gini"} and len(METRICS) == len(dict(METRICS)) == len(list(METRICS.items()))
    assert metrics.discover()["deletion"].distribution == "vizkit 0.1.0"


# ---------------------------------------------------------------- broken plugins


def test_metric_that_fails_to_import_is_reported_once_and_skipped(site, capsys):
    make_distribution(site, "vizkit-brokenmetric", {"broken": "broken_metric:Broken"},
                      {"broken_metric": "raise ImportError('needs a library that is not installed')\n"}, group="vizkit.metrics")
    assert "broken" not in METRICS and set(METRICS) >= BUILT_IN
    get_metric("deletion")
    assert create_metric("gini").name == "gini"  # the others still work
    stderr = capsys.readouterr().err
    assert "skipping metric plugin 'broken' from vizkit-brokenmetric 1.0: import failed: ImportError: needs a library that is not installed" in stderr
    assert stderr.count("skipping metric plugin 'broken'") == 1  # discovered once, however often it is asked
    with pytest.raises(ConfigError, match="unknown metric 'broken'"):
        get_metric("broken")


@pytest.mark.parametrize(
    "entry_point, attribute, source, problem",
    [
        ("thing", "thing", "thing = 42\n", "it points to 42, not a subclass of vizkit.metrics.base.Metric"),
        ("other", "Odd", metric_source("Odd", "odd"), "its class declares name='odd', but the entry point is called 'other'"),
        ("all", "Everything", metric_source("Everything", "all"), "the name 'all' is reserved: metrics=all selects every installed metric"),
        ("sideways", "Sideways", metric_source("Sideways", "sideways", body="    better = 'sideways'\n"), "its better 'sideways' is not one of higher, lower"),
        ("needy", "Needy", metric_source("Needy", "needy", body="    Config = NeedyConfig\n", config="@dataclasses.dataclass\nclass NeedyConfig:\n    steps: int\n"),
         "its Config fields steps have no default"),
    ],
)
def test_entry_point_that_is_not_a_usable_metric_is_skipped(site, capsys, entry_point, attribute, source, problem):
    module = f"bad_metric_{entry_point}"
    make_distribution(site, "vizkit-badmetric", {entry_point: f"{module}:{attribute}"}, {module: source}, group="vizkit.metrics")
    assert entry_point not in METRICS and set(METRICS) >= BUILT_IN
    assert f"skipping metric plugin '{entry_point}' from vizkit-badmetric 1.0: {problem}" in capsys.readouterr().err


def test_metric_whose_config_omegaconf_rejects_is_skipped_alone(site, capsys):
    config = "@dataclasses.dataclass\nclass OddConfig:\n    callback: typing.Callable = print\n"
    make_distribution(site, "vizkit-oddmetric", {"odd": "odd_metric:Odd"},
                      {"odd_metric": metric_source("Odd", "odd", body="    Config = OddConfig\n", config=config)}, group="vizkit.metrics")
    stored = store_metric_configs()
    assert "odd" not in stored and set(stored) >= BUILT_IN | {"gini"}
    assert "skipping metric plugin 'odd' from vizkit-oddmetric 1.0: its Config cannot be stored" in capsys.readouterr().err


def test_two_plugins_with_one_metric_name_is_an_error_naming_both(site, capsys, monkeypatch):
    make_distribution(site, "vizkit-copycat", {"deletion": "copycat_metric:Deletion"},
                      {"copycat_metric": "from vizkit.metrics.perturbation import Deletion\n"}, group="vizkit.metrics")
    with pytest.raises(PluginError) as raised:
        get_metric("deletion")
    message = str(raised.value)
    assert message.startswith("metric 'deletion' is registered by more than one plugin: vizkit 0.1.0 and vizkit-copycat 1.0")
    assert "vizkit.metrics.perturbation:Deletion" in message and "copycat_metric:Deletion" in message
    assert message.endswith("uninstall one of them")

    from vizkit.cli import app

    monkeypatch.setattr(sys, "argv", ["vizkit", "--help"])
    with pytest.raises(SystemExit) as exited:  # the command says it in one line, before Hydra starts
        app.main()
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert f"vizkit: error: {message}" in stderr and "Traceback" not in stderr


# ---------------------------------------------------------------- a third-party metric, end to end


def test_third_party_metric_is_listed_in_the_help():
    result = subprocess.run([str(VIZKIT), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("== Metrics", 1)[1].split("\n==", 1)[0]
    listed = {line.split()[0] for line in section.splitlines()[1:] if line.strip()}
    assert listed >= BUILT_IN | {"gini", "metrics=all"}
    assert any(line.split()[:3] == ["gini", "[higher", "is"] for line in section.splitlines() if line.strip())
    assert "skipping" not in result.stderr


def test_third_party_metric_runs_in_metrics_list(compose, tmp_path):
    from vizkit.cli.app import run

    results = run(compose("data=shapes", "data.count=2", "metrics=[gini]"), tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert "gini" in written["metrics"] and 0.0 < written["metrics"]["gini"] < 1.0
    assert set(written["metric_configs"]) == {"gini"}
    assert written["metric_configs"]["gini"]["better"] == "higher"
    assert results["metrics"]["gini"] == pytest.approx(written["metrics"]["gini"])
    assert all(0.0 < record["metrics"]["gini"] < 1.0 for record in written["inputs"])


def test_compare_attribution_uses_every_installed_metric(compose):
    from vizkit.cli.configs import run_settings

    cfg = compose("+experiment=compare_attribution")
    assert set(cfg.metrics) == set(METRICS) and "gini" in cfg.metrics
    assert cfg.metrics.randomization.max_steps == 5  # the experiment's own setting still applies
    settings = run_settings(cfg)
    assert {metric.name for metric in settings.metrics} == set(METRICS)
    assert set(compose("metrics=all").metrics) == set(METRICS)


def test_all_is_an_option_not_a_metric_name():
    from vizkit.cli.app import _check_metric_names

    _check_metric_names(["metrics=all", "metrics=[all,gini]"])
    with pytest.raises(ConfigError, match="unknown metric 'ginni'.*closest: gini"):
        _check_metric_names(["metrics=[all,ginni]"])
