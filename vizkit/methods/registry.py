"""Method discovery: the ``vizkit.methods`` entry-point group, for built-ins and plugins alike.

``discover()`` loads every entry point once through ``vizkit.core.plugins`` (shared with the metrics):
a plugin whose import raises (or that is not a method class) is reported on stderr with its entry
point's name and skipped; two distributions claiming one name is a ``PluginError`` naming both.
``vizkit.cli.configs.store_method_configs()`` puts each method's config dataclass (``config_node``) in
Hydra's ConfigStore under group ``method`` so
Hydra type-checks ``method.<field>=...``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

from vizkit.core import plugins
from vizkit.core.configured import configure
from vizkit.core.errors import ConfigError, did_you_mean
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


def _check_method_class(name: str, obj: Any) -> str | None:
    """Why `obj` is not a usable method class, or None."""
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        return f"it points to {obj!r}, not a subclass of vizkit.methods.base.Method"
    if getattr(obj, "name", None) != name:
        return f"its class declares name={getattr(obj, 'name', None)!r}, but the entry point is called '{name}'"
    if getattr(obj, "kind", None) not in KINDS:  # the kind comes from the base class: no kind's base, no way to run it
        return (f"it subclasses none of the kinds' bases (AttributionMethod, OptimizationMethod, AdversarialMethod, "
                f"InspectionMethod in vizkit.methods.base), so vizkit cannot run it")
    return plugins.config_problem(obj)


@lru_cache(maxsize=1)
def discover() -> dict[str, MethodEntry]:
    """Every loadable method, by name."""
    found = plugins.discover(ENTRY_POINT_GROUP, "method", _check_method_class)
    return {name: MethodEntry(name, plugin.obj, plugin.distribution) for name, plugin in found.items()}


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


def method_from_config(node: Mapping[str, Any]) -> Method:
    """The method described by a ``method`` mapping (``_name_`` plus its fields).

    Compares the keys with the dataclass fields: ``+method.foo=1`` is accepted by Hydra on a
    structured node and then dropped silently, which would hide a typo.
    """
    values = dict(node)
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
    """One line per method for ``vizkit --help``, grouped by the kind each runs as (its base class)."""
    methods = discover()
    width = max((len(n) for n in methods), default=0)
    ordered = sorted(methods.items(), key=lambda item: (KINDS.index(item[1].kind), item[0]))
    return "\n".join(f"  {name:<{width}}  [{entry.kind}] {entry.description}" for name, entry in ordered)
