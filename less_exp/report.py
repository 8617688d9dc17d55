"""``less-report PATH...``: every ``results.json`` under run or sweep folders as one report.

The report is ``report.md`` (one markdown table per task, rows grouped by model, policy, budget and
state config) plus PNG figures (per task a summary of its headline metric against memory for every
method, each plotted metric against memory, passkey heatmaps; :mod:`less_exp.report_plots`),
and, with ``--logger wandb``, the same tables and images in a W&B run; with ``--page``, a results page
for the repo's docs (:func:`write_page`). Each task module and training mode declares its columns,
plotted and headline metrics and label (``REPORT``, a :class:`~less_exp.report_spec.ReportSpec`), so
this module keeps no list of task or mode names.

Only comparable runs are put together: the measurement settings that vary among a task's runs
(:func:`run_settings`: data set, task settings, model dtype, seed) are columns of its table and split
its plot lines, so a plot averages repeated runs only when all of them agree (seeds are averaged with
``--average-seeds``). Failed runs (``status: failed``, or a non-finite headline metric) are listed
apart under "Failed runs" and kept out of the tables and plots.
"""

from __future__ import annotations


import argparse
import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import shutil
import sys
import urllib.parse
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from less_exp.errors import ConfigError
from less_exp.report_spec import PairedRows, ReportSpec
from less_exp.results import FILENAME, Run

log = logging.getLogger(__name__)

TRAIN = "train"
SUMMARY_KEYS = ("policy", "budget", "sink", "heavy", "recent", "state_token_equivalents")
STATE_DEFAULTS = {"gating": "none", "reweighting": "none", "normalizer": "joint"}
UNDECLARED = ReportSpec()  # a task or mode without a REPORT: every numeric metric, the mode named in labels
LEAD_COLUMNS = ("model", "method", "budget", "state (token-eq.)", "memory (tokens)")
BOOKKEEPING_KEYS = frozenset({"task.name", "task.module", "task.batch_size"})
SEED = "seed"
FAILED_COLUMNS = ("run", "task", "method", "reason")


class NoResultsError(FileNotFoundError):
    """Nothing to report: a PATH does not exist, or no readable ``results.json`` lies under them."""


@functools.cache
def declared(kind: str, name: str) -> ReportSpec:
    """The ``REPORT`` of task module (``kind="task"``) or training mode (``kind="training"``) ``name``,
    read through its registry; :data:`UNDECLARED` for a name not registered or a module without one."""
    from less_exp import tasks, training

    try:
        module = tasks.get(name) if kind == "task" else training.get(name)
    except ConfigError:
        return UNDECLARED
    except ImportError as err:
        log.warning("%s %s cannot be imported (%s): its runs get every numeric metric as a column", kind, name, err)
        return UNDECLARED
    spec = getattr(module, "REPORT", None)
    return spec if isinstance(spec, ReportSpec) else UNDECLARED


def spec_of(config: Mapping[str, Any], job: str) -> ReportSpec:
    """The :class:`ReportSpec` of a run: its training mode's for a train job, else its task module's
    (``task.module``, else ``task.name``)."""
    section = config.get("training" if job == TRAIN else "task")
    if not isinstance(section, Mapping):
        return UNDECLARED
    name = section.get("mode") if job == TRAIN else section.get("module") or section.get("name")
    return declared("training" if job == TRAIN else "task", name) if isinstance(name, str) else UNDECLARED


@dataclass(frozen=True)
class ReportRun(Run):
    """A :class:`Run` with what the report also reads: its ``status`` and ``error``, and ``settings``,
    the values of its :func:`run_settings`, and ``spec``, how its task or training mode is reported."""

    settings: Mapping[str, Any] = field(default_factory=dict)
    status: str = "ok"
    error: str | None = None
    folder: Path | None = None
    spec: ReportSpec = UNDECLARED


@dataclass
class Table:
    """A task's table: raw ``values`` (for W&B), the same rows as markdown ``cells``, and its runs'
    ``headline`` metrics with their direction (:meth:`ReportSpec.direction`)."""

    task: str
    columns: list[str]
    values: list[list[Any]]
    cells: list[list[str]]
    headline: str = ""

    def markdown(self) -> str:
        lines = [_md_row(self.columns), _md_row(["---"] * len(self.columns))]
        return "\n".join(lines + [_md_row(row) for row in self.cells])


