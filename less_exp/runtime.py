"""What every job does around its work: checks, seeding, device, output folder and run name."""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from less_exp import checkpoints, models
from less_exp.commandline import SWEEP_FAILURES, interrupted, signal_name
from less_exp.errors import ConfigError, LessError, NonFiniteError
from less_exp.guards import check_metrics
from less_exp.results import FILENAME, read_record, write_failure, write_results
from less_exp.tracking import job_tracker


def validate(cfg: DictConfig) -> None:
    """Cheap checks shared by all jobs: device, seed and the model's availability."""
    resolve_device(cfg.device)
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


# keys that do not change what a job computes: a rerun that differs only in these may reuse its folder
BOOKKEEPING = ("paths", "logger", "device")


def refuse_foreign_results(out_dir: Path, job: str, config: dict) -> None:
    """A folder that already holds another job's or another configuration's results is not overwritten;
    the same configuration again (a rerun, a resume) may continue there."""
    path = out_dir / FILENAME
    if not path.is_file():
        return
    found = read_record(path) or {}
    old = {k: v for k, v in (found.get("config") or {}).items() if k not in BOOKKEEPING}
    new = {k: v for k, v in config.items() if k not in BOOKKEEPING}
    differ = sorted(_differences(old, new))
    if found.get("job") != job or differ:
        what = f"differs in {', '.join(differ[:5])}" if differ else f"comes from less-{found.get('job', '?')}"
        raise ConfigError(f"{out_dir} already holds the results of another run ({what}); give this run its own "
                          "folder (drop hydra.run.dir=..., or choose another)")


def _differences(a, b, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return set().union(*(_differences(a.get(k), b.get(k), f"{prefix}{k}.") for k in set(a) | set(b))) if a or b else set()
    return set() if a == b else {prefix.rstrip(".")}


class Job:
    """What every job does around its work: the output folder, the resolved config, the tracker,
    the clock, and ``results.json`` at the end.

    ``with Job(cfg, "eval") as job: ...; job.finish(metrics)``; ``job.tracker`` logs on the way.
    """

    def __init__(self, cfg: DictConfig, name: str):
        self.cfg, self.name = cfg, name
        self.started, self.finished = time.perf_counter(), False
        self.out_dir = output_dir(cfg)
        self.config = OmegaConf.to_container(cfg, resolve=True)
        refuse_foreign_results(self.out_dir, name, self.config)
        self.tracker = job_tracker(cfg, self.config, self.out_dir, name, run_name())

    def __enter__(self) -> "Job":
        self.tracker.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, KeyboardInterrupt) and not self.finished:
            self.fail(f"interrupted ({signal_name(exc)})")
        checkpoints.release_claims()
        self.tracker.__exit__(exc_type, exc, tb)

    def finish(self, metrics: dict) -> Path:
        """Log the scalar metrics as the run's summary and write ``results.json``; returns its path.

        A non-finite metric fails the run instead (:meth:`fail`), so no NaN is ever written as a result.
        """
        try:
            check_metrics(metrics)
        except NonFiniteError as err:
            self.fail(err)
            raise
        duration = time.perf_counter() - self.started
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
        self.tracker.summary({**scalars, "duration_s": duration})
        path = write_results(self.out_dir, self.name, metrics, self.config, duration)
        self.finished = True
        return path

    def fail(self, error: BaseException) -> Path:
        """Write ``results.json`` marked failed, with the reason and no metrics."""
        self.tracker.summary({"failed": str(error)})
        return write_results(self.out_dir, self.name, {}, self.config, time.perf_counter() - self.started,
                             status="failed", error=str(error))


def run_cli(prog: str, work, cfg: DictConfig):
    """Run a job from the command line: a user's error is one line on stderr and its exit code.

    ``LESS_DEBUG=1`` or ``HYDRA_FULL_ERROR=1`` lets the exception through with its traceback.
    In a sweep (``-m``) run in this process a failed job does not stop the others: its line is
    printed, its ``results.json`` says why, and :func:`cli` exits with the first failure's code at
    the end (submitit launchers run each job in its own process, which exits with its code).
    """
    try:
        return work(cfg)
    except KeyboardInterrupt as err:
        interrupted(prog, err, resume_hint(cfg))
    except LessError as err:
        if os.environ.get("LESS_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        if not _in_sweep():
            sys.exit(err.exit_code)
        SWEEP_FAILURES.append(err.exit_code)
        _record_sweep_failure(prog, cfg, err)


def _record_sweep_failure(prog: str, cfg: DictConfig, err: LessError) -> None:
    """The failed point's folder gets ``results.json`` status failed with the reason (when its checks
    refused it before :class:`Job` wrote one)."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except (OmegaConfBaseException, ValueError):  # a point refused for its values may not resolve; its overrides as given still say which
        config = OmegaConf.to_container(cfg, resolve=False)
    write_failure(cfg.paths.output_dir, prog.removeprefix("less-"), config, str(err))


def resume_hint(cfg: DictConfig) -> str:
    """How to continue an interrupted job: the same command, or for a training into its own run folder,
    the same command with that folder's checkpoint."""
    if cfg.get("training") is not None and not cfg.get("checkpoint"):
        return f"rerun with checkpoint={Path(cfg.paths.output_dir) / 'checkpoint'} to resume"
    return "rerun the same command to resume"


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return "BasicLauncher" in str(HydraConfig.get().launcher.get("_target_", ""))  # jobs share this process
