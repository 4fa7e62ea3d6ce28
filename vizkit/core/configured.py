"""What methods and metrics share: a class configured by a ``Config`` dataclass, created by name."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from vizkit.core.errors import ConfigError


@dataclasses.dataclass
class NoConfig:
    """Config of a class without parameters."""


class Configured:
    """Built as ``Cls(config)``, ``Cls(**fields)`` or ``Cls(config, **changes)``; holds ``self.config``."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoConfig

    def __init__(self, config: Any = None, **fields: Any) -> None:
        if config is None:
            config = self.Config(**fields)
        elif fields:
            config = dataclasses.replace(config, **fields)
        if not isinstance(config, self.Config):
            raise ConfigError(f"{self.name}: expected a {self.Config.__name__} config, got {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def configure(cls: type[Configured], name: str, fields: dict[str, Any]) -> Any:
    """``cls(**fields)``, with errors that name ``name``: unknown fields (and the valid ones), and any
    ``ConfigError``/``TypeError`` the Config raises."""
    valid = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(fields) - valid)
    if unknown:
        raise ConfigError(f"{name}: unknown field(s) {', '.join(unknown)}; its fields are: {', '.join(sorted(valid)) or '(none)'}")
    try:
        return cls(**fields)
    except (TypeError, ConfigError) as error:  # say which method or metric the bad field belongs to
        message = str(error)
        raise ConfigError(message if message.startswith(f"{name}:") else f"{name}: {message}") from None
