"""User-facing errors: what was wrong, where, and what would be right.

Every problem a user can cause (a missing image, an unknown layer, a bad field) is raised as a
`VizkitError`; the command line prints its message without a traceback and exits with status 2.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class VizkitError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class ConfigError(VizkitError, ValueError):
    """A method, target or data setting that cannot work as given."""


class PluginError(VizkitError):
    """A method plugin that cannot be registered (e.g. two distributions claim one name)."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates that look most like `name`, best first (for 'did you mean' hints)."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if len(matches) < n:  # prefix/substring matches help with dotted layer names such as 'layer4.1'
        extra = [c for c in candidates if c not in matches and (c.startswith(name) or name in c)]
        matches += extra[: n - len(matches)]
    return matches


def did_you_mean(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """'; closest: a, b, c' or '' when nothing is close."""
    matches = closest(name, candidates, n)
    return f"; closest: {', '.join(matches)}" if matches else ""
