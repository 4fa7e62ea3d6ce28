"""Metrics: numbers that say how good attribution maps are (the contract is in ``vizkit.metrics.base``).

    deletion        AUC of the class probability as the most important pixels are removed (lower is better)
    insertion       AUC of the class probability as they are revealed (higher is better)
    pointing_game   does the map's maximum lie on the object (higher)
    mask_energy     share of positive attribution on the object (higher)
    randomization   rank correlation of maps with the trained and re-initialized models (lower)

``create_metric("deletion", steps=64)`` from Python; on the command line ``metrics=[deletion,insertion]
metrics.deletion.steps=64``: ``store_configs()`` stores each Config in Hydra's ConfigStore under group
``metrics`` at package ``metrics.NAME``. The metric modules import torch only when they compute, so
this registry is cheap to import.
"""
from __future__ import annotations

from typing import Any

from vizkit.configured import configure
from vizkit.errors import ConfigError, did_you_mean
from vizkit.metrics.base import Metric, MetricInputs, MetricResult
from vizkit.metrics.mask_energy import MaskEnergy
from vizkit.metrics.perturbation import Deletion, Insertion
from vizkit.metrics.pointing_game import PointingGame
from vizkit.metrics.randomization import Randomization

__all__ = ["METRICS", "Metric", "MetricInputs", "MetricResult", "create_metric", "get_metric", "metric_from_config", "store_configs"]

GROUP = "metrics"

METRICS: dict[str, type[Metric]] = {cls.name: cls for cls in (Deletion, Insertion, PointingGame, MaskEnergy, Randomization)}


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
    elif isinstance(node, dict):
        values = dict(node)
    else:
        from omegaconf import OmegaConf

        values = OmegaConf.to_container(node, resolve=True)
        if not isinstance(values, dict):
            raise ConfigError(f"metrics.{name} must be a mapping of its fields, got {values!r}")
    return create_metric(name, **{str(key): value for key, value in values.items()})


def store_configs() -> dict[str, type[Metric]]:
    """Store every metric's Config in Hydra's ConfigStore (group ``metrics``, package
    ``metrics.NAME``), so ``metrics=[deletion,pointing_game]`` composes ``cfg.metrics.deletion`` and
    ``cfg.metrics.pointing_game``, type-checked. Returns the metrics stored."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, cls in METRICS.items():
        store.store(group=GROUP, name=name, node=cls.Config, package=f"{GROUP}.{name}")
    return dict(METRICS)


def describe_metrics() -> str:
    """One line per metric, for help pages."""
    width = max(len(name) for name in METRICS)
    return "\n".join(f"  {name:<{width}}  [{cls.better} is better] {cls.description}" for name, cls in sorted(METRICS.items()))
