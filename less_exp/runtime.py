"""What every job does around its work: checks, seeding, device, output folder and run name."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from less_exp import models
from less_exp.errors import ConfigError
from less_exp.results import write_results
from less_exp.tracking import make_tracker


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


class Job:
    """What every job does around its work: the output folder, the resolved config, the tracker,
    the clock, and ``results.json`` at the end.

    ``with Job(cfg, "eval") as job: ...; job.finish(metrics)``; ``job.tracker`` logs on the way.
    """

    def __init__(self, cfg: DictConfig, name: str):
        self.cfg, self.name = cfg, name
        self.started = time.perf_counter()
        self.out_dir = output_dir(cfg)
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.tracker = make_tracker(cfg.logger, self.config, self.out_dir, name, run_name())

    def __enter__(self) -> "Job":
        self.tracker.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.tracker.__exit__(exc_type, exc, tb)

    def finish(self, metrics: dict) -> Path:
        """Log the scalar metrics as the run's summary and write ``results.json``; returns its path."""
        duration = time.perf_counter() - self.started
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
        self.tracker.summary({**scalars, "duration_s": duration})
        return write_results(self.out_dir, self.name, metrics, self.config, duration)
