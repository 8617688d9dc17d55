"""The PNGs of ``less-report``: a summary (headline metric against memory, every method at once), each
plotted metric against memory per method and setting, and passkey heatmaps.

Every figure of a report draws a method with the same colour, marker and short axis label
(:func:`method_styles`, assigned once per report); the full description stands in the legend beside
the axes. Axis limits always hold every reference line (full cache, plain policy) and every point or
bar with its error bar. Figures are drawn on matplotlib's Agg canvas without pyplot, so a report never
opens a window or touches pyplot's global figure list; each :class:`Plot` keeps its figure for reading back.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

from less_exp.results import Run

log = logging.getLogger(__name__)

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")  # method lines by setting
FULL = "full"
FULL_COLOUR = "black"
LEGEND_INSIDE = 8  # lines a figure keeps in one axes; more get a panel per policy
MARGIN = 0.08  # of the data's span, kept free above and below it
TICK_GAP = 2.0  # pixels between neighbouring tick labels
LOG_RANGE = 8.0  # memory spanning this ratio or more is drawn on a log axis; values 30 times that, too
Settings = tuple[tuple[str, str], ...]
Key = dict  # legend label -> handle, in drawing order


@dataclass(frozen=True)
class Plot:
    """A written PNG, the task whose section shows it, its caption and the figure it was drawn from."""

    path: Path
    task: str
    caption: str
    figure: Figure | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class MethodStyle:
    """How every figure of a report draws one method: its short axis ``label``, ``colour`` and ``marker``."""

    label: str
    colour: str | tuple[float, ...]
    marker: str


def method_styles(methods: Sequence[str]) -> dict[str, MethodStyle]:
    """A :class:`MethodStyle` per method label, assigned once per report so a method looks the same in
    every figure. Short labels: ``full``, the plain policy (``h2o``), ``Baseline+`` and ``state 1``,
    ``state 2``... in label order, prefixed by the policy when the report holds several policies."""
    ordered = sorted(set(methods), key=_method_order)
    several = len({_panel(m) for m in ordered if m != FULL}) > 1
    tab20 = matplotlib.colormaps["tab20"].colors
    colours = [*tab20[0::2], *tab20[1::2]]  # the ten strong colours first, then their light twins
    styles, states, k = {}, defaultdict(int), 0
    for method in ordered:
        if method == FULL:
            styles[method] = MethodStyle(FULL, FULL_COLOUR, "_")
            continue
        policy, kind = _panel(method), _kind(method)
        prefix = f"{policy} " if several else ""
        if kind == 0:
            label = policy
        elif kind == 1:
            label = prefix + "Baseline+"
        else:
            states[prefix] += 1
            label = prefix + f"state {states[prefix]}"
        styles[method] = MethodStyle(label, colours[k % len(colours)], MARKERS[k % len(MARKERS)])
        k += 1
    return styles


def _kind(method: str) -> int:
    """0 a plain policy, 1 Baseline+, 2 a state."""
    if method == _panel(method):
        return 0
    return 1 if method.endswith("(baseline+)") else 2


def _method_order(method: str) -> tuple:
    """Full cache first, then by policy: plain, Baseline+, states; numbers in labels by value (gate2 < gate10)."""
    natural = tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", method))
    return (method != FULL, _panel(method), _kind(method), natural)


def _panel(method: str) -> str:
    """The policy a method label starts with (``h2o+less_mlp[...]`` -> ``h2o``)."""
    return method.split("+")[0].split("(")[0]


@dataclass
class Series:
    """One method and setting's values at each memory size, and the paired standard errors the report
    computed for them (``<metric>_vs_plain_se``)."""

    method: str
    tag: Settings
    values: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    paired: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))

    def mean(self, memory: int) -> float:
        return mean(self.values[memory])

    def error(self, memory: int) -> float | None:
        """The spread of several runs (standard error of their mean), else the one run's paired standard error."""
        values = self.values[memory]
        if len(values) > 1:
            return stdev(values) / math.sqrt(len(values))
        return self.paired[memory][0] if self.paired[memory] else None

    def error_kind(self) -> set[str]:
        """Where :meth:`error` drew its bars from: ``seeds`` (several runs), ``paired`` (one run)."""
        return {("seeds" if len(v) > 1 else "paired") for m, v in self.values.items() if self.error(m) is not None}


