"""Where Hydra finds vizkit's configs: vizkit's own, the presets that plugins ship, the user's own.

Three sources, searched in this order for a config such as ``method/occlusion_fine``:

1. vizkit's own ``conf/`` (``conf_dir()``): at the top of a checkout, and inside the package as
   ``vizkit/conf`` once installed from a wheel (``pyproject.toml`` maps one onto the other).
2. Presets shipped by installed plugins. A distribution declares a package that holds config groups
   (``method/*.yaml``, ``experiment/*.yaml``, ...) in the entry-point group ``vizkit.configs``::

       [project.entry-points."vizkit.configs"]
       vizkit-rise = "vizkit_rise.conf"

   Each is appended to Hydra's search path as ``pkg://vizkit_rise.conf`` by the ``SearchPathPlugin``
   below, which ``register()`` hands to Hydra before it composes anything. A package that cannot be
   found is reported on stderr and skipped, as a method plugin that fails to import is.
3. The user's own folders, with Hydra's own means: ``vizkit --config-dir my_conf +experiment=mine``,
   or ``hydra.searchpath=[file:///abs/my_conf]`` (which can also sit in a config file).
"""
from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

ENTRY_POINT_GROUP = "vizkit.configs"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # vizkit/


def conf_dir() -> Path:
    """vizkit's own config folder: ``vizkit/conf`` when installed from a wheel, else the checkout's
    top-level ``conf/`` (an editable install or a source tree)."""
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    return _PACKAGE_DIR / "conf"  # missing: Hydra then says it cannot find config.yaml there


def _report(message: str) -> None:
    print(f"vizkit: {message}", file=sys.stderr)  # user-facing; Hydra's logging is not set up yet


def _is_package(module: str) -> bool:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a missing parent package
        return False
    return spec is not None and spec.submodule_search_locations is not None


@lru_cache(maxsize=1)
def plugin_config_packages() -> tuple[tuple[str, str], ...]:
    """(provider, package) for every ``vizkit.configs`` entry point whose package exists."""
    found = []
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        dist = getattr(entry_point, "dist", None)
        provider = dist.name if dist is not None else entry_point.name
        module = entry_point.module
        if not _is_package(module):
            _report(f"skipping the configs of plugin '{entry_point.name}' from {provider}: "
                    f"'{module}' is not an importable package (it should hold folders such as method/ and experiment/)")
            continue
        found.append((provider, module))
    return tuple(found)


class PluginConfigs(SearchPathPlugin):
    """Appends every installed plugin's config package to Hydra's search path, after vizkit's own."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for provider, module in plugin_config_packages():
            search_path.append(provider=provider, path=f"pkg://{module}")


def register() -> None:
    """Hand ``PluginConfigs`` to Hydra (idempotent): it runs whenever Hydra builds a search path."""
    from hydra.core.plugins import Plugins

    Plugins.instance().register(PluginConfigs)
