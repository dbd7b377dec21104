"""The trainer's one error type for bad input (reported as one ``error: ...`` line, exit status 2), and the value
checks the config schemas raise it from."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """An invalid config value, path or file; the message names the key (``optim.lr``) and the value."""


def positive_int(key: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ConfigError(f"{key} must be an integer > 0, got {value!r}")


def flag(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


def finite(key: str, value: Any, low: float, *, low_inclusive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= low if low_inclusive else value > low)
    if not ok:
        raise ConfigError(f"{key} must be a finite number {'>=' if low_inclusive else '>'} {low:g}, got {value!r}")


def choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")


def fraction(key: str, value: Any) -> None:
    """A fraction in (0, 1]."""
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ConfigError(f"{key} must be in (0, 1], got {value!r}")