@dataclass
class Measured:
    """A metric's :class:`Series` per (method, setting) and full-cache values per setting, in one figure."""

    series: dict[tuple[str, Settings], Series] = field(default_factory=dict)
    full: dict[Settings, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, run: Run, metric: str, tag: Settings) -> None:
        value = run.metrics.get(metric)
        if not _finite(value):
            return
        if run.policy == FULL:
            self.full[tag].append(value)
        elif run.memory is not None:
            series = self.series.setdefault((run.method, tag), Series(run.method, tag))
            series.values[run.memory].append(value)
            se = run.metrics.get(f"{metric}_vs_plain_se")
            if _finite(se):
                series.paired[run.memory].append(se)


def metric_plots(
    runs: Sequence[Run],
    out: Path,
    metrics_for: Callable[[str], Sequence[str]],
    settings: Callable[[Run], Settings] = lambda run: (),
    styles: Mapping[str, MethodStyle] | None = None,
    taken: set[Path] | None = None,
) -> list[Plot]:
    """One PNG per (model, task, metric): the mean metric against the cache's memory in tokens
    (budget + the state's token-equivalents, so methods compare at equal memory), a line per method
    and distinct ``settings`` (``(key, value)`` pairs that must agree for runs to be averaged).

    Settings that differ within a plot label its lines (``h2o (data.name=c4)``) and give them their own
    line style; a method keeps its colour and marker (``styles``, default :func:`method_styles` of
    ``runs``). When every line sits at a single memory size the figure is a bar chart with short method
    labels. Full-cache runs are dashed horizontal lines; a (model, task, metric) without any compressed
    run has no plot. Several policies, or many lines, get a panel per policy.
    """
    styles = styles or method_styles([r.method for r in runs])
    taken = set() if taken is None else taken
    plots = []
    for (model, task), group, split, tag in _groups(runs, settings):
        for metric in metrics_for(task):
            measured = _measure(group, metric, tag)
            if not measured.series:
                continue
            panels = sorted({_panel(method) for method, _ in measured.series})
            many = len(panels) > 1 or len(measured.series) > LEGEND_INSIDE
            figure = _figure()
            if many:
                figure.set_size_inches(max(6.4, 4.6 * len(panels)), 4.4)
            grid = figure.subplots(1, len(panels), squeeze=False)[0] if many else [figure.subplots()]
            tags = sorted({t for _, t in measured.series} | set(measured.full))
            key: Key = {}
            for axes, panel in zip(grid, panels if many else [None]):
                mine = {k: s for k, s in measured.series.items() if panel is None or _panel(k[0]) == panel}
                if all(len(s.values) == 1 for s in mine.values()):
                    _bars(axes, mine, measured.full, styles, tags, key)
                else:
                    _lines(axes, mine, measured.full, styles, tags, key)
                axes.set(ylabel=metric, title=f"{model} · {task} · {metric}" + (f" · {panel}" if panel else ""))
            _same_scale(grid)
            _legend(figure, key, _errors_note(measured.series.values()))
            caption = f"{metric} versus memory, {model}, {task}" + (f", apart by {', '.join(split)}" if split else "")
            plots.append(_save(figure, _unique(out / f"{_slug(model, task, metric)}.png", taken), task, caption))
    return plots


def summary_plots(
    runs: Sequence[Run],
    out: Path,
    headline_of: Callable[[str], str | None],
    settings: Callable[[Run], Settings] = lambda run: (),
    styles: Mapping[str, MethodStyle] | None = None,
    taken: set[Path] | None = None,
) -> list[Plot]:
    """One PNG per (model, task) with a headline metric (``headline_of(task)``): that metric against
    memory for every policy, Baseline+ and state at once (a point per memory size, joined per method),
    the full cache as a dashed horizontal line, so the quality-memory trade-off is one picture."""
    styles = styles or method_styles([r.method for r in runs])
    taken = set() if taken is None else taken
    plots = []
    for (model, task), group, split, tag in _groups(runs, settings):
        metric = headline_of(task)
        measured = _measure(group, metric, tag) if metric else Measured()
        if not measured.series:
            continue
        figure = _figure()
        axes = figure.subplots()
        tags = sorted({t for _, t in measured.series} | set(measured.full))
        key: Key = {}
        _lines(axes, measured.series, measured.full, styles, tags, key)
        axes.set(ylabel=metric, title=f"{model} · {task} · {metric} against memory")
        _legend(figure, key, _errors_note(measured.series.values()))
        caption = f"summary: {metric} against memory for every method, {model}, {task}" + (
            f", apart by {', '.join(split)}" if split else "")
        plots.append(_save(figure, _unique(out / f"summary_{_slug(model, task)}.png", taken), task, caption))
    return plots


