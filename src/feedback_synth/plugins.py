"""Small registries of named implementations (criteria, losses, filters, generator kinds), in the
style of timm's ``@register_model``: adding one is one decorated function or class."""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

from feedback_synth.errors import ConfigError

T = TypeVar("T")


class Registry(dict):
    """``name -> implementation``, filled by ``@registry.register(name)``.

    Args:
        kind: what the names name ("criterion", "loss", "filter"), for messages.
        extra: names a config may use beyond the registered ones (``none`` for "no criterion").
    """

    def __init__(self, kind: str, extra: Iterable[str] = ()):
        super().__init__()
        self.kind, self.extra = kind, tuple(extra)

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            self[name] = obj
            return obj

        return wrap

    @property
    def names(self) -> tuple[str, ...]:
        return (*self, *self.extra)

    def check(self, name: str, field: str) -> str:
        """``name`` if it is known; else a ConfigError naming the config ``field``."""
        if name not in self.names:
            raise ConfigError(f"config field '{field}': unknown {self.kind} '{name}'; known: {', '.join(self.names)}")
        return name
