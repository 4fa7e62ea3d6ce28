"""vizkit: a lab for looking inside convolutional networks.

From Python, without Hydra or Lightning::

    import vizkit
    model = vizkit.load_model("embedded")            # or any timm name
    method = vizkit.create_method("occlusion", window=16)
    maps = method.attribute(model, x, target="class:triangle")   # x: [B,3,H,W] -> maps: [B,1,H,W]

``vizkit.list_methods()`` names every registered method (built-ins and installed plugins).
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["create_method", "list_methods", "load_model", "VizkitError"]

from vizkit.core.errors import VizkitError
from vizkit.methods.registry import create_method


def list_methods(kind: str | None = None) -> dict[str, str]:
    """Registered methods as ``{name: kind}``, optionally of one kind."""
    from vizkit.methods.registry import discover

    return {name: entry.kind for name, entry in sorted(discover().items()) if kind in (None, entry.kind)}


def load_model(name: str = "embedded", **kwargs: Any):
    """See ``vizkit.core.models.load_model``."""
    from vizkit.core.models import load_model as _load_model

    return _load_model(name, **kwargs)