def _groups(runs: Sequence[Run], settings: Callable[[Run], Settings]):
    """``((model, task), runs, the setting keys that vary among them, run -> its varying settings)``."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.model, run.task].append(run)
    for key, group in sorted(groups.items()):
        split = _varying([settings(run) for run in group])
        tags = {id(run): tuple(kv for kv in settings(run) if kv[0] in split) for run in group}
        yield key, group, split, lambda run, tags=tags: tags[id(run)]


def _measure(group: Sequence[Run], metric: str, tag: Callable[[Run], Settings]) -> Measured:
    measured = Measured()
    for run in group:
        measured.add(run, metric, tag(run))
    return measured


def _varying(all_settings: Sequence[Settings]) -> list[str]:
    """The keys whose value is not the same in every one of ``all_settings``, in order of appearance."""
    keys = list(dict.fromkeys(key for pairs in all_settings for key, _ in pairs))
    return [key for key in keys if len({dict(pairs).get(key) for pairs in all_settings}) > 1]


def _label(method: str, settings: Settings) -> str:
    return f"{method} ({', '.join(f'{k}={v}' for k, v in settings)})" if settings else method


def _ordered(series: Mapping[tuple[str, Settings], Series]) -> list[Series]:
    return [series[key] for key in sorted(series, key=lambda key: (_method_order(key[0]), key[1]))]


def _lines(axes, series, full, styles, tags, key: Key) -> None:
    """A line per series against memory with its error bars, the full cache as dashed lines; limits that
    hold them all; a log axis for memory (and values) spanning a wide range. Legend entries go to ``key``."""
    spans, memories = [], []
    for s in _ordered(series):
        style = styles[s.method]
        sizes = sorted(s.values)
        memories += sizes
        label = _label(s.method, s.tag)
        (key[_described(style, s.method, label)],) = axes.plot(
            sizes, [s.mean(m) for m in sizes], label=label, color=style.colour, marker=style.marker,
            linestyle=LINESTYLES[tags.index(s.tag) % len(LINESTYLES)])
        spans += _errorbars(axes, [(m, s.mean(m), s.error(m)) for m in sizes], style.colour)
    references = _full_lines(axes, full, tags, key)
    axes.set(xlabel="memory (tokens: budget + state token-equivalents)")
    axes.margins(x=0.08)
    if min(memories) > 0 and max(memories) / min(memories) >= LOG_RANGE:
        axes.set_xscale("log", base=2)
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_formatter(NullFormatter())
    else:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    _fit_limits(axes, spans, references, log_ok=True)


def _bars(axes, series, full, styles, tags, key: Key) -> None:
    """A bar per series (each at one memory size) under its short label and memory, with its error bar;
    the plain policy's value dotted across, the full cache dashed. ``key`` gets ``short: description``."""
    ordered = _ordered(series)
    spans = []
    values = [s.mean(next(iter(s.values))) for s in ordered]
    axes.bar(range(len(ordered)), values, color=[styles[s.method].colour for s in ordered],
             label=[_label(s.method, s.tag) for s in ordered])
    for i, s in enumerate(ordered):
        memory = next(iter(s.values))
        label = _label(s.method, s.tag)
        key.setdefault(_described(styles[s.method], s.method, label), Patch(color=styles[s.method].colour))
        spans += _errorbars(axes, [(i, values[i], s.error(memory))], "black")
        if _kind(s.method) == 0 and len(ordered) > 1:
            axes.axhline(values[i], linestyle=":", linewidth=1, color=styles[s.method].colour, label="_plain")
    ticks = [styles[s.method].label + "".join(f"\n{v}" for _, v in s.tag) + f"\n{next(iter(s.values))} tokens" for s in ordered]
    axes.set_xticks(range(len(ordered)), ticks, fontsize="small")
    axes.set_xlim(-0.6, len(ordered) - 0.4)
    references = _full_lines(axes, full, tags, key)
    axes.grid(alpha=0.3, axis="y")
    _fit_limits(axes, [(0.0, 0.0), *spans, *((v, v) for v in values)], references)


