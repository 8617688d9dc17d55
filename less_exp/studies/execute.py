"""Run one study job, and judge whether a job that ran before can be skipped.

A finished job leaves ``study.json`` in its folder with its key (kind, overrides, code version): a
rerun with the same key and a ``results.json`` that reads ok skips it; anything else runs again in
the same folder, where train and eval jobs resume what they had done (layer files, training
progress, summarization rows). Evaluations run in this process and share a loaded model: the
compression is detached after each, so the next one starts from the unmodified model.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

from omegaconf import DictConfig, OmegaConf

from less_exp import checkpoints, paths, schema
from less_exp.errors import ConfigError
from less_exp.results import FILENAME, read_record
from less_exp.runtime import BOOKKEEPING
from less_exp.studies.plan import Job

MARKER = "study.json"


def job_key(job: Job, code_version: str) -> str:
    """A train or eval job's key over its resolved config (so an edited preset makes it stale too)."""
    if job.config_name is None:
        return job.key(code_version)
    config = OmegaConf.to_container(compose(job), resolve=True)
    return job.key(code_version, {k: v for k, v in config.items() if k not in BOOKKEEPING})


def is_complete(job: Job, code_version: str) -> bool:
    """Finished before with the same key, and (train, eval) its ``results.json`` says ok."""
    marker = read_record(job.folder / MARKER)
    if not marker or marker.get("key") != job_key(job, code_version):
        return False
    if job.kind in ("train", "eval"):
        results = read_record(job.folder / FILENAME)
        return bool(results) and results.get("status") == "ok"
    return True


def _mark(job: Job, code_version: str, wall_s: float) -> None:
    job.folder.mkdir(parents=True, exist_ok=True)
    tmp = job.folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"job": job.name, "kind": job.kind, "key": job_key(job, code_version),
                               "code_version": code_version, "wall_s": round(wall_s, 1),
                               "overrides": job.overrides}, indent=2) + "\n")
    tmp.replace(job.folder / MARKER)


@contextmanager
def hydra_ready():
    """Hydra's compose API, initialised on ``conf/`` unless this process already is (inside ``less-study``)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=paths.conf_dir(), version_base="1.3", job_name="less-study"):
        yield


def compose(job: Job) -> DictConfig:
    """The job's config, as ``less-train`` / ``less-eval`` with its overrides and ``hydra.run.dir=<folder>`` would see it,
    checked against :mod:`less_exp.schema` (the plan composes every job, so a bad one stops the study before it starts)."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with hydra_ready():
            cfg = hydra_compose(job.config_name, overrides=[*job.overrides, f"paths.output_dir={job.folder}"])
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"job {job.name}: its overrides do not compose ({first})") from err
    try:
        schema.check(cfg)
    except ConfigError as err:
        raise ConfigError(f"job {job.name}: {err}") from None
    return cfg


class ModelCache:
    """Loaded models by (model preset, device, cache folder), for evaluations that share one."""

    def __init__(self):
        self._models: dict[str, tuple] = {}
        self.loads = 0

    def get(self, cfg: DictConfig):
        from less_exp import runtime
        from less_exp.models import load_model

        device = runtime.resolve_device(cfg.device)
        key = json.dumps([OmegaConf.to_container(cfg.model, resolve=True), str(device), str(cfg.paths.cache_dir)],
                         sort_keys=True)
        if key not in self._models:
            self._models = {key: load_model(cfg.model, device, cache_dir=cfg.paths.cache_dir)}  # one at a time
            self.loads += 1
        return self._models[key]


def verify(job: Job) -> dict:
    """A layer-range stage's checkpoint is whole: every layer there, each agreeing with the manifest."""
    root = job.checkpoint
    manifest = checkpoints.read_manifest(root)
    done = sorted(int(k) for k in manifest.get("layers", {}))
    total = manifest["model"]["num_layers"]
    missing = [layer for layer in range(total) if layer not in done]
    if missing:
        raise ConfigError(f"study stage {job.name}: checkpoint={root} lacks layers {missing} after its layer ranges "
                          f"{job.expected_ranges}; rerun the study to train them")
    return checkpoints.check_start(root, manifest, setting=f"study stage {job.name}: checkpoint")


def run(job: Job, code_version: str, models: ModelCache | None = None) -> dict:
    """Run ``job`` (its folder, its results) and mark it complete."""
    from less_exp.eval import evaluate
    from less_exp.train import train

    started = time.perf_counter()
    result: dict = {}
    if job.kind == "train":
        result = train(compose(job))
    elif job.kind == "eval":
        cfg = compose(job)
        if models is None:
            result = evaluate(cfg)
        else:
            from less_exp.adapter.attention import switch

            model, tokenizer = models.get(cfg)
            try:
                result = evaluate(cfg, model_and_tokenizer=(model, tokenizer))
            finally:
                switch(model, None)
    elif job.kind == "verify":
        verify(job)
    elif job.kind == "report":
        from less_exp import report

        settings = dict(job.report)
        result = {"page": str(report.write_page(settings.pop("paths"), settings.pop("page"), **settings))}
    else:
        raise ConfigError(f"job {job.name}: unknown kind {job.kind!r}")
    _mark(job, code_version, time.perf_counter() - started)
    return result


def run_fresh(job: Job, code_version: str) -> dict:
    """Entry point of a job submitted to SLURM: a fresh process, so Hydra is initialised here."""
    with hydra_ready():
        return run(job, code_version)
