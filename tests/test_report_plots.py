"""less-report's figures read back: references inside the axes, error bars exactly where standard
errors exist, tick labels apart, one colour per method, and the summary of quality against memory."""

from __future__ import annotations

import json
import math

import pytest
from matplotlib.colors import to_rgba
from matplotlib.container import BarContainer, ErrorbarContainer

from less_exp import report, report_plots, results
from less_exp.results import write_results
from test_report import GRID, _config, _summary

STATE = "h2o+less_mlp[training=e2e,data=c4_answers](ckpt)"


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setattr(results, "versions", dict)


def _summarization_runs(root):
    """Full cache, plain h2o, Baseline+ and a trained state on 20 articles, each with its per-sample rows;
    the full cache scores far above the rest, which differ by 0.001 (Baseline+) and 0.005 (the state)."""
    (root / "ckpt").mkdir(parents=True)
    (root / "ckpt" / "manifest.json").write_text(json.dumps(
        {"feature_map": {"name": "less_mlp"}, "training": {"mode": "e2e", "data": "c4_answers"}}))
    plain = [0.12 + 0.1 * ((7 * i) % 11) / 10 for i in range(20)]
    methods = {  # folder: (policy, feature map, baseline+, checkpoint, budget, state, per-sample rouge1)
        "full": ("full", "none", False, None, None, 0.0, [v + 0.05 for v in plain]),
        "plain": ("h2o", "none", False, None, 32, 0.0, plain),
        "plus": ("h2o", "none", True, None, 36, 0.0, [v + (0.003 if i % 2 else -0.001) for i, v in enumerate(plain)]),
        "state": ("h2o", "none", False, "ckpt", 32, 4.25, [v + 0.005 + 0.004 * (-1) ** i for i, v in enumerate(plain)]),
    }
    for name, (policy, fm, plus, ckpt, budget, state, rouge1) in methods.items():
        config = {**_config("xsum", policy, fm, checkpoint=ckpt, baseline_plus=plus), "seed": 0, "paths": {"root_dir": str(root)}}
        rows = [{"index": i, "rouge1": v, "rougeL": v * 0.8, "repeated_3gram_share": 0.02} for i, v in enumerate(rouge1)]
        metrics = {k: sum(r[k] for r in rows) / len(rows) for k in ("rouge1", "rougeL", "repeated_3gram_share")}
        metrics["rouge2"] = metrics["rouge1"] / 3
        write_results(root / "runs" / name, "eval", {**metrics, **_summary(policy, budget, state)}, config, 1.0)
        (root / "runs" / name / "summaries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "runs"


def _perplexity_sweep(root):
    """Full cache, h2o and sink at four budgets and an h2o state beside each h2o budget."""
    write_results(root / "full", "eval", {"perplexity": 300.0, **_summary("full")}, _config("perplexity"), 1.0)
    for budget in (32, 64, 128, 256):
        for policy, scale in (("h2o", 4000.0), ("sink", 8000.0)):
            metrics = {"perplexity": 300.0 + scale / budget, **_summary(policy, budget)}
            write_results(root / f"{policy}_{budget}", "eval", metrics, _config("perplexity", policy), 1.0)
        metrics = {"perplexity": 300.0 + 2500.0 / budget, **_summary("h2o", budget, 4.25)}
        config = _config("perplexity", "h2o", "less_mlp", checkpoint="ckpt/h2o")
        write_results(root / f"state_{budget}", "eval", metrics, config, 1.0)
    return root


def _drawn(figure):
    """Per axes: its y limits, reference lines ``{label: y}``, bars ``{label: (x, top, colour)}``, lines
    ``{label: (xs, ys, colour)}`` and error bars ``[(x, low, high)]``."""
    found = []
    for axes in figure.axes:
        if not axes.get_xlabel() and not axes.containers and not axes.get_lines():
            continue  # a colour bar
        refs, lines, bars, errors = {}, {}, {}, []
        for line in axes.get_lines():
            label, ys = line.get_label(), [float(y) for y in line.get_ydata()]
            if label.startswith("_"):
                continue
            if list(line.get_xdata()) == [0, 1] and line.get_transform() is axes.get_yaxis_transform():
                refs[label] = ys[0]
            else:
                lines[label] = ([float(x) for x in line.get_xdata()], ys, to_rgba(line.get_color()))
        for container in axes.containers:
            if isinstance(container, BarContainer):
                for patch in container.patches:
                    bars[patch.get_label()] = (patch.get_x() + patch.get_width() / 2, patch.get_height(), patch.get_facecolor())
            elif isinstance(container, ErrorbarContainer):
                for (x, low), (_, high) in container.lines[2][0].get_segments():
                    errors.append((float(x), float(low), float(high)))
        found.append({"axes": axes, "ylim": axes.get_ylim(), "refs": refs, "lines": lines, "bars": bars, "errors": errors})
    return found


def _assert_readable(figure):
    """Every reference and every bar or point with its error bar inside the y limits; no two x tick
    labels overlapping at the default size."""
    figure.canvas.draw()
    for panel in _drawn(figure):
        low, high = panel["ylim"]
        shown = [*panel["refs"].values(), *(top for _, top, _ in panel["bars"].values())]
        shown += [y for _, ys, _ in panel["lines"].values() for y in ys] + [v for _, *span in panel["errors"] for v in span]
        assert shown and all(low < v < high or (v == 0 and low == 0) for v in shown), (panel["axes"].get_title(), panel["ylim"], shown)
        boxes = [t.get_window_extent() for t in panel["axes"].get_xticklabels() if t.get_visible() and t.get_text()]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), panel["axes"].get_title()