def _described(style: MethodStyle, method: str, label: str) -> str:
    """A legend entry: ``label`` (method and settings), after the method's short axis label when that differs."""
    return label if style.label == method else f"{style.label}: {label}"


def _errorbars(axes, points: Sequence[tuple[float, float, float | None]], colour) -> list[tuple[float, float]]:
    """Error bars at the points that have a standard error (none elsewhere); ``(low, high)`` of every point."""
    shown = [(x, y, e) for x, y, e in points if e is not None]
    if shown:
        xs, ys, es = zip(*shown)
        axes.errorbar(xs, ys, yerr=es, fmt="none", ecolor=colour, capsize=4, elinewidth=1.2, label="_error")
    return [(y - (e or 0.0), y + (e or 0.0)) for _, y, e in points]


def _full_lines(axes, full: Mapping[Settings, list[float]], tags, key: Key) -> list[float]:
    """A dashed horizontal line per setting at the full cache's mean value; the values drawn."""
    drawn = []
    for tag in sorted(full):
        value = mean(full[tag])
        style = (0, (6, 2 + 2 * tags.index(tag))) if tag in tags else "--"
        key[_label(FULL, tag)] = axes.axhline(value, linestyle=style, color=FULL_COLOUR, linewidth=1.4, label=_label(FULL, tag))
        drawn.append(value)
    return drawn


def _same_scale(panels) -> None:
    """Give panels of one scale the y limits that hold all of them, so their heights compare."""
    if len(panels) > 1 and len({axes.get_yscale() for axes in panels}) == 1:
        limits = [axes.get_ylim() for axes in panels]
        for axes in panels:
            axes.set_ylim(min(low for low, _ in limits), max(high for _, high in limits))


def _fit_limits(axes, spans: Sequence[tuple[float, float]], references: Sequence[float], log_ok: bool = False) -> None:
    """y limits holding every ``(low, high)`` span and reference line with a margin; a log axis where
    ``log_ok`` and positive values span :data:`LOG_RANGE` squared or more."""
    values = [v for span in spans for v in span] + list(references)
    low, high = min(values), max(values)
    if log_ok and low > 0 and high / low >= LOG_RANGE**2:
        axes.set_yscale("log")
        pad = (high / low) ** MARGIN
        axes.set_ylim(low / pad, high * pad)
        return
    pad = (high - low) * MARGIN or abs(high) * MARGIN or 1.0
    axes.set_ylim(low if low == 0 and all(v >= 0 for v in values) else low - pad, high + pad)


def _errors_note(series) -> str | None:
    kinds = set().union(*(s.error_kind() for s in series))
    notes = {"paired": "paired standard error of the difference from the plain policy",
             "seeds": "standard error of the mean over repeated runs (seeds)"}
    return "error bars: " + "; ".join(notes[k] for k in sorted(kinds)) if kinds else None


def _legend(figure: Figure, key: Key, title: str | None = None) -> None:
    """One legend below the axes holding ``key`` (each method's full description, with the short axis
    label where a bar chart uses one, and the full cache) titled with what the error bars are; then the
    tick labels spaced (:func:`_fit_ticks`)."""
    if key:
        width = max(len(label) for label in key)
        columns = 1 if width > 45 else 2 if width > 22 else 3
        rows = math.ceil(len(key) / columns)
        figure.set_size_inches(figure.get_figwidth(), figure.get_figheight() + 0.22 * rows + (0.2 if title else 0))
        figure.legend(list(key.values()), list(key), loc="outside lower center", ncols=columns, fontsize="small",
                      title=title, title_fontsize="small", frameon=False)
    _fit_ticks(figure)


def _fit_ticks(figure: Figure, tries: int = 6) -> None:
    """Widen ``figure`` until no two x tick labels of an axes come closer than :data:`TICK_GAP` pixels."""
    for _ in range(tries):
        figure.canvas.draw()
        if not any(_crowded(axes) for axes in figure.axes):
            return
        figure.set_size_inches(figure.get_figwidth() * 1.25, figure.get_figheight())


def _crowded(axes) -> bool:
    """Whether two visible x tick labels of ``axes`` (as last drawn) overlap or nearly touch."""
    boxes = [t.get_window_extent().padded(TICK_GAP / 2) for t in axes.get_xticklabels() if t.get_visible() and t.get_text()]
    return any(box.overlaps(other) for i, box in enumerate(boxes) for other in boxes[i + 1:])


