"""The one test of "is this a number" that the schema, data weights, search objectives and trackers share."""

from __future__ import annotations


def number(value) -> bool:
    """An int or float, not a bool (YAML's true/false would pass as 1/0)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
