"""Experiment tracking: one small interface over W&B (``logger=wandb``) or nothing (``logger=none``).

Jobs and later modules log through :class:`Tracker` only, so a run without W&B costs nothing and
tests can read an offline W&B run back from the job's output folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from less_exp.errors import ConfigError

WANDB_DIR_VARS = {
    "WANDB_DIR": ".",
    "WANDB_CACHE_DIR": "wandb/cache",
    "WANDB_DATA_DIR": "wandb/data",
    "WANDB_CONFIG_DIR": "wandb/config",
    "WANDB_ARTIFACT_DIR": "wandb/artifacts",
}
_owned_vars: set[str] = set()


class Tracker:
    """Tracker that records nothing (``logger=none``) and the interface every tracker offers."""

    run_dir: Path | None = None

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log a row of metrics, optionally at an explicit step."""

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Record the run's final metrics."""

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Log a table of rows under ``key``."""

    def log_image(self, key: str, image: Any, caption: str | None = None) -> None:
        """Log an image (a matplotlib figure, PIL image, array or file path) under ``key``."""

    def finish(self, failed: bool = False) -> None:
        """Close the run."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(failed=exc_type is not None)


class WandbTracker(Tracker):
    """A W&B run whose files all live in the job's output folder (offline unless set online)."""

    def __init__(self, logger_cfg: DictConfig, config: Mapping[str, Any], output_dir: Path, job: str, run_name: str | None):
        import wandb

        output_dir = Path(output_dir)
        _point_wandb_at(output_dir)
        self._wandb = wandb
        self._run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.get("entity"),
            group=logger_cfg.get("group"),
            job_type=logger_cfg.get("job_type") or job,
            tags=list(logger_cfg.get("tags") or []),
            name=logger_cfg.get("run_name") or run_name or job,
            notes=logger_cfg.get("notes"),
            mode=logger_cfg.get("mode", "offline"),
            dir=str(output_dir),
            config=dict(config),
            settings=wandb.Settings(silent=True),
        )
        self.run_dir = Path(self._run.dir).parent

    def log(self, metrics, step=None):
        self._run.log(dict(metrics), step=step)

    def summary(self, metrics):
        self._run.summary.update(dict(metrics))

    def log_table(self, key, columns, rows):
        self._run.log({key: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_image(self, key, image, caption=None):
        self._run.log({key: self._wandb.Image(image, caption=caption)})

    def finish(self, failed=False):
        """Finish the run and wait until W&B has written it to disk (``run.finish`` alone does not)."""
        if self._run is not None:
            self._run.finish(exit_code=1 if failed else 0)
            self._run = None
            self._wandb.teardown()


def make_tracker(
    logger_cfg: DictConfig, config: Mapping[str, Any], output_dir: Path, job: str, run_name: str | None = None
) -> Tracker:
    """The tracker that ``logger.name`` selects."""
    if logger_cfg.name == "none":
        return Tracker()
    if logger_cfg.name == "wandb":
        return WandbTracker(logger_cfg, config, output_dir, job, run_name)
    raise ConfigError(f"logger={logger_cfg.name!r} is not one of wandb, none")


def _point_wandb_at(output_dir: Path) -> None:
    """Keep W&B's folders in ``output_dir`` unless the user chose them (env vars set before us)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    for var, sub in WANDB_DIR_VARS.items():
        if var in os.environ and var not in _owned_vars:
            continue
        path = (output_dir / sub).resolve()
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)
        _owned_vars.add(var)