def passkey_heatmaps(runs: Sequence[Run], out: Path, styles: Mapping[str, MethodStyle] | None = None,
                     taken: set[Path] | None = None) -> list[Plot]:
    """One :func:`accuracy_heatmap` per run with a ``passkey_grid``, and per (model, task, memory) that
    two or more compressed methods share, their heatmaps side by side (the full cache's first)."""
    styles = styles or method_styles([r.method for r in runs])
    taken = set() if taken is None else taken
    plots, grids = [], []
    for run in runs:
        if run.passkey_grid is None:
            continue
        try:
            lengths, depths, accuracy = _grid(run.passkey_grid)
        except (KeyError, TypeError, ValueError) as err:
            log.warning("no passkey heatmap for %s: passkey_grid is malformed (%s)", run.name, err)
            continue
        grids.append((run, lengths, depths, accuracy))
        budget = "full" if run.budget is None else str(run.budget)
        path = _unique(out / f"passkey_{_slug(run.model, run.method, budget)}.png", taken)
        figure = _accuracy_figure(accuracy, lengths, depths, f"{run.model} · {run.method} · budget {budget}")
        caption = f"passkey accuracy, {run.model}, {run.method}, budget {budget} ({run.name})"
        plots.append(_save(figure, path, run.task, caption))
    return plots + _equal_memory_heatmaps(grids, out, styles, taken)


def _equal_memory_heatmaps(grids, out: Path, styles, taken: set[Path]) -> list[Plot]:
    by_memory = defaultdict(list)
    for entry in grids:
        run = entry[0]
        if run.memory is not None:
            by_memory[run.model, run.task, run.memory].append(entry)
    plots = []
    for (model, task, memory), entries in sorted(by_memory.items()):
        if len({e[0].method for e in entries}) < 2:
            continue
        full = [e for e in grids if e[0].policy == FULL and (e[0].model, e[0].task) == (model, task)][:1]
        panels = full + sorted(entries, key=lambda e: (_method_order(e[0].method), e[0].name))
        figure = _figure()
        figure.set_size_inches(3.4 * len(panels) + 1.0, 3.8)
        grid = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
        for axes, (run, lengths, depths, accuracy) in zip(grid, panels):
            image = _heatmap(axes, accuracy, lengths, depths)
            axes.set_title(styles[run.method].label, color=styles[run.method].colour if run.policy != FULL else FULL_COLOUR)
            axes.set(ylabel="context length (tokens)" if axes is grid[0] else "")
        figure.colorbar(image, ax=list(grid), label="accuracy")
        figure.suptitle(f"{model} · {task} · passkey accuracy at memory {memory} tokens")
        figure.legend([Patch(color=styles[e[0].method].colour) for e in panels],
                      [_described(styles[e[0].method], e[0].method, e[0].method) for e in panels],
                      loc="outside lower center", ncols=1, fontsize="small", frameon=False)
        figure.set_size_inches(figure.get_figwidth(), figure.get_figheight() + 0.22 * len(panels))
        _fit_ticks(figure)
        caption = f"passkey accuracy side by side at memory {memory} tokens, {model}, {task}"
        plots.append(_save(figure, _unique(out / f"passkey_{_slug(model, task)}_memory{memory}.png", taken), task, caption))
    return plots


def accuracy_heatmap(accuracy: Sequence[Sequence[float]], lengths: Sequence[int], depths: Sequence[float], path: Path, title: str) -> Path:
    """Passkey accuracy by context length (down) and depth (across), 0 red to 1 green, cells annotated
    (NaN cells left blank); written to ``path``. The passkey task and the report both draw it."""
    _accuracy_figure(accuracy, lengths, depths, title).savefig(path)
    return path


def _accuracy_figure(accuracy, lengths, depths, title: str) -> Figure:
    figure = _figure()
    axes = figure.subplots()
    image = _heatmap(axes, accuracy, lengths, depths)
    axes.set(ylabel="context length (tokens)", title=title)
    figure.colorbar(image, ax=axes, label="accuracy")
    return figure


def _heatmap(axes, accuracy, lengths, depths):
    image = axes.imshow(accuracy, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for y, row in enumerate(accuracy):
        for x, value in enumerate(row):
            if _finite(value):
                axes.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize="small")
    axes.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    axes.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    axes.set(xlabel="passkey depth (0 = start, 1 = end)")
    return image


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
    return Plot(path, task, caption, figure)


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
