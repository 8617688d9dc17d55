"""Evaluation tasks, one module each, chosen by ``task.name``.

A task module exposes ``validate(cfg)`` (the checks beyond :mod:`less_exp.schema` that need files,
the policy or the data, run before the model loads) and
``run(model, tokenizer, cfg, tracker) -> dict`` (the metrics). Adding a task is adding a module
here and a ``conf/task/<name>.yaml``.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


from less_exp.errors import ConfigError


def available() -> list[str]:
    """Names of the task modules in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> ModuleType:
    """The task module called ``name``."""
    if name not in available():
        raise ConfigError(f"task={name!r} is not one of {available()}")
    return importlib.import_module(f"{__name__}.{name}")
