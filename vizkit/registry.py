"""Method discovery: the ``vizkit.methods`` entry-point group, for built-ins and plugins alike.

``discover()`` loads every entry point once. A plugin whose import raises (or that is not a method
class) is reported on stderr with its entry point's name and skipped; two distributions claiming one
name is a ``PluginError`` naming both (importlib returns both in arbitrary order and Hydra's
ConfigStore would silently keep the last). ``store_configs()`` puts each method's config dataclass in
the ConfigStore under group ``method`` so Hydra type-checks ``method.<field>=...``.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from vizkit.configured import configure
from vizkit.errors import ConfigError, PluginError, did_you_mean
from vizkit.methods.base import KINDS, Method

ENTRY_POINT_GROUP = "vizkit.methods"
NAME_KEY = "_name_"  # the composed ``method`` node carries the method's name under this key


@dataclass(frozen=True)
class MethodEntry:
    name: str
    cls: type[Method]
    distribution: str

    @property
    def kind(self) -> str:
        return self.cls.kind

    @property
    def description(self) -> str:
        return self.cls.description


def _distribution(entry_point: EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"


def _report(message: str) -> None:
    # Hydra's logging is not configured while the app module is imported: say it on stderr ourselves
    print(f"vizkit: {message}", file=sys.stderr)  # user-facing


def _check_method_class(name: str, obj: Any) -> str | None:
    """Why `obj` is not a usable method class, or None."""
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        return f"it points to {obj!r}, not a subclass of vizkit.methods.base.Method"
    if getattr(obj, "name", None) != name:
        return f"its class declares name={getattr(obj, 'name', None)!r}, but the entry point is called '{name}'"
    if getattr(obj, "kind", None) not in KINDS:
        return f"its kind {getattr(obj, 'kind', None)!r} is not one of {', '.join(KINDS)}"
    if not dataclasses.is_dataclass(obj.Config):
        return "its Config is not a dataclass"
    missing = [f.name for f in dataclasses.fields(obj.Config) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        return f"its Config fields {', '.join(missing)} have no default"
    return None


@lru_cache(maxsize=1)
def discover() -> dict[str, MethodEntry]:
    """Every loadable method, by name."""
    by_name: dict[str, list[EntryPoint]] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        by_name.setdefault(entry_point.name, []).append(entry_point)
    methods: dict[str, MethodEntry] = {}
    for name, claimants in sorted(by_name.items()):
        distributions = sorted({_distribution(ep) for ep in claimants})
        if len(claimants) > 1:
            raise PluginError(
                f"method '{name}' is registered by more than one plugin: {' and '.join(distributions)} "
                f"(entry points {', '.join(ep.value for ep in claimants)}); uninstall one of them"
            )
        entry_point = claimants[0]
        try:
            obj = entry_point.load()
        except Exception as error:  # any failure inside third-party code: report, skip, go on
            _report(f"skipping method plugin '{name}' from {distributions[0]}: import failed: {type(error).__name__}: {error}")
            continue
        problem = _check_method_class(name, obj)
        if problem:
            _report(f"skipping method plugin '{name}' from {distributions[0]}: {problem}")
            continue
        methods[name] = MethodEntry(name, obj, distributions[0])
    return methods


def get(name: str) -> MethodEntry:
    methods = discover()
    if name not in methods:
        raise ConfigError(f"unknown method '{name}'; registered: {', '.join(sorted(methods))}{did_you_mean(name, methods)}")
    return methods[name]


def create_method(name: str, /, **fields: Any) -> Method:
    """A method by name, configured by keyword fields: ``create_method("occlusion", window=16)``."""
    return configure(get(name).cls, name, fields)


def config_node(entry: MethodEntry) -> type:
    """The dataclass stored for a method: its Config plus the method's name under ``_name_``."""
    return dataclasses.make_dataclass(
        f"{entry.cls.Config.__name__}Node", [(NAME_KEY, str, dataclasses.field(default=entry.name))], bases=(entry.cls.Config,)
    )


def store_configs() -> dict[str, MethodEntry]:
    """Store every method's config in Hydra's ConfigStore (group ``method``); returns those stored.

    OmegaConf rejects some field types when a node is stored: that plugin is reported and skipped,
    the others still work.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    stored: dict[str, MethodEntry] = {}
    for name, entry in discover().items():
        try:
            from omegaconf import OmegaConf

            node = config_node(entry)
            OmegaConf.structured(node)  # fail here, per plugin, rather than at composition
            store.store(group="method", name=name, node=node)
            stored[name] = entry
        except Exception as error:
            _report(f"skipping method plugin '{name}' from {entry.distribution}: its Config cannot be stored: {type(error).__name__}: {error}")
    return stored


def method_from_config(node: Any) -> Method:
    """The method described by a composed ``method`` node (``_name_`` plus its fields).

    Compares the node's keys with the dataclass fields: ``+method.foo=1`` is accepted by Hydra on a
    structured node and then dropped silently, which would hide a typo.
    """
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else dict(node)
    name = values.pop(NAME_KEY, None)
    if name is None:
        raise ConfigError("the method config has no name; choose one with method=NAME")
    return create_method(name, **values)


def names_of_kind(kind: str) -> list[str]:
    """The registered methods of one kind, sorted (``${vizkit_methods:attribution}`` in a sweep)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown method kind '{kind}'; kinds: {', '.join(KINDS)}")
    return sorted(name for name, entry in discover().items() if entry.kind == kind)


def describe_methods() -> str:
    """One line per method for ``vizkit --help``."""
    methods = discover()
    width = max((len(n) for n in methods), default=0)
    return "\n".join(f"  {name:<{width}}  [{entry.kind}] {entry.description}" for name, entry in sorted(methods.items()))
