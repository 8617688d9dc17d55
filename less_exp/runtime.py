"""What every job does around its work: checks, seeding, device, output folder and run name."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from less_exp import models
from less_exp.errors import ConfigError


def validate(cfg: DictConfig) -> None:
    """Cheap checks shared by all jobs: device, seed and the model's availability."""
    resolve_device(cfg.device)
    if not isinstance(cfg.seed, int):
        raise ConfigError(f"seed={cfg.seed!r} must be an integer")
    models.check_available(cfg.model)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is cuda when available, else cpu; anything else must be a usable torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device={name!r} is not a torch device (cpu, cuda, cuda:1, auto)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def output_dir(cfg: DictConfig) -> Path:
    """The job's output folder (Hydra's run folder, or ``paths.output_dir`` when composed by hand)."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_name() -> str | None:
    """The job's command-line overrides as a name (``model=tiny_llama,task.seq_len=64``), if any."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().job.override_dirname or None
