"""Checks of config values that many jobs share; each failure is a one-line ConfigError naming the setting."""

from __future__ import annotations

from collections.abc import Mapping

from less_exp.errors import ConfigError


def number(value) -> bool:
    """An int or float, not a bool (YAML's true/false would pass as 1/0)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(value) -> bool:
    """An int (not a bool) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def require_positive_ints(section: Mapping, prefix: str, *keys: str, why: str = "") -> None:
    """Each ``<prefix>.<key>`` must be a positive integer; ``why`` (what the setting is) ends the message."""
    for key in keys:
        value = section.get(key)
        if not positive_int(value):
            raise ConfigError(f"{prefix}.{key}={value!r} must be a positive integer{f' ({why})' if why else ''}")


def require_positive_int_or_null(section: Mapping, prefix: str, key: str, null_means: str) -> None:
    """``<prefix>.<key>`` must be a positive integer or null; ``null_means`` says what null does."""
    value = section.get(key)
    if value is not None and not positive_int(value):
        raise ConfigError(f"{prefix}.{key}={value!r} must be a positive integer or null ({null_means})")


def require_nonnegative_number(section: Mapping, prefix: str, key: str, default: float, why: str = "") -> None:
    """``<prefix>.<key>`` (``default`` when absent) must be an int or float (not a bool) of at least 0."""
    value = section.get(key, default)
    if not number(value) or value < 0:
        raise ConfigError(f"{prefix}.{key}={value!r} must be a number >= 0{f' ({why})' if why else ''}")
