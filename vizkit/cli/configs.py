"""Hydra's side of the settings: schemas in the ConfigStore, and the composed config as typed settings.

The defaults live in the dataclasses below the face (``ModelConfig``, the data sources,
``TrainerConfig``, ``RunSettings``); each is stored in Hydra's ConfigStore as a schema with the same
fields and defaults (``base_config``, ``model/base_model``, ``data/base_KIND``,
``trainer/base_trainer``), which the YAML presets in conf/ extend. Every stored field is typed ``Any``:
the values are checked when ``run_settings`` builds the dataclasses, with messages that say what
would be right, rather than by OmegaConf's type errors.

``run_settings(cfg)`` is the one place a composed DictConfig becomes ``RunSettings``; nothing below
this layer sees a DictConfig.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from vizkit.core.data import DATA_KINDS, data_source
from vizkit.core.errors import ConfigError, did_you_mean
from vizkit.core.models import ModelConfig
from vizkit.core.pictures import Render
from vizkit.run.settings import RunSettings, TrainerConfig

GROUPS = ("model", "data", "method", "metrics", "trainer")  # the config groups; the other top-level fields are RunSettings'
TOP_LEVEL = tuple(field.name for field in dataclasses.fields(RunSettings) if field.name not in GROUPS)
NESTED = {"render": Render}  # top-level fields that hold fields of their own: render.cmap=viridis


def schema(cls: type, name: str | None = None, extra: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> type:
    """A Hydra schema with ``cls``'s fields and defaults, every field typed ``Any``; ``extra``: more
    fields (default None), ``skip``: fields left out."""
    fields = []
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if dataclasses.is_dataclass(default):  # a nested group of fields (render.*): a schema of its own, every field Any too
            fields.append((field.name, Any, dataclasses.field(default_factory=schema(type(default)))))
            continue
        fields.append((field.name, Any, dataclasses.field(default=default)))
    fields += [(name, Any, dataclasses.field(default=None)) for name in extra]
    return dataclasses.make_dataclass(name or f"{cls.__name__}Schema", fields)


def store_schemas() -> None:
    """The schemas the YAML presets extend (``defaults: [base_shapes, _self_]``)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="base_config", node=schema(RunSettings, "VizkitConfig", extra=GROUPS, skip=GROUPS))
    store.store(group="model", name="base_model", node=schema(ModelConfig))
    store.store(group="trainer", name="base_trainer", node=schema(TrainerConfig))
    for kind, cls in DATA_KINDS.items():
        store.store(group="data", name=f"base_{kind}", node=schema(cls))


def store_method_configs() -> dict[str, Any]:
    """Store every method's config in Hydra's ConfigStore (group ``method``: its Config plus
    ``_name_``), so Hydra type-checks ``method.FIELD=...``; returns the methods stored.

    OmegaConf rejects some field types when a node is stored: that plugin is reported and skipped,
    the others still work.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from vizkit.core import plugins
    from vizkit.methods import registry

    store = ConfigStore.instance()
    stored = {}
    for name, entry in registry.discover().items():
        try:
            node = registry.config_node(entry)
            OmegaConf.structured(node)  # fail here, per plugin, rather than at composition
            store.store(group="method", name=name, node=node)
            stored[name] = entry
        except Exception as error:
            plugins.report(f"skipping method plugin '{name}' from {entry.distribution}: its Config cannot be stored: {type(error).__name__}: {error}")
    return stored


def store_metric_configs() -> dict[str, Any]:
    """Store every metric's Config in Hydra's ConfigStore (group ``metrics``, package
    ``metrics.NAME``), so ``metrics=[deletion,pointing_game]`` composes ``cfg.metrics.deletion`` and
    ``cfg.metrics.pointing_game``, type-checked; and the option ``all`` (package ``metrics``) that
    holds them all, so ``metrics=all`` composes the same nodes for every metric stored. Returns the
    metrics stored.

    OmegaConf rejects some field types when a node is stored: that plugin is reported and skipped,
    the others still work.
    """
    from hydra.core.config_store import ConfigStore

    from vizkit import metrics
    from vizkit.core import plugins

    store = ConfigStore.instance()
    stored: dict[str, Any] = {}
    for name, plugin in metrics.discover().items():
        try:
            store.store(group=metrics.GROUP, name=name, node=plugin.obj.Config, package=f"{metrics.GROUP}.{name}")
        except Exception as error:  # the store validates the node: fail here, per plugin, not at composition
            plugins.report(f"skipping metric plugin '{name}' from {plugin.distribution}: its Config cannot be stored: {type(error).__name__}: {error}")
            continue
        stored[name] = plugin.obj
    # a defaults list cannot compute its list of options (Hydra resolves interpolations there to one
    # option name only): this one option stands for the list of every metric installed
    store.store(group=metrics.GROUP, name=metrics.ALL, node={name: cls.Config for name, cls in stored.items()}, package=metrics.GROUP)
    return stored


def run_settings(cfg: Any) -> RunSettings:
    """The typed settings of a composed config: the method and metrics configured, model, data and
    trainer as their dataclasses (a field a dataclass lacks is refused by name), targets as plain
    Python. Values are checked by ``RunSettings.check`` when the run starts."""
    from omegaconf import DictConfig, OmegaConf

    from vizkit.methods.registry import method_from_config
    from vizkit.metrics import metric_from_config

    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    values.pop("hydra", None)
    unknown = [key for key in values if key not in GROUPS + TOP_LEVEL]
    if unknown:
        raise ConfigError(f"unknown top-level field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{did_you_mean(unknown[0], GROUPS + TOP_LEVEL)}; "
                          f"the top level holds {', '.join(GROUPS + TOP_LEVEL)}")
    method = method_from_config(values.get("method") or {})
    chosen = values.get("metrics") or {}
    metrics = [metric_from_config(name, chosen[name]) for name in chosen]
    return RunSettings(
        method=method,
        model=_typed(ModelConfig, values.get("model") or {}, "model"),
        data=data_source(values.get("data") or {"kind": "images"}),
        trainer=_typed(TrainerConfig, values.get("trainer") or {}, "trainer"),
        metrics=metrics,
        **{name: values[name] for name in TOP_LEVEL if name in values and name not in NESTED},
        **{name: _typed(cls, values.get(name) or {}, name) for name, cls in NESTED.items()},
    )


def _typed(cls: type, values: dict[str, Any], group: str) -> Any:
    fields = [field.name for field in dataclasses.fields(cls)]
    for key in values:
        if key not in fields:
            raise ConfigError(f"{group} has no field '{key}'{did_you_mean(str(key), fields)}; its fields: {', '.join(fields)}")
    return cls(**values)
