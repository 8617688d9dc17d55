"""A study config as a list of jobs in dependency order.

A study (``conf/study/<name>.yaml``) names

- ``setup``: overrides every job shares (model, policy, state components);
- ``stages``: training jobs in order, each optionally starting from an earlier stage's checkpoint
  (``init_from``), blending toward one (``toward``), and split into layer ranges (``layer_ranges``, a
  SLURM array whose parts write one checkpoint, followed by a job that verifies it is whole);
- ``methods``: the comparison set, each a list of overrides and optionally a stage's ``checkpoint``;
- ``evaluations``: tasks x data sets, each a list of overrides (every method runs it) or a mapping of
  ``overrides`` and the ``methods`` that run it.

Each job is an ordinary train or eval config with its own folder under the study's root, so resume,
refusals and ``less-report`` work on it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from less_exp.errors import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
KINDS = ("train", "verify", "eval", "report")
STAGE_KEYS = {"name", "overrides", "init_from", "toward", "layer_ranges", "about"}
METHOD_KEYS = {"overrides", "checkpoint", "about"}
EVALUATION_KEYS = {"overrides", "methods", "about"}
STUDY_KEYS = {"name", "about", "time", "setup", "stages", "methods", "evaluations", "page", "command"}


@dataclass
class Job:
    """One unit of a study: ``kind`` train / verify / eval / report, run in ``folder`` after ``needs``."""

    name: str
    kind: str
    folder: Path
    overrides: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    checkpoint: Path | None = None  # train: where the states go; verify: the folder checked
    expected_ranges: list[tuple[int, int | None]] = field(default_factory=list)
    report: dict = field(default_factory=dict)  # report: the arguments of less_exp.report.write_page

    def key(self, code_version: str, config: dict | None = None) -> str:
        """What decides the job's result: its kind, its resolved config (else its overrides) and the code;
        equal keys may skip a rerun."""
        what = config if config is not None else self.overrides
        blob = json.dumps([self.kind, what, [list(r) for r in self.expected_ranges], code_version], sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def config_name(self) -> str | None:
        """The job config a train or eval job composes (``conf/train.yaml``, ``conf/eval.yaml``)."""
        return {"train": "train", "eval": "eval"}.get(self.kind)


def merge_overrides(*groups) -> list[str]:
    """Concatenate override lists, a later ``key=value`` replacing an earlier one of the same key and the
    earlier ``key.sub=...`` settings below it (``feature_map=none`` drops ``feature_map.hidden=32``); Hydra
    itself refuses a config group given twice."""
    merged: dict[str, str] = {}
    for group in groups:
        for item in group or ():
            item = str(item)
            key = item.split("=", 1)[0].lstrip("+~")
            if "=" not in item and not item.startswith("~"):
                raise ConfigError(f"study override {item!r} is not key=value")
            for old in [k for k in merged if k == key or k.startswith(key + ".")]:
                del merged[old]
            merged[key] = item
    return list(merged.values())


def _check_name(value, what: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise ConfigError(f"{what}={value!r} must be a name of letters, digits, '_', '-' or '.'")
    return value


def _list(node, what: str) -> list:
    if node is None:
        return []
    if not isinstance(node, (list, ListConfig)):
        raise ConfigError(f"{what} must be a list of overrides such as [task=perplexity, data=c4]")
    return [str(v) for v in node]


def _unknown(node, allowed: set, what: str) -> None:
    extra = sorted(set(node) - allowed)
    if extra:
        raise ConfigError(f"{what} has unknown key(s) {extra}; known: {sorted(allowed)}")


def plan(study: DictConfig, root: Path, group: str | None = None, logger: str | None = None,
         page: Path | None = None, command: str | None = None) -> list[Job]:
    """The study's jobs in an order where every job comes after what it needs.

    ``group`` and ``logger`` are added to every train and eval job (W&B group, logger preset); the report
    job writes ``page`` (default: ``<root>/report/<name>.md``) naming ``command``.
    """
    if not isinstance(study, DictConfig):
        raise ConfigError("study: choose a study, e.g. less-study study=sink_generation (conf/study/)")
    _unknown(study, STUDY_KEYS, f"study={study.get('name')}")
    name = _check_name(study.get("name"), "study.name")
    root = Path(root)
    shared = _list(study.get("setup"), "study.setup")
    logging = ([f"logger={logger}"] if logger else []) + ([f"++logger.group={group}"] if group else [])
    jobs: list[Job] = []
    checkpoints: dict[str, tuple[Path, str]] = {}  # stage -> (checkpoint folder, job that completes it)

    def stage_ref(stage: str, key: str, value) -> tuple[Path, str]:
        if value not in checkpoints:
            known = ", ".join(checkpoints) or "none yet"
            raise ConfigError(f"study={name}: stage {stage} has {key}={value!r}, which is not an earlier stage ({known})")
        return checkpoints[value]

    for index, stage in enumerate(study.get("stages") or []):
        what = f"study={name}: stages[{index}]"
        if not isinstance(stage, DictConfig):
            raise ConfigError(f"{what} must be a mapping with name and overrides")
        _unknown(stage, STAGE_KEYS, what)
        stage_name = _check_name(stage.get("name"), f"{what}.name")
        if stage_name in checkpoints:
            raise ConfigError(f"study={name}: two stages are named {stage_name}")
        folder = root / stage_name
        ckpt = folder / "checkpoint"
        overrides = merge_overrides(shared, _list(stage.get("overrides"), f"{what}.overrides"))
        needs = []
        for key in ("init_from", "toward"):
            if stage.get(key) is not None:
                ref, job = stage_ref(stage_name, key, stage.get(key))
                overrides = merge_overrides(overrides, [f"training.{key}='{ref}'"])
                needs.append(job)
        overrides = merge_overrides(overrides, logging, [f"checkpoint='{ckpt}'"])
        ranges = _ranges(stage.get("layer_ranges"), f"{what}.layer_ranges")
        if ranges:
            parts = []
            for start, stop in ranges:
                part = Job(f"{stage_name}/layers_{start}", "train", folder / f"layers_{start}",
                           merge_overrides(overrides, [f"training.from_layer={start}", f"training.to_layer={_null(stop)}"]),
                           list(needs), ckpt)
                jobs.append(part)
                parts.append(part.name)
            jobs.append(Job(stage_name, "verify", folder, overrides, parts, ckpt, ranges))
        else:
            jobs.append(Job(stage_name, "train", folder, overrides, needs, ckpt))
        checkpoints[stage_name] = (ckpt, stage_name)

    methods = study.get("methods") or {}
    evaluations = study.get("evaluations") or {}
    if evaluations and not methods:
        raise ConfigError(f"study={name}: evaluations need methods to compare (e.g. full, plain, a stage's state)")
    evals = []
    for eval_name, eval_overrides in evaluations.items():
        _check_name(eval_name, f"study={name}: evaluations key")
        chosen = list(methods)
        if isinstance(eval_overrides, DictConfig):
            what = f"study={name}: evaluations.{eval_name}"
            _unknown(eval_overrides, EVALUATION_KEYS, what)
            if eval_overrides.get("methods") is not None:
                chosen = _list(eval_overrides.methods, f"{what}.methods")
                unknown = [m for m in chosen if m not in methods]
                if unknown:
                    raise ConfigError(f"{what}.methods names {unknown}, which are not methods ({', '.join(methods)})")
            eval_overrides = eval_overrides.get("overrides")
        eval_overrides = _list(eval_overrides, f"study={name}: evaluations.{eval_name}")
        for method_name, method in ((m, methods[m]) for m in chosen):
            _check_name(method_name, f"study={name}: methods key")
            what = f"study={name}: methods.{method_name}"
            if not isinstance(method, DictConfig):
                raise ConfigError(f"{what} must be a mapping with overrides and/or checkpoint")
            _unknown(method, METHOD_KEYS, what)
            overrides = merge_overrides(shared, _list(method.get("overrides"), f"{what}.overrides"), eval_overrides)
            needs = []
            if method.get("checkpoint") is not None:
                ref, job = stage_ref(method_name, "checkpoint", method.checkpoint)
                overrides = merge_overrides(overrides, [f"checkpoint='{ref}'"])
                needs.append(job)
            overrides = merge_overrides(overrides, logging)
            job = Job(f"eval/{eval_name}/{method_name}", "eval", root / "eval" / eval_name / method_name, overrides, needs)
            jobs.append(job)
            evals.append(job.name)
    if evals:
        about = study.get("about")
        jobs.append(Job("report", "report", root / "report", [], evals, report={
            "paths": [str(root / "eval")], "page": str(page or root / "report" / f"{name}.md"),
            "out": str(root / "report"), "title": f"Study {name}" + (f": {about}" if about else ""),
            "command": study.get("command") or command or f"less-study study={name}", "group": group,
            "logger": logger}))
    if not jobs:
        raise ConfigError(f"study={name} has no stages and no evaluations")
    return jobs


def _null(value) -> str:
    return "null" if value is None else str(value)


def _ranges(node, what: str) -> list[tuple[int, int | None]]:
    """``[[0, 15], [15, null]]``: contiguous layer ranges from 0, the last open-ended or explicit."""
    if node is None:
        return []
    ranges = OmegaConf.to_container(node) if isinstance(node, ListConfig) else node
    ok = isinstance(ranges, list) and ranges and all(
        isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and (r[1] is None or isinstance(r[1], int))
        for r in ranges)
    if ok:
        ok = ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and all(
            r[1] is None or r[1] > r[0] for r in ranges)
    if not ok:
        raise ConfigError(f"{what}={ranges!r} must be contiguous [from, to) pairs from 0, e.g. [[0, 15], [15, null]]")
    return [(int(a), None if b is None else int(b)) for a, b in ranges]


def by_name(jobs: list[Job]) -> dict[str, Job]:
    return {job.name: job for job in jobs}