@dataclass
class Report:
    """What :func:`make_report` wrote: ``report.md``, the figures (``summaries``: the headline metric
    against memory, one per model and task; ``plots``: each plotted metric; ``heatmaps``: passkey) and the W&B run."""

    out_dir: Path
    markdown: str
    runs: list[Run]
    tables: list[Table]
    plots: list[Path] = field(default_factory=list)
    heatmaps: list[Path] = field(default_factory=list)
    failed: list[tuple[Run, str]] = field(default_factory=list)
    wandb_run_dir: Path | None = None
    images: list = field(default_factory=list)  # every figure as report_plots.Plot (task, caption, figure), summaries first
    paths: list = field(default_factory=list)  # the PATHs reported
    average_seeds: bool = False
    summaries: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------ reading
def find_results(paths: Iterable[str | Path]) -> list[tuple[Path, Path]]:
    """``(results.json, the PATH it was found under)`` for every file under ``paths``, each once."""
    found, seen = [], set()
    for root in map(Path, paths):
        if not root.exists():
            raise NoResultsError(f"{root} does not exist")
        files = [root] if root.is_file() else sorted(root.rglob(FILENAME))
        for file in files:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                found.append((file, root))
    return found


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every readable run under ``paths``; unreadable or foreign files are logged and skipped."""
    runs = []
    for file, root in find_results(paths):
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
            runs.append(dataclasses.replace(to_run(record, _run_name(file, root)), folder=file.parent))
        except (OSError, ValueError, TypeError, AttributeError) as err:
            log.warning("skipping %s: %s", file, err)
    return runs


def to_run(record: Mapping[str, Any], name: str) -> ReportRun:
    """The :class:`ReportRun` of one ``results.json`` record; ``ValueError`` when it is not one.

    A record without ``status`` (written before it existed) counts as ok.
    """
    if not isinstance(record, Mapping) or record.get("job") not in ("eval", TRAIN):
        raise ValueError("not an eval or train results.json")
    metrics, config = record.get("metrics"), record.get("config")
    if not isinstance(metrics, Mapping) or not isinstance(config, Mapping):
        raise ValueError("results.json without metrics or config")
    job = record["job"]
    spec = spec_of(config, job)
    headline = metrics.get(spec.headline) if spec.headline else None
    if record.get("status", "ok") == "ok" and headline is not None and not _is_number(headline):
        raise ValueError(f"its headline metric {spec.headline}={headline!r} is not a number")
    policy = metrics.get("policy") if job == "eval" and isinstance(metrics.get("policy"), str) else _name(config, "policy")
    state_tokens = metrics.get("state_token_equivalents", 0.0)
    grid = metrics.get("passkey_grid")
    error = record.get("error")
    return ReportRun(
        name=name,
        job=job,
        model=_name(config, "model"),
        task=TRAIN if job == TRAIN else _name(config, "task"),
        policy=policy,
        method=method_label(config, policy, loads_checkpoint=job == "eval"),
        budget=_budget(metrics, config, policy),
        state_tokens=float(state_tokens) if _is_number(state_tokens) else 0.0,
        metrics={k: v for k, v in metrics.items() if _is_scalar(v)},
        passkey_grid=grid if isinstance(grid, Mapping) else None,
        settings=run_settings(config),
        status=str(record.get("status", "ok")),
        error=None if error is None else str(error),
        spec=spec,
    )


def run_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a run's numbers depend on besides model and method, by dotted key: ``data.name``, every
    ``task.*`` key but :data:`BOOKKEEPING_KEYS` (a config group nested in the task, such as
    ``task.dataset``, by its ``name``), ``model.dtype`` and ``seed``; absent ones are ``None``, lists tuples."""
    data, model = config.get("data"), config.get("model")
    settings = {"data.name": _hashable(data.get("name")) if isinstance(data, Mapping) else None}
    task = config.get("task")
    if isinstance(task, Mapping):
        settings.update((k, v) for k, v in _flatten("task", task).items() if k not in BOOKKEEPING_KEYS)
    settings["model.dtype"] = _hashable(model.get("dtype")) if isinstance(model, Mapping) else None
    settings[SEED] = _hashable(config.get(SEED))
    return settings


