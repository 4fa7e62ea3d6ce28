"""Entry-point discovery shared by every plugin family (methods in ``vizkit.methods``, metrics in
``vizkit.metrics``): built-ins and third-party packages register the same way.

``discover(group, family, check)`` loads every entry point of ``group`` once. A plugin whose import
raises, or whose object ``check`` rejects, is reported on stderr with its entry point's name and
distribution and skipped: one broken package must not take the others down. Two distributions
claiming one name is a ``PluginError`` naming both: importlib returns both in arbitrary order and
Hydra's ConfigStore would silently keep the last.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable

from vizkit.core.errors import PluginError


@dataclass(frozen=True)
class Plugin:
    name: str  # the entry point's name: what users type
    obj: Any  # what the entry point loaded (a class that passed the family's check)
    distribution: str  # "NAME VERSION" of the package that registered it


def distribution(entry_point: EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"


def report(message: str) -> None:
    # Hydra's logging is not configured while the app module is imported: say it on stderr ourselves
    print(f"vizkit: {message}", file=sys.stderr)  # user-facing


def config_problem(cls: type) -> str | None:
    """Why ``cls.Config`` cannot be built from defaults alone (not a dataclass, a field without a
    default), or None. Every family needs this: the ConfigStore composes a node from the defaults."""
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        return "its Config is not a dataclass"
    missing = [f.name for f in dataclasses.fields(config) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        return f"its Config fields {', '.join(missing)} have no default"
    return None


def discover(group: str, family: str, check: Callable[[str, Any], str | None]) -> dict[str, Plugin]:
    """Every loadable plugin of entry-point ``group``, by name (sorted). ``family`` ("method",
    "metric") words the messages; ``check(name, obj)`` says why a loaded object is unusable, or None.
    Callers cache the result: loading runs third-party code."""
    by_name: dict[str, list[EntryPoint]] = {}
    for entry_point in entry_points(group=group):
        by_name.setdefault(entry_point.name, []).append(entry_point)
    found: dict[str, Plugin] = {}
    for name, claimants in sorted(by_name.items()):
        distributions = sorted({distribution(ep) for ep in claimants})
        if len(claimants) > 1:
            raise PluginError(
                f"{family} '{name}' is registered by more than one plugin: {' and '.join(distributions)} "
                f"(entry points {', '.join(ep.value for ep in claimants)}); uninstall one of them"
            )
        entry_point = claimants[0]
        try:
            obj = entry_point.load()
        except Exception as error:  # any failure inside third-party code: report, skip, go on
            report(f"skipping {family} plugin '{name}' from {distributions[0]}: import failed: {type(error).__name__}: {error}")
            continue
        problem = check(name, obj)
        if problem:
            report(f"skipping {family} plugin '{name}' from {distributions[0]}: {problem}")
            continue
        found[name] = Plugin(name, obj, distributions[0])
    return found
