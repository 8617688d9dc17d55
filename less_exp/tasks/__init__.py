"""Evaluation tasks, one module each, chosen by ``task.name``.

A task module exposes ``validate(cfg)`` (cheap checks, run before the model loads) and
``run(model, tokenizer, cfg, tracker) -> dict`` (the metrics). Adding a task is adding a module
here and a ``conf/task/<name>.yaml``.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from omegaconf import DictConfig

from less_exp.errors import ConfigError
from less_exp.models import max_positions
from less_exp.validation import require_positive_ints


def require_positive(task: DictConfig, *keys: str) -> None:
    """Each ``task.<key>`` must be a positive integer."""
    require_positive_ints(task, "task", *keys)


def require_seq_len(cfg: DictConfig) -> None:
    """``task.seq_len`` must be a window the model can take: an integer in [2, model.max_length]."""
    limit, seq_len = max_positions(cfg.model), cfg.task.seq_len
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or not 2 <= seq_len <= limit:
        raise ConfigError(f"task.seq_len={seq_len} must be an integer in [2, {limit}] (model.max_length)")


def available() -> list[str]:
    """Names of the task modules in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> ModuleType:
    """The task module called ``name``."""
    if name not in available():
        raise ConfigError(f"task={name!r} is not one of {available()}")
    return importlib.import_module(f"{__name__}.{name}")
