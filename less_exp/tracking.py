"""Experiment tracking: one small interface over W&B (``logger=wandb``) or nothing (``logger=none``).

Jobs and later modules log through :class:`Tracker` only, so a run without W&B costs nothing and
tests can read an offline W&B run back from the job's output folder.

So that a study or sweep compares as one in a W&B dashboard, a job's run carries its ablation axes
(:func:`axes`) as flat ``axis/<name>`` config keys and ``<name>:<value>`` tags, joins a group
(``logger.group``, else its Hydra sweep: :func:`sweep_group`) and, when its task or training mode
declares a headline metric (``REPORT.headline``), logs it as summary ``headline``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from less_exp.errors import ConfigError
from less_exp.paths import short_hash
from less_exp.validation import number

WANDB_DIR_VARS = {
    "WANDB_DIR": ".",
    "WANDB_CACHE_DIR": "wandb/cache",
    "WANDB_DATA_DIR": "wandb/data",
    "WANDB_CONFIG_DIR": "wandb/config",
    "WANDB_ARTIFACT_DIR": "wandb/artifacts",
}
_owned_vars: set[str] = set()
AXIS_PREFIX = "axis/"
TAG_LIMIT = 64  # W&B refuses longer tags


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

    def __init__(self, logger_cfg: DictConfig, config: Mapping[str, Any], output_dir: Path, job: str, run_name: str | None,
                 axes: Mapping[str, Any] | None = None, group: str | None = None, headline: Sequence[str] = ()):
        import wandb

        output_dir = Path(output_dir)
        _point_wandb_at(output_dir)
        self._wandb = wandb
        self._headline = tuple(headline)
        axes = dict(axes or {})
        try:
            self._run = self._init(wandb, logger_cfg, config, output_dir, job, run_name, axes, group)
        except (wandb.errors.Error, ValueError, OSError) as err:
            message = " ".join(str(err).split()) or type(err).__name__
            raise ConfigError(f"logger=wandb (mode={logger_cfg.get('mode')}, project={logger_cfg.get('project')}): W&B "
                              f"refused the run: {message[:300]}; fix the logger settings, run `wandb login`, or use "
                              "logger.mode=offline (or logger=none)") from None
        self.run_dir = Path(self._run.dir).parent

    @staticmethod
    def _init(wandb, logger_cfg, config, output_dir, job, run_name, axes, group):
        return wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.get("entity"),
            group=logger_cfg.get("group") or group,
            job_type=logger_cfg.get("job_type") or job,
            tags=_unique([*map(_fit_tag, logger_cfg.get("tags") or []), *axis_tags(axes)]),
            name=logger_cfg.get("run_name") or run_name or job,
            notes=logger_cfg.get("notes"),
            mode=logger_cfg.get("mode", "offline"),
            dir=str(output_dir),
            config={**config, **{AXIS_PREFIX + k: v for k, v in axes.items()}},
            settings=wandb.Settings(silent=True),
        )

    def log(self, metrics, step=None):
        self._run.log(dict(metrics), step=step)

    def summary(self, metrics):
        """Update the summary; the first headline metric among ``metrics`` also goes under ``headline``."""
        metrics = dict(metrics)
        name = next((n for n in self._headline if number(metrics.get(n))), None)
        if name is not None:
            metrics.update(headline=metrics[name], headline_metric=name)
        self._run.summary.update(metrics)

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
    logger_cfg: DictConfig, config: Mapping[str, Any], output_dir: Path, job: str, run_name: str | None = None,
    axes: Mapping[str, Any] | None = None, group: str | None = None, headline: Sequence[str] = (),
) -> Tracker:
    """The tracker that ``logger.name`` selects; ``group`` applies when ``logger.group`` is unset,
    ``headline`` names the metrics (first present wins) that the summary repeats as ``headline``."""
    if logger_cfg.name == "none":
        return Tracker()
    if logger_cfg.name == "wandb":
        return WandbTracker(logger_cfg, config, output_dir, job, run_name, axes, group, headline)
    raise ConfigError(f"logger={logger_cfg.name!r} is not one of wandb, none")


def job_tracker(cfg: DictConfig, config: Mapping[str, Any], output_dir: Path, job: str, run_name: str | None = None) -> Tracker:
    """The tracker of a train or eval job: its :func:`axes`, its sweep's group and its headline metric."""
    if cfg.logger.name == "none":
        return Tracker()
    return make_tracker(cfg.logger, config, output_dir, job, run_name, axes(config, job), sweep_group(), headline_metrics(cfg, job))


