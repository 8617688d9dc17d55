"""The PNGs of ``less-report``: metric versus memory per method and setting, and passkey heatmaps.

Figures are drawn on matplotlib's Agg canvas without pyplot, so a report never opens a window
or touches pyplot's global figure list.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from less_exp.results import Run

log = logging.getLogger(__name__)

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LEGEND_INSIDE = 8  # lines a single plot keeps its legend inside the axes for
Settings = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Plot:
    """A written PNG, the task whose section shows it, and its caption."""

    path: Path
    task: str
    caption: str


def metric_plots(
    runs: Sequence[Run],
    out: Path,
    metrics_for: Callable[[str], Sequence[str]],
    settings: Callable[[Run], Settings] = lambda run: (),
) -> list[Plot]:
    """One PNG per (model, task, metric): the mean metric against the cache's memory in tokens
    (budget + the state's token-equivalents, so methods compare at equal memory), a line per method
    and distinct ``settings`` (``(key, value)`` pairs that must agree for runs to be averaged).

    Settings that differ within a plot label its lines (``h2o (data.name=c4)``); each then has its own
    colour, shared with its full-cache line, and each method its own marker. When every line sits at a
    single memory size the figure is a bar chart instead. Full-cache runs are dashed horizontal lines; a
    (model, task, metric) without any compressed run has no plot.
    """
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.model, run.task].append(run)
    plots, taken = [], set()
    for (model, task), group in sorted(groups.items()):
        split = _varying([settings(run) for run in group])
        tag = {id(run): tuple(kv for kv in settings(run) if kv[0] in split) for run in group}
        colours = {t: f"C{i}" for i, t in enumerate(sorted(set(tag.values())))} if split else {}
        for metric in metrics_for(task):
            lines: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
            line_of: dict[str, tuple[str, Settings]] = {}
            full: dict[Settings, list[float]] = defaultdict(list)
            for run in group:
                value = run.metrics.get(metric)
                if not _finite(value):
                    continue
                if run.policy == "full":
                    full[tag[id(run)]].append(value)
                elif run.memory is not None:
                    label = _label(run.method, tag[id(run)])
                    lines[label][run.memory].append(value)
                    line_of[label] = run.method, tag[id(run)]
            if not lines:
                continue
            panels = sorted({_panel(line_of[label][0]) for label in lines})
            many = len(panels) > 1 or len(lines) > LEGEND_INSIDE
            figure = _figure()
            if many:  # a panel per policy, legends below: a sweep's dozens of lines stay readable
                rows = max(sum(1 for label in lines if _panel(line_of[label][0]) == p) for p in panels)
                figure.set_size_inches(max(6.4, 4.6 * len(panels)), 4.4 + 0.19 * (rows + len(full)))
            grid = figure.subplots(1, len(panels), squeeze=False)[0] if many else [figure.subplots()]
            for axes, panel in zip(grid, panels if many else [None]):
                mine = {label: points for label, points in lines.items() if panel is None or _panel(line_of[label][0]) == panel}
                if all(len(points) == 1 for points in mine.values()):
                    _bars(axes, mine)
                else:
                    methods = sorted({method for method, _ in line_of.values()})
                    for i, label in enumerate(sorted(mine)):
                        method, line_tag = line_of[label]
                        style = ({"marker": MARKERS[methods.index(method) % len(MARKERS)], "color": colours[line_tag]} if split
                                 else {"marker": MARKERS[(i // 10) % len(MARKERS)], "color": f"C{i % 10}"})
                        sizes = sorted(mine[label])
                        axes.plot(sizes, [mean(mine[label][b]) for b in sizes], label=label, **style)
                    axes.set(xlabel="memory (tokens: budget + state token-equivalents)")
                for full_tag in sorted(full):
                    axes.axhline(mean(full[full_tag]), linestyle="--", color=colours.get(full_tag, "black"),
                                 label=_label("full", full_tag))
                axes.set(ylabel=metric, title=f"{model} · {task} · {metric}" + (f" · {panel}" if panel else ""))
                axes.grid(alpha=0.3)
                if axes.get_legend_handles_labels()[0]:
                    if many:
                        axes.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=1)
                    else:
                        axes.legend(fontsize="small")
            caption = f"{metric} versus memory, {model}, {task}" + (f", apart by {', '.join(split)}" if split else "")
            plots.append(_save(figure, _unique(out / f"{_slug(model, task, metric)}.png", taken), task, caption))
    return plots


def _panel(method: str) -> str:
    """The policy a method label starts with (``h2o+less_mlp[...]`` -> ``h2o``)."""
    return method.split("+")[0].split("(")[0]


def _varying(all_settings: Sequence[Settings]) -> list[str]:
    """The keys whose value is not the same in every one of ``all_settings``, in order of appearance."""
    keys = list(dict.fromkeys(key for pairs in all_settings for key, _ in pairs))
    return [key for key in keys if len({dict(pairs).get(key) for pairs in all_settings}) > 1]


def _label(method: str, settings: Settings) -> str:
    return f"{method} ({', '.join(f'{k}={v}' for k, v in settings)})" if settings else method


def _bars(axes, lines: dict[str, dict[int, list[float]]]) -> None:
    """One bar per line (method and settings), labelled with its memory and value."""
    methods = sorted(lines, key=lambda m: (next(iter(lines[m])), m))
    values = [mean(next(iter(lines[m].values()))) for m in methods]
    bars = axes.bar(range(len(methods)), values, color=[f"C{i}" for i in range(len(methods))])
    axes.bar_label(bars, [f"{v:.4g}" for v in values], fontsize="small")
    axes.set_xticks(range(len(methods)), [f"{m}\n{next(iter(lines[m]))} tokens" for m in methods], fontsize="small")
    axes.set_ylim(0, max(values) * 1.15)


def passkey_heatmaps(runs: Sequence[Run], out: Path) -> list[Plot]:
    """One :func:`accuracy_heatmap` per run with a ``passkey_grid``."""
    plots, taken = [], set()
    for run in runs:
        if run.passkey_grid is None:
            continue
        try:
            lengths, depths, accuracy = _grid(run.passkey_grid)
        except (KeyError, TypeError, ValueError) as err:
            log.warning("no passkey heatmap for %s: passkey_grid is malformed (%s)", run.name, err)
            continue
        budget = "full" if run.budget is None else str(run.budget)
        path = _unique(out / f"passkey_{_slug(run.model, run.method, budget)}.png", taken)
        accuracy_heatmap(accuracy, lengths, depths, path, f"{run.model} · {run.method} · budget {budget}")
        plots.append(Plot(path, run.task, f"passkey accuracy, {run.model}, {run.method}, budget {budget} ({run.name})"))
    return plots


def accuracy_heatmap(accuracy: Sequence[Sequence[float]], lengths: Sequence[int], depths: Sequence[float], path: Path, title: str) -> Path:
    """Passkey accuracy by context length (down) and depth (across), 0 red to 1 green, cells annotated
    (NaN cells left blank); written to ``path``. The passkey task and the report both draw it."""
    figure = _figure()
    axes = figure.subplots()
    image = axes.imshow(accuracy, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for y, row in enumerate(accuracy):
        for x, value in enumerate(row):
            if _finite(value):
                axes.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize="small")
    axes.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    axes.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    axes.set(xlabel="passkey depth (0 = start, 1 = end)", ylabel="context length (tokens)", title=title)
    figure.colorbar(image, ax=axes, label="accuracy")
    figure.savefig(path)
    return path


def _grid(grid) -> tuple[list[int], list[float], list[list[float]]]:
    """``(context_lengths, depths, accuracy[length][depth])``, missing cells as NaN."""
    lengths, depths, accuracy = list(grid["context_lengths"]), list(grid["depths"]), list(grid["accuracy"])
    if not lengths or not depths or len(accuracy) != len(lengths) or any(len(row) != len(depths) for row in accuracy):
        raise ValueError(f"accuracy must be {len(lengths)} rows of {len(depths)} depths")
    return lengths, depths, [[float(v) if v is not None else math.nan for v in row] for row in accuracy]


def _figure() -> Figure:
    figure = Figure(figsize=(6.4, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path, task: str, caption: str) -> Plot:
    figure.savefig(path)
    return Plot(path, task, caption)


def _slug(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._+-]+", "-", p).strip("-") for p in parts)


def _unique(path: Path, taken: set[Path]) -> Path:
    """``path``, or ``<stem>_2.png`` and so on when an earlier plot of this report took the name."""
    candidate, n = path, 1
    while candidate in taken:
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    taken.add(candidate)
    return candidate


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