def _flatten(prefix: str, group: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in group.items():
        path = f"{prefix}.{key}"
        if isinstance(value, Mapping) and "name" in value:
            flat[f"{path}.name"] = _hashable(value["name"])
        elif isinstance(value, Mapping):
            flat.update(_flatten(path, value))
        else:
            flat[path] = _hashable(value)
    return flat


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    return value


def failure(run: Run, extra: Sequence[str] = ()) -> str | None:
    """Why ``run`` is not a result: its error when its status is not ok, or ``non-finite <metric>``
    when a metric it is judged by (the plotted metrics of its spec that it reports, else its spec's
    columns, and ``extra``) is a NaN or infinite float; ``None`` for a good run."""
    status = getattr(run, "status", "ok")
    if status != "ok":
        return getattr(run, "error", None) or f"status {status}"
    spec = getattr(run, "spec", UNDECLARED)
    plotted = [m for m in spec.plots if m in run.metrics]
    patterns = (*(plotted or spec.columns or ("*",)), *extra)
    bad = [
        key
        for key, value in run.metrics.items()
        if isinstance(value, float) and not math.isfinite(value) and "stderr" not in key and any(fnmatchcase(key, p) for p in patterns)
    ]
    return "non-finite " + ", ".join(bad) if bad else None


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """The :func:`run_settings` keys whose values differ among ``runs``, in their order."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in getattr(run, "settings", {}) if k not in keys]
    return [k for k in keys if len({_setting(r, k) for r in runs}) > 1]


def _setting(run: Run, key: str) -> Any:
    return getattr(run, "settings", {}).get(key)


def setting_text(value: Any) -> str:
    """A setting as a cell or label shows it: ``null``, ``[512, 1024]``, ``c4``."""
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return "[" + ", ".join(setting_text(v) for v in value) + "]"
    return _cell(value)


def _setting_order(value: Any) -> tuple:
    if value is None:
        return (0, 0, "")
    if _is_number(value) or isinstance(value, bool):
        return (1, value, "")
    return (2, 0, setting_text(value))


TRAINING_DATA_DEFAULT = "wikitext2"  # conf/train.yaml's data, left out of labels


def method_label(config: Mapping[str, Any], policy: str, loads_checkpoint: bool = True) -> str:
    """``h2o``, ``h2o+less_mlp``, ``sink+less_mlp(ckpt)``, ``sink(baseline+)``, ``full``.

    A state config other than the defaults (gating, re-weighting none; normaliser joint) is
    added in brackets; ``(ckpt)`` marks states loaded from ``checkpoint`` (``loads_checkpoint``
    is false for train jobs, whose checkpoint is their output). A checkpoint run names the
    components the checkpoint brought (its manifest's feature map, gating, re-weighting and
    normaliser, where the run left them at their defaults) when the manifest can be read, the
    training mode when it is not layer-wise (``[training=progressive]``; an interpolation with its
    alpha, ``[training=interpolate(0.5)]``) and the training data when it is not WikiText-2
    (``[data=c4_answers]``).
    """
    if policy == "full":
        return "full"
    if (config.get("policy") or {}).get("baseline_plus"):
        return f"{policy}(baseline+)"
    checkpoint = config.get("checkpoint") if loads_checkpoint else None
    manifest = _checkpoint_manifest(config, checkpoint) if checkpoint else {}
    feature_map = _name(config, "feature_map")
    if feature_map == "none" and checkpoint:
        feature_map = _name(manifest, "feature_map", "state")
    if feature_map == "none":
        return policy
    names = {group: _name(config, group, default) for group, default in STATE_DEFAULTS.items()}
    for group, default in STATE_DEFAULTS.items():  # components a checkpoint brought are its own
        if names[group] == default:
            names[group] = _name(manifest, group, default)
    others = [f"{group}={name}" for group, name in names.items() if name != STATE_DEFAULTS[group]]
    gating = config.get("gating") if _name(config, "gating", "none") != "none" else manifest.get("gating")
    if isinstance(gating, Mapping) and gating.get("learned"):
        others = [f"{o}(learned)" if o.startswith("gating=") else o for o in others]
    trained_by = (manifest if checkpoint else config).get("training")
    mode = trained_by.get("mode") if isinstance(trained_by, Mapping) else None
    spec = declared("training", mode) if isinstance(mode, str) else None
    if spec is not None and spec.labelled:
        value = trained_by.get(spec.label_key) if spec.label_key else None
        others.append(f"training={mode}" + (f"({value:g})" if _is_number(value) else ""))
    if checkpoint:
        trained_on = trained_by.get("data") if isinstance(trained_by, Mapping) else None
    elif spec is not None and not spec.own_data:  # its data is what the job evaluates on
        trained_on = None
    else:  # a training job: its own data
        trained_on = (config.get("data") or {}).get("name") if isinstance(trained_by, Mapping) else None
    if trained_on not in (None, TRAINING_DATA_DEFAULT):
        others.append(f"data={trained_on}")
    return policy + f"+{feature_map}" + (f"[{','.join(others)}]" if others else "") + ("(ckpt)" if checkpoint else "")


def _checkpoint_manifest(config: Mapping[str, Any], checkpoint: str) -> dict:
    """The manifest of the checkpoint a run loaded (relative paths from the run's root), or {}."""
    path = Path(checkpoint)
    if not path.is_absolute():
        path = Path((config.get("paths") or {}).get("root_dir") or ".") / path
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        return manifest if isinstance(manifest, dict) else {}
    except (OSError, ValueError, TypeError):
        return {}


def _budget(metrics: Mapping[str, Any], config: Mapping[str, Any], policy: str) -> int | None:
    """The resolved capacity; results.json from before it was recorded fall back to the config's counts."""
    if policy == "full":
        return None
    if _is_number(metrics.get("budget")):
        return int(metrics["budget"])
    counts = [(config.get("policy") or {}).get(key) or 0 for key in ("sink", "heavy", "recent")]
    return sum(counts) if all(isinstance(c, int) for c in counts) else None


def _name(config: Mapping[str, Any], group: str, default: str = "?") -> str:
    value = config.get(group)
    return str(value.get("name", default)) if isinstance(value, Mapping) else default


def _run_name(file: Path, root: Path) -> str:
    run_dir = file.parent
    base = root.parent if root.is_dir() else root.parent.parent
    return os.path.relpath(run_dir, base)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


# ------------------------------------------------------------------------------ tables
def table_columns(runs: Sequence[Run], extra: Sequence[str] = ()) -> list[str]:
    """The metric columns of a table of ``runs``: the column patterns of their specs in turn (a spec
    that declares none: every numeric metric of its runs), plus ``extra``."""
    present: list[str] = []
    for run in runs:
        present += [k for k in run.metrics if k not in present and k not in SUMMARY_KEYS]
    chosen: list[str] = []
    for spec in dict.fromkeys(_spec(run) for run in runs):
        if spec.columns is None:
            mine = [run for run in runs if _spec(run) == spec]
            chosen += [k for k in present if any(_is_number(r.metrics.get(k)) for r in mine)]
        else:
            chosen += [k for p in spec.columns for k in present if fnmatchcase(k, p)]
    return list(dict.fromkeys(chosen + [k for k in extra if k in present]))


def _spec(run: Run) -> ReportSpec:
    return getattr(run, "spec", UNDECLARED)


def build_tables(runs: Sequence[Run], extra: Sequence[str] = ()) -> list[Table]:
    """One table per task (eval tasks by name, then training). The task's :func:`varying_keys` are
    columns after the lead ones; rows are ordered by model, those settings, then :meth:`Run.sort_key`."""
    tasks = sorted({r.task for r in runs}, key=lambda t: (t == TRAIN, t))
    tables = []
    for task in tasks:
        rows = [r for r in runs if r.task == task]
        keys = varying_keys(rows)
        rows.sort(key=lambda r: (r.model, [_setting_order(_setting(r, k)) for k in keys], r.sort_key()))
        metrics = table_columns(rows, extra)
        headline = "; ".join(dict.fromkeys(spec.direction() for spec in map(_spec, rows) if spec.headline))
        table = Table(task, [*LEAD_COLUMNS, *keys, *metrics, "run"], [], [], headline)
        for run in rows:
            settings = [_setting(run, k) for k in keys]
            lead = [run.model, run.method, run.budget, round(run.state_tokens, 4), run.memory]
            raw = [setting_text(v) if isinstance(v, tuple) else v for v in settings]
            table.values.append([*lead, *raw, *(run.metrics.get(m) for m in metrics), run.name])
            cap = "full" if run.policy == "full" else "?"
            table.cells.append(
                [run.model, run.method, _cell(run.budget, cap), _cell(run.state_tokens), _cell(run.memory, cap)]
                + [setting_text(v) for v in settings]
                + [_cell(run.metrics.get(m)) for m in metrics]
                + [run.name]
            )
        tables.append(table)
    return tables


def _cell(value: Any, missing: str = "") -> str:
    if value is None:
        return missing
    if isinstance(value, float):
        if math.isfinite(value) and value != 0 and not 1e-3 <= abs(value) < 1e6:
            return f"{value:.3e}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if math.isfinite(value) else str(value)
    return str(value)


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


# ------------------------------------------------------------------------------ the report
def make_report(
    paths: Sequence[str | Path],
    out_dir: str | Path | None = None,
    metrics: Sequence[str] = (),
    logger: str = "none",
    project: str | None = None,
    average_seeds: bool = False,
    group: str | None = None,
) -> Report:
    """Read every run under ``paths``; write ``report.md`` and the PNGs into ``out_dir``.

    ``out_dir`` defaults to ``<first PATH>/report``; ``metrics`` replace each task's plotted
    metrics and join its columns; ``logger="wandb"`` also logs the tables and images to W&B.
    Failed runs (see :func:`failure`) go to ``Report.failed`` and the "Failed runs" section only.
    Plot lines are split by every :func:`varying_keys` of the task, ``seed`` aside when
    ``average_seeds`` (then repeated seeds are averaged).
    """
    from less_exp import report_plots

    if not paths:
        raise NoResultsError("no PATH given")
    loaded = load_runs(paths)
    if not loaded:
        raise NoResultsError(f"no readable {FILENAME} under {', '.join(map(str, paths))}")
    reasons = [failure(run, metrics) for run in loaded]
    runs = with_paired_differences(with_gap_closed([run for run, reason in zip(loaded, reasons) if reason is None]))
    failed = [(run, reason) for run, reason in zip(loaded, reasons) if reason is not None]
    first = Path(paths[0])
    out = Path(out_dir) if out_dir is not None else (first if first.is_dir() else first.parent) / "report"
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(runs, metrics)
    split = {}
    for task in {r.task for r in runs}:
        split[task] = [k for k in varying_keys([r for r in runs if r.task == task]) if not (average_seeds and k == SEED)]
    plotted = {task: tuple(dict.fromkeys(m for r in runs if r.task == task for m in _spec(r).plots)) for task in split}
    headline = {task: next((_spec(r).headline for r in runs if r.task == task and _spec(r).headline), None) for task in split}
    styles, taken = report_plots.method_styles([r.method for r in runs]), set()
    settings = lambda run: tuple((k, setting_text(_setting(run, k))) for k in split[run.task])  # noqa: E731
    summaries = report_plots.summary_plots(runs, out, headline.get, settings, styles, taken)
    plots = report_plots.metric_plots(runs, out, lambda task: tuple(metrics) or plotted[task], settings, styles, taken)
    heatmaps = report_plots.passkey_heatmaps(runs, out, styles, taken)
    images = summaries + plots + heatmaps
    markdown = _markdown(paths, runs, tables, images, out, failed, average_seeds)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    report = Report(out, markdown, runs, tables, [p.path for p in plots], [p.path for p in heatmaps], failed,
                    images=images, paths=list(paths), average_seeds=average_seeds, summaries=[p.path for p in summaries])
    if logger != "none":
        report.wandb_run_dir = _log_to_wandb(report, images, paths, logger, project, group)
    return report


def _comparison_key(run: ReportRun) -> tuple:
    return run.model, run.task, tuple(sorted((k, _hashable(v)) for k, v in run.settings.items()))


def plain_references(runs: Sequence[ReportRun], metric: str):
    """``run -> the plain run it is compared with, or None``: same model, task, policy and settings, the
    largest budget not above the run's (so Baseline+ meets the policy it grows); only for runs that are
    neither plain nor full, and only among plain runs that report ``metric``."""
    plain: dict = defaultdict(list)
    for r in runs:
        if r.policy != "full" and r.method == r.policy and r.budget is not None and _is_number(r.metrics.get(metric)):
            plain[(*_comparison_key(r), r.policy)].append(r)

    def reference(run: ReportRun) -> ReportRun | None:
        if run.method == run.policy or run.policy == "full" or run.budget is None:
            return None
        below = [p for p in plain.get((*_comparison_key(run), run.policy), []) if p.budget <= run.budget]
        return max(below, key=lambda p: p.budget) if below else None

    return reference


def with_gap_closed(runs: Sequence[ReportRun]) -> list[ReportRun]:
    """Runs with ``gap_closed = (plain - x) / (plain - full)`` of their spec's ``gap`` metric added where
    the report holds the comparable plain run (:func:`plain_references`) and full-cache run (same model,
    task and settings). Plain and full runs get none (0 and 1 by definition)."""
    full = {_comparison_key(r): r.metrics[_spec(r).gap] for r in runs if r.policy == "full" and _is_number(r.metrics.get(_spec(r).gap))}
    references = {metric: plain_references(runs, metric) for metric in {_spec(r).gap for r in runs} - {None}}
    out = []
    for run in runs:
        metric = _spec(run).gap
        value, ref = run.metrics.get(metric), full.get(_comparison_key(run))
        plain = references[metric](run) if metric else None
        if _is_number(value) and ref is not None and plain is not None:
            base = plain.metrics[metric]
            if base != ref:
                run = dataclasses.replace(run, metrics={**run.metrics, "gap_closed": (base - value) / (base - ref)})
        out.append(run)
    return out


def _sample_rows(run: ReportRun, paired: PairedRows) -> dict[int, dict]:
    """The per-sample rows a run wrote beside its results.json (``paired.file``), by sample index."""
    path = None if run.folder is None else run.folder / paired.file
    rows = {}
    if path is None or not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            rows[int(row["index"])] = row
        except (ValueError, KeyError, TypeError):
            continue
    return rows


def paired_difference(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of paired differences (se 0 for a single pair)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def with_paired_differences(runs: Sequence[ReportRun]) -> list[ReportRun]:
    """Runs whose spec declares ``paired`` rows, with ``<metric>_vs_plain`` and ``<metric>_vs_plain_se``:
    the mean and standard error of the per-sample differences from the plain run of
    :func:`plain_references`, over the samples both scored (``paired_samples``). Sampling noise that
    hides a difference between two run means mostly cancels in paired differences (greedy decoding
    removes it)."""
    references = {spec.paired: plain_references(runs, spec.paired.reference) for spec in map(_spec, runs) if spec.paired}
    out = []
    for run in runs:
        paired = _spec(run).paired
        plain = references[paired](run) if paired else None
        mine = _sample_rows(run, paired) if plain is not None else {}
        theirs = _sample_rows(plain, paired) if mine else {}
        common = sorted(set(mine) & set(theirs))
        if common:
            extra: dict[str, Any] = {"paired_samples": len(common)}
            for metric in paired.metrics:
                pairs = [(mine[i].get(metric), theirs[i].get(metric)) for i in common]
                diffs = [a - b for a, b in pairs if _is_number(a) and _is_number(b)]
                if diffs:
                    extra[f"{metric}_vs_plain"], extra[f"{metric}_vs_plain_se"] = paired_difference(diffs)
            run = dataclasses.replace(run, metrics={**run.metrics, **extra})
        out.append(run)
    return out


def failed_table(failed: Sequence[tuple[Run, str]]) -> Table:
    """The "Failed runs" table: each failed run's name, task, method and reason."""
    values = [[run.name, run.task, run.method, reason] for run, reason in sorted(failed, key=lambda f: f[0].name)]
    return Table("Failed runs", list(FAILED_COLUMNS), values, [[str(v) for v in row] for row in values])


def _markdown(paths, runs: Sequence[Run], tables: Sequence[Table], images, out: Path, failed=(), average_seeds=False) -> str:
    lines = ["# less-report", "", _intro(paths, runs, failed, average_seeds)]
    return "\n".join(lines + _sections(tables, images, lambda path: path.relative_to(out).as_posix(), failed)) + "\n"


def _intro(paths, runs: Sequence[Run], failed, average_seeds: bool) -> str:
    apart = f", plus {len(failed)} failed (listed under Failed runs, left out of tables and plots)" if failed else ""
    seeds = "averaged" if average_seeds else "kept apart"
    return (
        f"{len(runs)} runs from {', '.join(f'`{p}`' for p in paths)}{apart}. Budget and memory are in tokens; memory is "
        "the budget plus the state's size in token-equivalents, rounded. Settings that vary among a task's runs "
        "(data set, task settings, model dtype, seed) are columns of its table and split its plot lines. "
        f"Repeated runs are separate rows; plots show the mean of runs whose settings all agree (seeds {seeds})."
    )


def _sections(tables: Sequence[Table], images, link, failed=()) -> list[str]:
    """A section per table (its headline, the table, its images linked by ``link(path)``), then the failed runs."""
    lines = []
    for table in tables:
        lines += ["", f"## {table.task}", ""] + ([f"Headline: {table.headline}.", ""] if table.headline else []) + [table.markdown()]
        lines += [f"\n![{img.caption}]({link(img.path)})" for img in images if img.task == table.task]
    if failed:
        lines += ["", "## Failed runs", "", failed_table(failed).markdown()]
    return lines


def _log_to_wandb(report: Report, images, paths, logger: str, project: str | None, group: str | None = None) -> Path | None:
    """Log every table (``table/<task>``), image (``plot/<file stem>``) and the failed runs
    (``table/failed_runs``, when any) into one W&B run of job type ``report``, in ``group``, else in the
    group that every reported run logged to (when they share one), so the report sits beside its runs."""
    from omegaconf import OmegaConf

    from less_exp import paths as less_paths
    from less_exp.tracking import make_tracker, recorded_group

    if group is None:
        runs = [*report.runs, *(run for run, _ in report.failed)]
        groups = {recorded_group(run.folder) if run.folder is not None else None for run in runs}
        group = groups.pop() if len(groups) == 1 else None

    logger_cfg = OmegaConf.load(Path(less_paths.conf_dir()) / "logger" / f"{logger}.yaml")
    if project:
        logger_cfg.project = project
    config = {"paths": [str(p) for p in paths], "runs": len(report.runs), "failed_runs": len(report.failed), "out_dir": str(report.out_dir)}
    with make_tracker(logger_cfg, config, report.out_dir, "report", "report", group=group) as tracker:
        for table in report.tables:
            tracker.log_table(f"table/{table.task}", table.columns, table.values)
        if report.failed:
            failed = failed_table(report.failed)
            tracker.log_table("table/failed_runs", failed.columns, failed.values)
        for image in images:
            tracker.log_image(f"plot/{image.path.stem}", str(image.path), caption=image.caption)
        tracker.summary({"runs": len(report.runs), "failed_runs": len(report.failed)})
    return tracker.run_dir


# ------------------------------------------------------------------------------ the results page
def write_page(
    paths: Sequence[str | Path], page: str | Path, *, title: str | None = None, command: str | None = None,
    out: str | Path | None = None, **options: Any,
) -> Path:
    """Report the runs under ``paths`` (:func:`make_report` into ``out`` with ``options``) and publish
    it as the results page ``page`` (:func:`publish`); returns the page's path."""
    page = page_path(page)
    return publish(make_report(paths, out, **options), page, title=title, command=command)


def page_path(page: str | Path) -> Path:
    """``page`` as a path; :class:`ConfigError` unless it names a ``.md`` file (its plots go to a folder
    of the same name, which must not be the page)."""
    if Path(page).suffix != ".md":
        raise ConfigError(f"the page {page} must be a markdown file ending in .md (e.g. docs/results/<study>.md)")
    return Path(page)


def publish(report: Report, page: str | Path, *, title: str | None = None, command: str | None = None) -> Path:
    """Write ``report`` as a markdown page at ``page``: the title (default: the page's name), the command
    that produced the runs, the code version and commit (:mod:`less_exp.version`) and the date, then the
    report's tables, with its PNGs copied into ``<page folder>/<page name>/`` and linked relatively (so
    they render on GitHub). Rerunning overwrites the page and leaves no PNG of an earlier run there."""
    from less_exp.version import code_version, git_commit

    page = page_path(page)
    images_dir = page.with_suffix("")
    images_dir.mkdir(parents=True, exist_ok=True)
    copies = {image.path: images_dir / image.path.name for image in report.images}
    for stale in set(images_dir.glob("*.png")) - set(copies.values()):
        stale.unlink()
    for source, copy in copies.items():
        if not copy.exists() or not copy.samefile(source):
            shutil.copy2(source, copy)

    def link(path: Path) -> str:
        return urllib.parse.quote(Path(os.path.relpath(copies[path], page.parent)).as_posix())

    commit = git_commit()
    lines = [
        f"# {title or page.stem}",
        "",
        "Generated from the runs' results.json by `less-report --page`: regenerate it, do not edit it. The runs came from:",
        "",
        "```sh",
        command or "(not recorded)",
        "```",
        "",
        f"- Code version: `{code_version()}`" + (f", commit `{commit}`" if commit else " (not a git checkout)"),
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).date().isoformat()}",
        "",
        _intro([_shown(p) for p in report.paths], report.runs, report.failed, report.average_seeds),
    ]
    page.write_text("\n".join(lines + _sections(report.tables, report.images, link, report.failed)) + "\n", encoding="utf-8")
    return page


def _shown(path: str | Path) -> str:
    """``path`` relative to the working folder when it lies below it (a page names no home folders)."""
    relative = os.path.relpath(Path(path).resolve(), Path.cwd())
    return str(path) if relative.startswith("..") else relative


# ------------------------------------------------------------------------------ command line
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``less-report PATH... [--out DIR] [--metric NAME] [--average-seeds] [--logger wandb|none] [--project P] [--group G]
    [--page PATH.md [--title T] [--command CMD]]``."""
    parser = argparse.ArgumentParser(
        prog="less-report", description="Gather every results.json under run or sweep folders into a markdown table and PNG plots."
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run folders, sweep folders or results.json files")
    parser.add_argument("--out", help="output folder (default: <first PATH>/report)")
    parser.add_argument("--metric", action="append", default=[], help="metric to plot against the budget (repeatable)")
    parser.add_argument(
        "--average-seeds", action="store_true", help="average runs that differ only in seed (default: a plot line per seed)"
    )
    parser.add_argument("--logger", choices=("none", "wandb"), default="none", help="also log to W&B (offline unless WANDB_MODE=online)")
    parser.add_argument("--project", help="W&B project (default: the logger config's)")
    parser.add_argument("--group", help="W&B group of the report's run (default: the group its runs share, if any)")
    parser.add_argument("--page", help="also write a results page (markdown) here, its plots in a folder of its name beside it")
    parser.add_argument("--title", help="the page's title (default: its file name)")
    parser.add_argument("--command", help="the command that produced the runs, shown at the top of the page")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="less-report: %(message)s", stream=sys.stderr)
    try:
        page = page_path(args.page) if args.page else None
        report = make_report(args.paths, args.out, args.metric, args.logger, args.project, args.average_seeds, args.group)
        page = publish(report, page, title=args.title, command=args.command) if page else None
    except (NoResultsError, ConfigError) as err:
        print(f"less-report: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if os.environ.get("LESS_DEBUG") == "1":
            raise
        where = err.filename or args.out
        print(f"less-report: error: cannot write the report to {where} ({err.strerror}); choose a writable --out",
              file=sys.stderr)
        return 2
    print(report.markdown)
    print(
        f"report: {report.out_dir / 'report.md'} (summaries: {len(report.summaries)}, plots: {len(report.plots)}, passkey heatmaps: {len(report.heatmaps)}, "
        f"failed runs: {len(report.failed)})" + (f"; page: {page}" if page else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
