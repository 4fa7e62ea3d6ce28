"""Metrics: numbers that say how good attribution maps are (the contract is in ``vizkit.metrics.base``).

Built in (registered in vizkit's own ``pyproject.toml``):

    deletion        AUC of the class probability as the most important pixels are removed (lower is better)
    insertion       AUC of the class probability as they are revealed (higher is better)
    pointing_game   does the map's maximum lie on the object (higher)
    mask_energy     share of positive attribution on the object (higher)
    randomization   rank correlation of maps with the trained and re-initialized models (lower)
    road_morf       class probability as the most relevant pixels are imputed away (ROAD; lower)
    road_lerf       class probability as the least relevant pixels are imputed away (ROAD; higher)
    average_drop    relative drop of the class probability on the image masked by the map (lower)
    increase_in_confidence  whether the masked image is more confident than the image (higher)
    infidelity      squared error of the map's prediction of the score drop under Gaussian noise (lower)
    sensitivity_max largest relative change of the map under small input noise; reruns the method (lower)

Every metric, built-in or third-party, registers through the entry-point group ``vizkit.metrics``
(``gini = "vizkit_sparsity.gini:Gini"``) and is discovered by ``vizkit.core.plugins``, the code the
methods use: a plugin that fails to import is reported and skipped, two with one name is an error.
``METRICS`` maps each name to its class, discovered on first use.

``create_metric("deletion", steps=64)`` from Python; on the command line ``metrics=[deletion,insertion]
metrics.deletion.steps=64``, or ``metrics=all`` for every installed metric: ``vizkit.cli.configs``
stores each Config in Hydra's ConfigStore under group ``metrics`` at package ``metrics.NAME``. The metric
modules import torch only when they compute, so this registry is cheap to import.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

from vizkit.core import plugins
from vizkit.core.configured import configure
from vizkit.core.errors import ConfigError, did_you_mean
from vizkit.metrics.base import Metric, MetricInputs, MetricResult

__all__ = ["METRICS", "Metric", "MetricInputs", "MetricResult", "create_metric", "get_metric", "metric_from_config"]

ENTRY_POINT_GROUP = "vizkit.metrics"
GROUP = "metrics"
ALL = "all"  # metrics=all: the option that selects every installed metric (so no metric may take the name)
BETTER = ("higher", "lower")


def _check_metric_class(name: str, obj: Any) -> str | None:
    """Why ``obj`` is not a usable metric class, or None."""
    if not (isinstance(obj, type) and issubclass(obj, Metric)):
        return f"it points to {obj!r}, not a subclass of vizkit.metrics.base.Metric"
    if getattr(obj, "name", None) != name:
        return f"its class declares name={getattr(obj, 'name', None)!r}, but the entry point is called '{name}'"
    if name == ALL:
        return f"the name '{ALL}' is reserved: metrics={ALL} selects every installed metric"
    if getattr(obj, "better", None) not in BETTER:
        return f"its better {getattr(obj, 'better', None)!r} is not one of {', '.join(BETTER)}"
    if not isinstance(getattr(obj, "description", None), str):  # vizkit --help prints it for every metric
        return "it has no one-line description (a class attribute `description`)"
    return plugins.config_problem(obj)


@lru_cache(maxsize=1)
def discover() -> dict[str, plugins.Plugin]:
    """Every loadable metric, by name (its ``obj`` is the class)."""
    return plugins.discover(ENTRY_POINT_GROUP, "metric", _check_metric_class)


class _InstalledMetrics(Mapping):
    """Name -> class of every installed metric. Discovery waits for the first look, since it runs
    the plugins' code; importing ``vizkit.metrics`` stays cheap."""

    def __getitem__(self, name: str) -> type[Metric]:
        return discover()[name].obj

    def __iter__(self) -> Iterator[str]:
        return iter(discover())

    def __len__(self) -> int:
        return len(discover())

    def __repr__(self) -> str:
        return f"METRICS({dict(self)!r})"


METRICS: Mapping[str, type[Metric]] = _InstalledMetrics()


def get_metric(name: str) -> type[Metric]:
    """The metric class called ``name``."""
    if name not in METRICS:
        raise ConfigError(f"unknown metric '{name}'; available: {', '.join(sorted(METRICS))}{did_you_mean(name, METRICS)}")
    return METRICS[name]


def create_metric(name: str, /, **fields: Any) -> Metric:
    """A metric by name, configured by keyword fields: ``create_metric("deletion", steps=64)``."""
    return configure(get_metric(name), name, fields)


def metric_from_config(name: str, node: Any) -> Metric:
    """The metric ``name`` configured by a composed ``metrics.NAME`` node (or a dict of its fields).

    The keys are checked against the Config's fields: Hydra accepts ``+metrics.deletion.foo=1`` on a
    structured node, and a typo must not vanish silently.
    """
    if node is None:
        values: dict[str, Any] = {}
    elif isinstance(node, Mapping):
        values = dict(node)
    else:
        raise ConfigError(f"metrics.{name} must be a mapping of its fields, got {node!r}")
    return create_metric(name, **{str(key): value for key, value in values.items()})


def describe_metrics() -> str:
    """One line per metric, for help pages."""
    width = max((len(name) for name in METRICS), default=0)
    return "\n".join(f"  {name:<{width}}  [{cls.better} is better] {cls.description}" for name, cls in sorted(METRICS.items()))
