"""Training modes for the LESS state parameters (DESIGN.md §4), chosen by ``training.mode``.

A mode module exposes ``validate(cfg)`` (checks beyond :mod:`less_exp.schema`, before the model loads),
``run(cfg, model, tokenizer, tracker, out_dir) -> dict`` (the job's metrics) and
``summary_line(metrics) -> str`` (what the job prints when it ends).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from less_exp.errors import ConfigError

MODES = ("layerwise", "progressive", "e2e", "interpolate")


def get(mode: str) -> ModuleType:
    """The module of training mode ``mode``."""
    if mode not in MODES:
        raise ConfigError(f"training.mode={mode!r} is not one of {MODES}")
    return importlib.import_module(f"{__name__}.{mode}")
