"""How ``less-report`` shows a task's or a training mode's runs, declared beside its code.

Each task module (``less_exp/tasks/<task>.py``) and training mode (``less_exp/training/<mode>.py``)
sets ``REPORT = ReportSpec(...)``; the report reads it through the registries, so a new task or mode
brings its columns, headline metric and label with it and the report keeps no list of names.
This module imports nothing of the platform, so any task can import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PairedRows:
    """Per-sample rows a task writes beside its ``results.json`` (``file``, one JSON object a line with
    an ``index``), the ``metrics`` compared sample by sample with the plain policy's run, and the
    run-level metric a plain run must report to be that reference (``reference``)."""

    file: str
    metrics: tuple[str, ...]
    reference: str


@dataclass(frozen=True)
class ReportSpec:
    """A task's or training mode's place in the report.

    ``columns``: its table's metric columns as fnmatch patterns, in order (``None``: every numeric
    metric). ``headline``: the metric that says how well a method did, ``lower_is_better`` its
    direction. ``plots``: metrics drawn against memory. ``gap``: a metric of which ``gap_closed`` is
    added, the share of the plain policy's distance from the full cache that a method recovers.
    ``paired``: per-sample rows to pair with the plain policy's. Training modes only: ``labelled`` (method labels name the mode; false for the
    default mode), ``label_key`` (a ``training`` key shown with it, ``interpolate(0.5)``) and
    ``own_data`` (the mode trains on the job's ``data``; false when it trains on nothing).
    """

    columns: tuple[str, ...] | None = None
    headline: str | None = None
    lower_is_better: bool = True
    plots: tuple[str, ...] = ()
    gap: str | None = None
    paired: PairedRows | None = None
    labelled: bool = True
    label_key: str | None = None
    own_data: bool = True

    def direction(self) -> str:
        """``perplexity (lower is better)``, or ``""`` without a headline."""
        if self.headline is None:
            return ""
        return f"{self.headline} ({'lower' if self.lower_is_better else 'higher'} is better)"