# ------------------------------------------------------------------------------ axes, tags, groups
def axes(config: Mapping[str, Any], job: str) -> dict[str, Any]:
    """The ablation axes of a ``job`` (``"train"`` or ``"eval"``) with resolved ``config`` (a DictConfig or the
    ``config`` of its ``results.json``), under the names every run, dashboard and report shares.

    ``budget`` is the policy's capacity before Baseline+ (``baseline_plus`` says whether the state's size is
    added; ``prefill`` how a cache takes a prompt), ``budget_sink/heavy/recent`` its parts (ratios, with ``budget_ratio_of``, when they resolve per
    prompt), both absent for a cache that never evicts. An eval that loads a checkpoint takes its state's
    components and ``training_mode`` from the checkpoint's manifest, as the job does; a run without a state
    has ``gating``, ``reweighting`` and ``normalizer`` ``"none"``. ``data`` is the task's own data set
    (``task.dataset``) when it has one. ``checkpoint`` is the short name of the
    loaded (eval) or starting (train, ``training.init_from``) checkpoint, or False.
    """
    cfg = config if isinstance(config, DictConfig) else OmegaConf.create(dict(config))
    training = cfg.get("training")
    checkpoint = cfg.get("checkpoint") if job == "eval" else _get(training, "init_from")
    manifest = _manifest(checkpoint) if job == "eval" and checkpoint else {}
    out: dict[str, Any] = {"model": _get(cfg.get("model"), "name"), "policy": _get(cfg.get("policy"), "name")}
    out.update(_budget(cfg, job))
    out["baseline_plus"] = bool(_get(cfg.get("policy"), "baseline_plus", False))
    out["prefill"] = _get(cfg.get("policy"), "prefill", "stepwise")
    feature_map = _get(cfg.get("feature_map"), "name", "none")
    out["feature_map"] = _get(manifest.get("feature_map"), "name", "none") if feature_map == "none" else feature_map
    for group, default in (("gating", "none"), ("reweighting", "none"), ("normalizer", "joint")):
        if manifest:
            out[group] = _get(manifest.get(group), "name", "none")
        else:
            out[group] = _get(cfg.get(group), "name", default) if feature_map != "none" else "none"
    out["training_mode"] = _get(training, "mode") if job == "train" else _get(manifest.get("training"), "mode")
    task = cfg.get("task") if job == "eval" else None
    out["data"] = _get(_get(task, "dataset"), "name") or _get(cfg.get("data"), "name")
    out["task"] = _get(task, "name")
    out["checkpoint"] = _short_checkpoint(checkpoint) if checkpoint else False
    return out


def axis_tags(axes: Mapping[str, Any]) -> list[str]:
    """``"<axis>:<value>"`` for each axis that has a value (the budget's parts aside), at most 64 characters."""
    return [_fit_tag(f"{k}:{_text(v)}") for k, v in axes.items() if v is not None and not k.startswith("budget_")]


def headline_metrics(cfg: DictConfig, job: str) -> tuple[str, ...]:
    """The metric names that the job's task (eval) or training mode (train) declares as ``REPORT.headline``
    (a name or a sequence of names); none when it declares none."""
    from less_exp import tasks, training

    try:
        if job == "eval":
            module = tasks.get(cfg.task.get("module") or cfg.task.name)
        else:
            module = training.get(cfg.training.mode)
    except (ConfigError, AttributeError, KeyError, ImportError):
        return ()
    headline = getattr(getattr(module, "REPORT", None), "headline", None)
    if isinstance(headline, str):
        return (headline,)
    return tuple(h for h in headline if isinstance(h, str)) if isinstance(headline, Sequence) else ()


def sweep_group(folder: str | Path | None = None) -> str | None:
    """The W&B group of a job that ran in a Hydra multirun: its sweep folder's name (None outside one).

    Without ``folder`` the running job's Hydra config answers; with one, the ``.hydra/hydra.yaml`` that
    Hydra saved in that job folder (or in the folder above, for the evaluation a train job nests in it).
    """
    if folder is None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        return Path(HydraConfig.get().runtime.output_dir).parent.name
    for place in (Path(folder), Path(folder).parent):
        path = place / ".hydra" / "hydra.yaml"
        if path.is_file():
            try:
                hydra = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("hydra") or {}
            except (OSError, yaml.YAMLError, AttributeError):
                return None
            output = (hydra.get("runtime") or {}).get("output_dir")
            return Path(output).parent.name if hydra.get("mode") == "MULTIRUN" and output else None
    return None


def recorded_group(folder: str | Path) -> str | None:
    """The group a finished job in ``folder`` logged to: its ``logger.group``, else its sweep's."""
    try:
        config = json.loads((Path(folder) / "results.json").read_text(encoding="utf-8")).get("config") or {}
        group = (config.get("logger") or {}).get("group")
    except (OSError, ValueError, AttributeError):
        group = None
    return group or sweep_group(folder)


def _get(node, key: str, default=None):
    """``node[key]`` of a config node or manifest entry; ``default`` when absent or not a mapping."""
    return node.get(key, default) if isinstance(node, Mapping) else default


def _budget(cfg: DictConfig, job: str) -> dict[str, Any]:
    from less_exp.factory import instantiate_component

    try:
        policy = instantiate_component(cfg.policy)
    except Exception:  # a bad policy is the job's to report; its run then has no budget
        return {"budget": None}
    if not policy.evicts:
        return {"budget": None}
    length = _get(cfg.get("task") if job == "eval" else cfg.get("training"), "seq_len")
    try:
        budget = policy.budget(length=length, max_positions=int(cfg.model.max_length))
    except (ValueError, TypeError, AttributeError):
        parts = {"budget_sink": policy.sink, "budget_heavy": policy.heavy, "budget_recent": policy.recent}
        return {"budget": None, **parts, "budget_ratio_of": policy.ratio_of}
    return {"budget": budget.capacity, "budget_sink": budget.sink, "budget_heavy": budget.heavy, "budget_recent": budget.recent}


def _manifest(checkpoint) -> dict:
    """The checkpoint's manifest as plain JSON, for its names only ({} when unreadable: the job checks it)."""
    from less_exp.checkpoints import MANIFEST

    try:
        manifest = json.loads((Path(checkpoint) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _short_checkpoint(path) -> str:
    """A checkpoint folder's name; ``<job folder>/checkpoint`` (less-train's default) by its job folder."""
    path = Path(str(path).rstrip("/"))
    return f"{path.parent.name}/{path.name}" if path.name == "checkpoint" else path.name


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _fit_tag(tag) -> str:
    """``tag`` cut to W&B's 64 characters, with a hash of the whole, so long distinct tags stay distinct."""
    tag = str(tag)
    return tag if len(tag) <= TAG_LIMIT else f"{tag[:TAG_LIMIT - 9]}~{short_hash(tag)}"


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))



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