def _colours(figures) -> dict[str, set]:
    colours: dict[str, set] = {}
    for figure in figures:
        for panel in _drawn(figure):
            for label, (*_, colour) in {**panel["bars"], **panel["lines"]}.items():
                colours.setdefault(label, set()).add(tuple(round(c, 4) for c in colour))
    return colours


def test_summarization_comparison_shows_references_errors_and_short_labels(tmp_path, quiet):
    rep = report.make_report([_summarization_runs(tmp_path)])
    by_method = {run.method: run for run in rep.runs}
    assert sorted(by_method) == sorted(["full", "h2o", "h2o(baseline+)", STATE])
    figures = {image.path.name: image.figure for image in rep.images}
    assert sorted(figures) == ["summary_tiny_llama_xsum.png"] + [f"tiny_llama_xsum_{m}.png" for m in ("rouge1", "rouge2", "rougeL")]

    for name, figure in figures.items():
        _assert_readable(figure)
    for metric in ("rouge1", "rouge2", "rougeL"):
        (panel,) = _drawn(figures[f"tiny_llama_xsum_{metric}.png"])
        assert panel["refs"] == {"full": pytest.approx(by_method["full"].metrics[metric])}
        assert panel["ylim"][1] > by_method["full"].metrics[metric] > max(top for _, top, _ in panel["bars"].values())
        ticks = [t.get_text().split("\n")[0] for t in panel["axes"].get_xticklabels()]
        assert ticks == ["h2o", "Baseline+", "state 1"]
        # error bars exactly at the bars whose run has a paired standard error, as long as it
        expected = {panel["bars"][m][0]: m for m, run in by_method.items() if f"{metric}_vs_plain_se" in run.metrics}
        errors = {x: (low, high) for x, low, high in panel["errors"]}
        assert len(errors) == len(panel["errors"]) and set(errors) == set(expected) and (len(expected) == 2) == (metric != "rouge2")
        for x, method in expected.items():
            low, high = errors[x]
            assert (high - low) / 2 == pytest.approx(by_method[method].metrics[f"{metric}_vs_plain_se"])
            assert (low + high) / 2 == pytest.approx(by_method[method].metrics[metric])
        legend = [t.get_text() for t in figures[f"tiny_llama_xsum_{metric}.png"].legends[0].get_texts()]
        assert f"state 1: {STATE}" in legend and "Baseline+: h2o(baseline+)" in legend and "full" in legend

    colours = _colours(figures.values())
    assert all(len(c) == 1 for c in colours.values()) and len(set().union(*colours.values())) == len(colours)
    (summary,) = _drawn(figures["summary_tiny_llama_xsum.png"])
    assert sum(len(xs) for xs, _, _ in summary["lines"].values()) == 3  # one point per compressed run
    assert summary["lines"][STATE][:2] == ([36.0], [pytest.approx(by_method[STATE].metrics["rouge1"])])
    assert summary["refs"] == {"full": pytest.approx(by_method["full"].metrics["rouge1"])}
    assert len(summary["errors"]) == 2 and "paired standard error" in figures["summary_tiny_llama_xsum.png"].legends[0].get_title().get_text()


def test_perplexity_sweep_against_memory(tmp_path, quiet):
    rep = report.make_report([_perplexity_sweep(tmp_path)])
    figures = {image.path.name: image.figure for image in rep.images}
    assert sorted(figures) == ["summary_tiny_llama_perplexity.png", "tiny_llama_perplexity_perplexity.png"]
    for figure in figures.values():
        _assert_readable(figure)
        assert all(not panel["errors"] for panel in _drawn(figure))  # one run each, no paired rows: no error bars
    (summary,) = _drawn(figures["summary_tiny_llama_perplexity.png"])
    assert summary["refs"] == {"full": 300.0}
    assert sum(len(xs) for xs, _, _ in summary["lines"].values()) == len(rep.runs) - 1
    assert summary["lines"]["h2o+less_mlp(ckpt)"][0] == [36.0, 68.0, 132.0, 260.0]
    assert summary["lines"]["sink"][1] == [300.0 + 8000.0 / b for b in (32, 64, 128, 256)]
    h2o, sink = _drawn(figures["tiny_llama_perplexity_perplexity.png"])  # a panel per policy
    assert set(h2o["lines"]) == {"h2o", "h2o+less_mlp(ckpt)"} and set(sink["lines"]) == {"sink"}
    assert h2o["refs"] == sink["refs"] == {"full": 300.0}
    colours = _colours(figures.values())
    assert all(len(c) == 1 for c in colours.values()) and len(set().union(*colours.values())) == 3


