"""Perturbation budgets in pixel units, as people write them: ``eps=8/255``, ``eps=0.03``, ``eps=2``.

Config fields holding an amount are typed ``Any`` so that Hydra passes ``8/255`` through as text;
``pixel_amount`` turns it into a float (a number, or a fraction of two numbers).
"""
from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Any

from vizkit.core.errors import ConfigError

if TYPE_CHECKING:  # the metrics' registry reads ``pixel_amount`` and must import without torch
    import torch

NORMS = ("linf", "l2")


def pixel_amount(name: str, value: Any, allow_zero: bool = True) -> float:
    """A non-negative float from a number or a text such as ``"8/255"``; ConfigError otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number such as 0.03 or 8/255, got {value!r}")
    try:
        amount = float(Fraction(str(value).strip())) if isinstance(value, str) else float(value)
    except (ValueError, ZeroDivisionError, TypeError):
        raise ConfigError(f"{name} must be a number such as 0.03 or 8/255 (pixel units on [0, 1]), got {value!r}") from None
    if not amount >= 0 or amount == float("inf") or (amount == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'non-negative' if allow_zero else 'positive'} and finite, got {value!r}")
    return amount


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got '{norm}'")
    return norm


def perturbation_norms(clean: "torch.Tensor", adversarial: "torch.Tensor") -> dict[str, "torch.Tensor"]:
    """Per input, in pixel units: the L∞, L2 and L0 (changed pixel values) norms of the perturbation."""
    delta = (adversarial - clean).flatten(1).float()
    return {"linf": delta.abs().amax(1), "l2": delta.norm(dim=1), "l0": (delta != 0).float().sum(1)}