def test_seeds_give_error_bars_from_their_spread(tmp_path, quiet):
    for seed in (0, 1, 2):
        for policy, budget in (("full", None), ("h2o", 32), ("h2o", 64)):
            value = 300.0 + (0 if budget is None else 3200.0 / budget) + 2 * seed
            config = {**_config("perplexity", policy), "seed": seed}
            write_results(tmp_path / f"{policy}_{budget}_{seed}", "eval", {"perplexity": value, **_summary(policy, budget)}, config, 1.0)
    rep = report.make_report([tmp_path], average_seeds=True)
    (summary,) = _drawn(rep.images[0].figure)
    assert rep.images[0].path.name.startswith("summary_") and summary["refs"] == {"full": 302.0}
    se = 2.0 / math.sqrt(3)  # values 2 apart: standard deviation 2 over three seeds
    assert {x: (low, high) for x, low, high in summary["errors"]} == {32.0: pytest.approx((402.0 - se, 402.0 + se)), 64.0: pytest.approx((352.0 - se, 352.0 + se))}
    assert "over repeated runs (seeds)" in rep.images[0].figure.legends[0].get_title().get_text()
    _assert_readable(rep.images[0].figure)


def test_method_styles_are_short_and_shared():
    one = report_plots.method_styles(["full", STATE, "h2o", "h2o(baseline+)", "h2o+elu1(ckpt)"])
    assert {m: s.label for m, s in one.items()} == {
        "full": "full", "h2o": "h2o", "h2o(baseline+)": "Baseline+", "h2o+elu1(ckpt)": "state 1", STATE: "state 2"}
    two = report_plots.method_styles(["sink+less_mlp(ckpt)", "h2o", "sink", "sink(baseline+)", "full"])
    assert [two[m].label for m in ("h2o", "sink", "sink(baseline+)", "sink+less_mlp(ckpt)")] == [
        "h2o", "sink", "sink Baseline+", "sink state 1"]
    assert len({s.colour for s in two.values()}) == len(two)
    numbered = report_plots.method_styles(["sink+elu1[gating=g10]", "sink+elu1[gating=g2]"])
    assert numbered["sink+elu1[gating=g2]"].label == "state 1" and numbered["sink+elu1[gating=g10]"].label == "state 2"


def test_many_bars_widen_the_figure_until_labels_part(tmp_path, quiet):
    write_results(tmp_path / "full", "eval", {"rouge1": 0.3, **_summary("full")}, _config("xsum"), 1.0)
    for i in range(14):
        config = _config("xsum", "h2o", "less_mlp", checkpoint=f"ckpt/state_{i}")
        config["gating"] = {"name": f"gate{i}"}
        write_results(tmp_path / f"s{i}", "eval", {"rouge1": 0.1 + 0.01 * i, **_summary("h2o", 32, 4.0)}, config, 1.0)
    rep = report.make_report([tmp_path], metrics=["rouge1"])
    (plot,) = [image for image in rep.images if image.path.name == "tiny_llama_xsum_rouge1.png"]
    assert plot.figure.get_figwidth() > 6.4 * 1.2
    _assert_readable(plot.figure)


def test_passkey_heatmaps_side_by_side_at_equal_memory(tmp_path, quiet):
    other = {**GRID, "accuracy": [[0.0, 1.0, 1.0], [0.5, 0.5, math.nan]]}
    runs = {"full": ("full", "none", False, None, None, 0.0, GRID), "plus": ("h2o", "none", True, None, 36, 0.0, GRID),
            "state": ("h2o", "less_mlp", False, "ckpt/h2o", 32, 4.0, other), "plain": ("h2o", "none", False, None, 32, 0.0, GRID)}
    for name, (policy, fm, plus, ckpt, budget, state, grid) in runs.items():
        config = _config("passkey", policy, fm, checkpoint=ckpt, baseline_plus=plus)
        write_results(tmp_path / name, "eval", {"accuracy": 0.5, "passkey_grid": grid, **_summary(policy, budget, state)}, config, 1.0)
    rep = report.make_report([tmp_path])
    (side,) = [image for image in rep.images if image.path.name == "passkey_tiny_llama_passkey_memory36.png"]
    assert side.path in rep.heatmaps and len(rep.heatmaps) == 5
    panels = [axes for axes in side.figure.axes if axes.images]
    assert [axes.get_title() for axes in panels] == ["full", "Baseline+", "state 1"]
    shown = panels[2].images[0].get_array()
    assert shown[0].tolist() == [0.0, 1.0, 1.0] and shown.mask[1][2]
