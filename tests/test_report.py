"""less-report: a fake multirun folder in, the markdown tables, PNGs and W&B run out."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import pytest
from matplotlib.image import imread
from omegaconf import OmegaConf

from less_exp import paths, report, results
from less_exp.results import write_results
from wandb_records import read_run

GRID = {"context_lengths": [256, 512], "depths": [0.0, 0.5, 1.0], "accuracy": [[1.0, 1.0, 0.5], [1.0, 0.0, 0.5]]}
PPL_COLUMNS = ["model", "method", "budget", "state (token-eq.)", "memory (tokens)", "perplexity", "gap_closed", "nll",
               "num_tokens", "run"]


def _config(task, policy="full", feature_map="none", checkpoint=None, baseline_plus=False, model="tiny_llama"):
    return {
        "model": {"name": model},
        "policy": {"name": policy, "sink": 0, "heavy": 16, "recent": 16, "baseline_plus": baseline_plus},
        "feature_map": {"name": feature_map},
        "gating": {"name": "none"},
        "reweighting": {"name": "none"},
        "normalizer": {"name": "joint"},
        "task": {"name": task, "module": _task_module(task)} if task else None,
        "checkpoint": checkpoint,
    }


def _task_module(task: str) -> str:
    """The task module conf/task/<task>.yaml names (``module``, else its name), as a composed config has it."""
    yaml = Path(paths.conf_dir()) / "task" / f"{task}.yaml"
    return OmegaConf.load(yaml).get("module") or task if yaml.is_file() else task


def _summary(policy, budget=None, state=0.0):
    return {"policy": policy, "budget": budget, "state_token_equivalents": state}


# (run folder, job, metrics, config)
RUNS = [
    ("0_policy=full", "eval", {"perplexity": 300.0, "nll": 5.7, "num_tokens": 508, **_summary("full")}, _config("perplexity")),
    ("1_policy=h2o,b=32", "eval", {"perplexity": 340.5, "nll": 5.83, "num_tokens": 508, **_summary("h2o", 32)}, _config("perplexity", "h2o")),
    ("2_policy=h2o,b=64", "eval", {"perplexity": 320.25, "nll": 5.77, "num_tokens": 508, **_summary("h2o", 64)}, _config("perplexity", "h2o")),
    (
        "3_policy=h2o,feature_map=less_mlp",
        "eval",
        {"perplexity": 330.0, "nll": 5.8, "num_tokens": 508, "per_task": {"a": 1}, **_summary("h2o", 32, 4.25)},
        _config("perplexity", "h2o", "less_mlp", checkpoint="ckpt/h2o"),
    ),
    ("4_policy=sink", "eval", {"perplexity": 350.0, "nll": 5.86, "num_tokens": 508, **_summary("sink", 32)}, _config("perplexity", "sink")),
    ("5_policy=h2o,seed=1", "eval", {"perplexity": 341.5, "nll": 5.83, "num_tokens": 508, **_summary("h2o", 32)}, _config("perplexity", "h2o")),
    ("6_task=passkey", "eval", {"accuracy": 0.9, "passkey_grid": GRID, **_summary("full")}, _config("passkey")),
    ("7_task=passkey,policy=h2o", "eval", {"accuracy": 0.6, "accuracy@256": 0.83, "passkey_grid": GRID, **_summary("h2o", 32)}, _config("passkey", "h2o")),
    (
        "8_task=passkey,policy=h2o,baseline_plus",
        "eval",
        {"accuracy": 0.7, "passkey_grid": GRID, **_summary("h2o", 36)},
        _config("passkey", "h2o", "less_mlp", baseline_plus=True),
    ),
    (
        "9_train",
        "train",
        {"mean_val_mse": 0.2, "layers_done": 2, "num_layers": 2, "state_token_equivalents": 4.25},
        {**_config(None, "sink", "less_mlp", "ckpt/sink"), "training": {"mode": "layerwise"}},  # its columns are the mode's
    ),
]


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """A multirun folder as ``less-eval -m`` leaves it, plus a corrupt and a foreign results.json."""
    monkeypatch.setattr(results, "versions", dict)
    root = tmp_path / "multirun" / "eval" / "2026-01-01_00-00-00"
    for name, job, metrics, config in RUNS:
        write_results(root / name, job, metrics, config, 1.0)
    (root / "10_broken").mkdir()
    (root / "10_broken" / "results.json").write_text('{"job": "eval", "metr')
    (root / "11_other").mkdir()
    (root / "11_other" / "results.json").write_text("[1, 2]")
    return root


def _table(markdown: str, task: str) -> list[list[str]]:
    """The cells of the markdown table under ``## task``, header first, separator dropped."""
    section = markdown.split(f"\n## {task}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows if not row.startswith("| ---")]


def test_report_tables_plots_and_heatmaps(sweep, caplog):
    with caplog.at_level(logging.WARNING, logger="less_exp.report"):
        rep = report.make_report([sweep])
    assert sum("skipping" in r.message for r in caplog.records) == 2
    assert rep.out_dir == sweep / "report" and len(rep.runs) == len(RUNS)
    assert rep.markdown == (sweep / "report" / "report.md").read_text()
    assert [t.task for t in rep.tables] == ["passkey", "perplexity", "train"]

    run = lambda name: f"2026-01-01_00-00-00/{name}"  # noqa: E731
    assert _table(rep.markdown, "perplexity") == [
        PPL_COLUMNS,
        ["tiny_llama", "full", "full", "0", "full", "300", "", "5.7", "508", run("0_policy=full")],
        ["tiny_llama", "h2o", "32", "0", "32", "340.5", "", "5.83", "508", run("1_policy=h2o,b=32")],
        ["tiny_llama", "h2o", "32", "0", "32", "341.5", "", "5.83", "508", run("5_policy=h2o,seed=1")],
        # gap closed: (plain h2o at budget 32 - 330) / (plain - full) = (340.5 - 330) / (340.5 - 300)
        ["tiny_llama", "h2o+less_mlp(ckpt)", "32", "4.25", "36", "330", "0.2593", "5.8", "508", run("3_policy=h2o,feature_map=less_mlp")],
        ["tiny_llama", "h2o", "64", "0", "64", "320.25", "", "5.77", "508", run("2_policy=h2o,b=64")],
        ["tiny_llama", "sink", "32", "0", "32", "350", "", "5.86", "508", run("4_policy=sink")],
    ]
    passkey = _table(rep.markdown, "passkey")
    assert passkey[0][-3:] == ["accuracy", "accuracy@256", "run"]
    assert [row[1:3] + row[-3:-1] for row in passkey[1:]] == [
        ["full", "full", "0.9", ""],
        ["h2o", "32", "0.6", "0.83"],
        ["h2o(baseline+)", "36", "0.7", ""],
    ]
    train = _table(rep.markdown, "train")
    assert train[0][5:] == ["layers_done", "num_layers", "mean_val_mse", "run"]
    assert train[1][:5] == ["tiny_llama", "sink+less_mlp", "32", "4.25", "36"]
    perplexity_table = rep.tables[1]
    assert perplexity_table.values[0][2:5] == [None, 0.0, None] and perplexity_table.values[3][2:5] == [32, 4.25, 36]

    assert sorted(p.name for p in rep.plots) == ["tiny_llama_passkey_accuracy.png", "tiny_llama_perplexity_perplexity.png"]
    assert sorted(p.name for p in rep.heatmaps) == [
        "passkey_tiny_llama_full_full.png",
        "passkey_tiny_llama_h2o-baseline+_36.png",
        "passkey_tiny_llama_h2o_32.png",
    ]
    for png in rep.plots + rep.heatmaps:
        image = imread(png)
        two_panels = png.name == "tiny_llama_perplexity_perplexity.png"  # h2o and sink: a panel each, legends below
        assert image.shape[1:] == ((920, 4) if two_panels else (640, 4)) and image.shape[0] >= 440 and image.std() > 0.01
        assert f"]({png.name})" in rep.markdown


def test_cli_writes_report_and_picks_metric(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(sweep / "1_policy=h2o,b=32"), str(sweep), "--out", str(out), "--metric", "nll"]) == 0
    printed = capsys.readouterr().out
    assert "| tiny_llama | h2o+less_mlp(ckpt) | 32 | 4.25 | 36 |" in printed
    assert printed.count("1_policy=h2o,b=32 |") == 1
    assert (out / "report.md").is_file()
    assert sorted(p.name for p in out.glob("*.png") if not p.name.startswith(("passkey_", "summary_"))) == ["tiny_llama_perplexity_nll.png"]
    # --metric replaces the plotted metrics; the summaries keep each task's headline
    assert sorted(p.name for p in out.glob("summary_*.png")) == [f"summary_tiny_llama_{t}.png" for t in ("passkey", "perplexity", "train")]


def test_single_run_folder_defaults_to_its_report_folder(sweep):
    rep = report.make_report([sweep / "4_policy=sink"])
    assert rep.out_dir == sweep / "4_policy=sink" / "report"
    assert [r.name for r in rep.runs] == ["4_policy=sink"] and len(rep.plots) == 1 and rep.heatmaps == []


def test_method_label_names_the_state(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "manifest.json").write_text(json.dumps({"feature_map": {"name": "elu1"}}))
    from_checkpoint = {**_config("perplexity", "sink", checkpoint="ckpt"), "paths": {"root_dir": str(tmp_path)}}
    assert report.method_label({**from_checkpoint, "training": {"mode": "e2e"}}, "sink") == "sink+elu1(ckpt)"
    assert report.method_label(from_checkpoint, "sink") == "sink+elu1(ckpt)"
    assert report.method_label(_config("perplexity", "sink", checkpoint="gone"), "sink") == "sink+state(ckpt)"
    odd = {**_config("perplexity", "h2o", "less_mlp"), "gating": {"name": "scalar"}}
    assert report.method_label(odd, "h2o") == "h2o+less_mlp[gating=scalar]"
    learned = {**_config("perplexity", "h2o", "less_mlp"), "gating": {"name": "decay", "learned": True}}
    assert report.method_label(learned, "h2o") == "h2o+less_mlp[gating=decay(learned)]"
    assert report.method_label(_config("perplexity", "h2o", "less_mlp", "ckpt/h2o"), "h2o", loads_checkpoint=False) == "h2o+less_mlp"
    (tmp_path / "gated").mkdir()  # a checkpoint's own gating and re-weighting name the run that loaded it
    (tmp_path / "gated" / "manifest.json").write_text(json.dumps({
        "feature_map": {"name": "less_mlp"}, "gating": {"name": "decay", "learned": True},
        "reweighting": {"name": "leapformer"}, "normalizer": {"name": "joint"}}))
    gated = {**_config("perplexity", "sink", checkpoint="gated"), "paths": {"root_dir": str(tmp_path)}}
    assert report.method_label(gated, "sink") == "sink+less_mlp[gating=decay(learned),reweighting=leapformer](ckpt)"
    (tmp_path / "progressive").mkdir()  # an output-trained checkpoint says how it was trained
    (tmp_path / "progressive" / "manifest.json").write_text(json.dumps({
        "feature_map": {"name": "less_mlp"}, "training": {"mode": "progressive", "init_from": "ckpt"}}))
    progressive = {**_config("perplexity", "sink", checkpoint="progressive"), "paths": {"root_dir": str(tmp_path)}}
    assert report.method_label(progressive, "sink") == "sink+less_mlp[training=progressive](ckpt)"
    e2e_job = {**_config("perplexity", "sink", "less_mlp", "ckpt/e2e"), "training": {"mode": "e2e"}}
    assert report.method_label(e2e_job, "sink", loads_checkpoint=False) == "sink+less_mlp[training=e2e]"
    (tmp_path / "answers").mkdir()  # ... and on what, when not the default WikiText-2
    (tmp_path / "answers" / "manifest.json").write_text(json.dumps({
        "feature_map": {"name": "less_mlp"}, "training": {"mode": "e2e", "data": "c4_answers"}}))
    answers = {**_config("perplexity", "sink", checkpoint="answers"), "paths": {"root_dir": str(tmp_path)}}
    assert report.method_label(answers, "sink") == "sink+less_mlp[training=e2e,data=c4_answers](ckpt)"
    mixture_job = {**e2e_job, "data": {"name": "c4_wikitext2"}}
    assert report.method_label(mixture_job, "sink", loads_checkpoint=False) == "sink+less_mlp[training=e2e,data=c4_wikitext2]"
    wikitext_job = {**e2e_job, "data": {"name": "wikitext2"}}
    assert report.method_label(wikitext_job, "sink", loads_checkpoint=False) == "sink+less_mlp[training=e2e]"
    (tmp_path / "mixed").mkdir()  # an interpolation names its alpha
    (tmp_path / "mixed" / "manifest.json").write_text(json.dumps({
        "feature_map": {"name": "less_mlp"}, "training": {"mode": "interpolate", "data": "c4_answers", "alpha": 0.25}}))
    mixed = {**_config("perplexity", "sink", checkpoint="mixed"), "paths": {"root_dir": str(tmp_path)}}
    assert report.method_label(mixed, "sink") == "sink+less_mlp[training=interpolate(0.25),data=c4_answers](ckpt)"
    mix_job = {**e2e_job, "training": {"mode": "interpolate", "alpha": 0.5}, "data": {"name": "xsum_articles"}}
    assert report.method_label(mix_job, "sink", loads_checkpoint=False) == "sink+less_mlp[training=interpolate(0.5)]"


def test_no_results_is_an_error_with_exit_code_2(tmp_path):
    (tmp_path / "empty" / "run").mkdir(parents=True)
    with pytest.raises(report.NoResultsError, match="no readable results.json"):
        report.make_report([tmp_path / "empty"])
    script = Path(sys.executable).with_name("less-report")
    for path in (tmp_path / "empty", tmp_path / "missing"):
        done = subprocess.run([str(script), str(path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "less-report: error:" in done.stderr, done.stderr


def test_wandb_run_holds_tables_and_images(sweep, monkeypatch):
    monkeypatch.delenv("WANDB_CACHE_DIR")
    write_results(sweep / "12_oom", "eval", {}, _config("perplexity", "h2o"), 1.0, status="failed", error="out of memory")
    rep = report.make_report([sweep], logger="wandb", project="less-report-test")
    assert rep.wandb_run_dir.parent == sweep / "report" / "wandb"
    run = read_run(rep.wandb_run_dir)
    assert run["config"]["runs"] == len(RUNS) and run["summary"]["runs"] == len(RUNS)
    assert run["summary"]["failed_runs"] == 1
    for task in ("passkey", "perplexity", "train", "failed_runs"):
        assert run["summary"][f"table/{task}/_type"] == "table-file"
    (table_file,) = rep.wandb_run_dir.glob("files/media/table/table/perplexity_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == PPL_COLUMNS and len(table["data"]) == 6
    assert table["data"][3][:5] == ["tiny_llama", "h2o+less_mlp(ckpt)", 32, 4.25, 36]
    for png in rep.summaries + rep.plots + rep.heatmaps:
        assert run["summary"][f"plot/{png.stem}/_type"] == "image-file"
    assert len(rep.summaries) == 3  # passkey, perplexity, train: the figures of the page are the ones logged
    assert len(list(rep.wandb_run_dir.glob("files/media/images/plot/*.png"))) == len(rep.summaries) + len(rep.plots) + len(rep.heatmaps)


def test_plots_place_methods_at_their_memory(tmp_path, monkeypatch):
    """x is budget + state token-equivalents; one size per method gives bars, several give lines."""
    from less_exp import report_plots

    monkeypatch.setattr(results, "versions", dict)
    runs = [("full", None, 0.0, 0.30), ("h2o", 32, 0.0, 0.20), ("h2o", 32, 4.25, 0.25)]
    for i, (policy, budget, state, score) in enumerate(runs):
        config = _config("xsum", policy, "less_mlp" if state else "none", checkpoint="ckpt/h2o" if state else None)
        write_results(tmp_path / "one" / str(i), "eval", {"rouge1": score, **_summary(policy, budget, state)}, config, 1.0)
    drawn = []
    bars = report_plots._bars
    monkeypatch.setattr(report_plots, "_bars", lambda axes, series, *rest: drawn.append(
        {m: dict(s.values) for (m, _), s in series.items()}) or bars(axes, series, *rest))
    rep = report.make_report([tmp_path / "one"], metrics=["rouge1"])
    assert [p.name for p in rep.plots] == ["tiny_llama_xsum_rouge1.png"]
    assert drawn == [{"h2o": {32: [0.2]}, "h2o+less_mlp(ckpt)": {36: [0.25]}}]
    write_results(tmp_path / "one" / "3", "eval", {"rouge1": 0.22, **_summary("h2o", 64)}, _config("xsum", "h2o"), 1.0)
    drawn.clear()
    assert report.make_report([tmp_path / "one"], metrics=["rouge1"]).plots and drawn == []


@pytest.fixture
def figures(monkeypatch):
    """Every matplotlib figure the report draws, to read its lines back."""
    from less_exp import report_plots

    drawn, make = [], report_plots._figure
    monkeypatch.setattr(report_plots, "_figure", lambda: drawn.append(make()) or drawn[-1])
    return drawn


def _lines(figures, title: str) -> dict[str, tuple[list[float], list[float]]]:
    """``{label: (x, y)}`` of the lines in the one figure titled ``title``, over its panels (titled
    ``title · <policy>`` when it has one per policy; full-cache lines span x 0..1; error bar caps left out)."""
    (figure,) = [f for f in figures if f.axes and f.axes[0].get_title().split(" · ")[:3] == title.split(" · ")]
    return {line.get_label(): (list(map(float, line.get_xdata())), list(map(float, line.get_ydata())))
            for axes in figure.axes for line in axes.get_lines() if not line.get_label().startswith("_")}


def _ppl_config(policy, data="wikitext2", seq_len=1024, seed=0, batch_size=1):
    config = _config("perplexity", policy)
    config["model"]["dtype"] = "float32"
    config["data"] = {"name": data}
    config["task"] = {"name": "perplexity", "split": "test", "seq_len": seq_len, "max_windows": 4, "batch_size": batch_size, "windows": "disjoint"}
    return {**config, "seed": seed}


def test_failed_and_non_finite_runs_are_listed_apart(sweep, figures, capsys):
    write_results(sweep / "12_oom", "eval", {}, _config("perplexity", "h2o"), 1.0, status="failed", error="CUDA out of memory")
    nan = float("nan")
    write_results(sweep / "13_nan", "eval", {"perplexity": nan, "nll": nan, **_summary("h2o", 128)}, _config("perplexity", "h2o"), 1.0)
    write_results(sweep / "14_inf", "eval", {"accuracy": float("inf"), "passkey_grid": GRID, **_summary("sink", 32)}, _config("passkey", "sink"), 1.0)
    old = {"job": "eval", "metrics": {"perplexity": 310.0, **_summary("h2o", 128)}, "config": _config("perplexity", "h2o")}
    (sweep / "15_before_status").mkdir()
    (sweep / "15_before_status" / "results.json").write_text(json.dumps(old))

    assert report.main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    figures.clear()
    rep = report.make_report([sweep])
    assert rep.markdown in printed and "failed runs: 3" in printed
    run = lambda name: f"2026-01-01_00-00-00/{name}"  # noqa: E731
    assert [(r.name, reason) for r, reason in rep.failed] == [
        (run("12_oom"), "CUDA out of memory"),
        (run("13_nan"), "non-finite perplexity"),
        (run("14_inf"), "non-finite accuracy"),
    ]
    assert _table(rep.markdown, "Failed runs") == [
        ["run", "task", "method", "reason"],
        [run("12_oom"), "perplexity", "h2o", "CUDA out of memory"],
        [run("13_nan"), "perplexity", "h2o", "non-finite perplexity"],
        [run("14_inf"), "passkey", "sink", "non-finite accuracy"],
    ]
    assert len(rep.runs) == len(RUNS) + 1 and run("15_before_status") in [r.name for r in rep.runs]
    shown = [row for table in rep.tables for row in table.values]
    assert not any(row[-1].endswith(("12_oom", "13_nan", "14_inf")) for row in shown)
    assert not any(f"{name} |" in rep.markdown.split("## Failed runs")[0] for name in ("12_oom", "13_nan", "14_inf"))

    h2o = _lines(figures, "tiny_llama · perplexity · perplexity")["h2o"]
    assert h2o == ([32.0, 64.0, 128.0], [341.0, 320.25, 310.0])
    (panels,) = [f.axes for f in figures if f.axes and f.axes[0].get_title().startswith("tiny_llama · perplexity · perplexity ·")]
    h2o_panel, sink_panel = panels  # a panel per policy, each with only its own runs and the full cache
    assert h2o_panel.get_title().endswith("· h2o") and sink_panel.get_title().endswith("· sink")
    assert {line.get_label().split("+")[0].split("(")[0] for line in h2o_panel.get_lines() if line.get_label()[0] != "_"} == {"h2o", "full"}
    assert [t.get_text().split("\n")[0] for t in sink_panel.get_xticklabels()] == ["sink"]  # one budget: a bar
    passkey = _lines(figures, "tiny_llama · passkey · accuracy")
    assert sorted(passkey) == ["full"] and len(rep.heatmaps) == 3


@pytest.mark.parametrize(("key", "other", "override"), [("data.name", "c4", {"data": "c4"}), ("task.seq_len", "512", {"seq_len": 512})])
def test_runs_on_other_data_or_windows_are_columns_and_lines(tmp_path, monkeypatch, figures, key, other, override):
    monkeypatch.setattr(results, "versions", dict)
    base = "wikitext2" if key == "data.name" else "1024"
    for setting, shift, kwargs in (("base", 0.0, {}), ("other", 100.0, override)):
        write_results(tmp_path / f"full_{setting}", "eval", {"perplexity": 10.0 + shift, **_summary("full")}, _ppl_config("full", **kwargs), 1.0)
        for budget, score in ((32, 30.0), (64, 20.0)):
            config = _ppl_config("h2o", **kwargs, batch_size=budget // 16)
            write_results(tmp_path / f"h2o_{budget}_{setting}", "eval", {"perplexity": score + shift, **_summary("h2o", budget)}, config, 1.0)
    rep = report.make_report([tmp_path])

    (table,) = rep.tables
    assert table.columns == [*PPL_COLUMNS[:5], key, "perplexity", "run"]
    first, second = sorted([other, base], key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else v))
    assert [(row[1], row[2], row[5], row[6]) for row in _table(rep.markdown, "perplexity")[1:]] == [
        ("full", "full", first, "10" if first == base else "110"),
        ("h2o", "32", first, "30" if first == base else "130"),
        ("h2o", "64", first, "20" if first == base else "120"),
        ("full", "full", second, "10" if second == base else "110"),
        ("h2o", "32", second, "30" if second == base else "130"),
        ("h2o", "64", second, "20" if second == base else "120"),
    ]
    lines = _lines(figures, "tiny_llama · perplexity · perplexity")
    assert lines[f"h2o ({key}={base})"] == ([32.0, 64.0], [30.0, 20.0])
    assert lines[f"h2o ({key}={other})"] == ([32.0, 64.0], [130.0, 120.0])
    assert lines[f"full ({key}={base})"][1] == [10.0, 10.0] and lines[f"full ({key}={other})"][1] == [110.0, 110.0]
    assert len(lines) == 4 and f"apart by {key}" in rep.markdown


def test_seeds_apart_unless_averaged(tmp_path, monkeypatch, figures):
    monkeypatch.setattr(results, "versions", dict)
    for seed in (0, 1):
        write_results(tmp_path / f"full_{seed}", "eval", {"perplexity": 10.0 + seed, **_summary("full")}, _ppl_config("full", seed=seed), 1.0)
        for budget in (32, 64):
            metrics = {"perplexity": 1000.0 / budget + 2 * seed, **_summary("h2o", budget)}
            write_results(tmp_path / f"h2o_{budget}_{seed}", "eval", metrics, _ppl_config("h2o", seed=seed), 1.0)
    title = "tiny_llama · perplexity · perplexity"

    rep = report.make_report([tmp_path])
    assert rep.tables[0].columns[5] == "seed" and [row[5] for row in rep.tables[0].values] == [0, 0, 0, 1, 1, 1]
    assert _lines(figures, title) == {
        "h2o (seed=0)": ([32.0, 64.0], [31.25, 15.625]),
        "h2o (seed=1)": ([32.0, 64.0], [33.25, 17.625]),
        "full (seed=0)": ([0.0, 1.0], [10.0, 10.0]),
        "full (seed=1)": ([0.0, 1.0], [11.0, 11.0]),
    }

    figures.clear()
    assert report.main([str(tmp_path), "--average-seeds", "--out", str(tmp_path / "averaged")]) == 0
    assert _lines(figures, title) == {"h2o": ([32.0, 64.0], [32.25, 16.625]), "full": ([0.0, 1.0], [10.5, 10.5])}
    assert "| seed |" in (tmp_path / "averaged" / "report.md").read_text()


def test_summaries_are_paired_with_the_plain_policy(tmp_path, monkeypatch):
    """Each state or Baseline+ run gets the mean and standard error of its per-sample differences from
    the plain run on the samples both scored; the plain and full runs get none."""
    monkeypatch.setattr(results, "versions", dict)
    plain_r1 = [0.10, 0.20, 0.30, 0.40, 0.50]
    less_r1 = [0.15, 0.20, 0.40, 0.40, 0.45, 0.90]  # one sample the plain run lacks
    runs = [("plain", "none", False, 32, plain_r1), ("less", "less_mlp", False, 32, less_r1),
            ("plus", "less_mlp", True, 36, plain_r1[:3]), ("full", "none", False, None, plain_r1)]
    for name, fm, plus, budget, values in runs:
        policy = "full" if name == "full" else "h2o"
        folder = tmp_path / name
        write_results(folder, "eval", {"rouge1": sum(values) / len(values), **_summary(policy, budget)},
                      {**_config("xsum", policy, fm, baseline_plus=plus), "seed": 0}, 1.0)
        rows = [{"index": i, "rouge1": v, "rougeL": v / 2, "repeated_3gram_share": 0.1 * (name == "less")}
                for i, v in enumerate(values)]
        (folder / "summaries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_name = {run.folder.name: run for run in report.make_report([tmp_path]).runs}
    diffs = [0.05, 0.0, 0.1, 0.0, -0.05]
    mean = sum(diffs) / 5
    se = (sum((d - mean) ** 2 for d in diffs) / 4 / 5) ** 0.5
    less = by_name["less"].metrics
    assert less["paired_samples"] == 5
    assert less["rouge1_vs_plain"] == pytest.approx(mean) and less["rouge1_vs_plain_se"] == pytest.approx(se)
    assert less["rougeL_vs_plain"] == pytest.approx(mean / 2)
    assert less["repeated_3gram_share_vs_plain"] == pytest.approx(0.1) and less["repeated_3gram_share_vs_plain_se"] == pytest.approx(0)
    plus = by_name["plus"].metrics
    assert plus["paired_samples"] == 3 and plus["rouge1_vs_plain"] == pytest.approx(0)
    assert "paired_samples" not in by_name["plain"].metrics and "paired_samples" not in by_name["full"].metrics
    table = _table((tmp_path / "report" / "report.md").read_text(), "xsum")
    assert "rouge1_vs_plain" in table[0] and "rouge1_vs_plain_se" in table[0]


def test_stop_probabilities_are_paired_with_the_plain_policy(tmp_path, monkeypatch):
    """task=stop_probability runs pair their per-sample log_p_end (stops.jsonl) with the plain run's;
    summaries.jsonl files lying beside them are not read for this task."""
    monkeypatch.setattr(results, "versions", dict)
    values = {"plain": [-1.0, -2.0, -0.5], "less": [-1.5, -2.0, -0.25, -3.0]}
    for name, logs in values.items():
        folder = tmp_path / name
        write_results(folder, "eval", {"mean_log_p_end": sum(logs) / len(logs), **_summary("sink", 32, 4.25 * (name == "less"))},
                      {**_config("stop_probability", "sink", "less_mlp" if name == "less" else "none"), "seed": 0}, 1.0)
        (folder / "stops.jsonl").write_text("".join(json.dumps({"index": i, "log_p_end": v}) + "\n" for i, v in enumerate(logs)))
        (folder / "summaries.jsonl").write_text(json.dumps({"index": 0, "rouge1": 1.0}) + "\n")
    less = {run.folder.name: run for run in report.make_report([tmp_path]).runs}["less"].metrics
    diffs = [-0.5, 0.0, 0.25]
    mean = sum(diffs) / 3
    assert less["paired_samples"] == 3 and less["log_p_end_vs_plain"] == pytest.approx(mean)
    assert less["log_p_end_vs_plain_se"] == pytest.approx((sum((d - mean) ** 2 for d in diffs) / 2 / 3) ** 0.5)
    assert "rouge1_vs_plain" not in less
    table = _table((tmp_path / "report" / "report.md").read_text(), "stop_probability")
    assert "log_p_end_vs_plain" in table[0] and "mean_log_p_end" in table[0]


def test_results_page_has_command_version_tables_and_plots(sweep, tmp_path, monkeypatch, capsys):
    """The page names its command and code version, holds the report's tables and failed runs, and links
    copies of the plots that exist beside it; a rerun leaves no stale plot."""
    from less_exp import version

    monkeypatch.setattr(version, "code_version", lambda: "9.9.9+0123456789ab")
    monkeypatch.setattr(version, "git_commit", lambda: "abc1234-dirty")
    write_results(sweep / "12_oom", "eval", {}, _config("perplexity", "h2o"), 1.0, status="failed", error="out of memory")
    page = tmp_path / "docs" / "results" / "toy_study.md"
    (page.parent / "toy_study").mkdir(parents=True)
    (page.parent / "toy_study" / "old_plot.png").write_bytes(b"stale")
    command = "less-study study=toy_study seed=3"

    assert report.write_page([sweep], page, title="Toy study", command=command, out=tmp_path / "rep") == page
    text = page.read_text()
    assert text.startswith("# Toy study\n") and f"```sh\n{command}\n```" in text
    assert "Code version: `9.9.9+0123456789ab`, commit `abc1234-dirty`" in text
    rep_md = (tmp_path / "rep" / "report.md").read_text()
    assert _table(text, "perplexity") == _table(rep_md, "perplexity") and _table(text, "passkey") == _table(rep_md, "passkey")
    assert "Headline: perplexity (lower is better)." in text and "Headline: accuracy (higher is better)." in text
    assert [row[0] for row in _table(text, "Failed runs")[1:]] == ["2026-01-01_00-00-00/12_oom"]
    links = [unquote(link) for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)]
    assert sorted(links) == sorted(f"toy_study/{p.name}" for p in (tmp_path / "rep").glob("*.png")) and len(links) == 8
    assert all((page.parent / link).is_file() for link in links)
    assert sorted(p.name for p in (page.parent / "toy_study").iterdir()) == sorted(Path(link).name for link in links)

    (sweep / "6_task=passkey").rename(tmp_path / "gone")  # the rerun has one heatmap fewer
    assert report.main([str(sweep), "--out", str(tmp_path / "rep"), "--page", str(page), "--command", "again"]) == 0
    text = page.read_text()
    assert text.startswith("# toy_study\n") and "```sh\nagain\n```" in text
    links = [unquote(link) for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)]
    assert len(links) == 7 and sorted(p.name for p in (page.parent / "toy_study").iterdir()) == sorted(Path(link).name for link in links)

    capsys.readouterr()
    assert report.main([str(sweep), "--page", str(tmp_path / "page.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("less-report: error: the page") and "must be a markdown file ending in .md" in err and err.count("\n") == 1


def test_every_task_and_training_mode_declares_its_report():
    """Each registered task module and training mode has a ReportSpec whose headline and plotted
    metrics are among its columns."""
    from fnmatch import fnmatchcase

    from less_exp import tasks, training
    from less_exp.report_spec import ReportSpec

    modules = [tasks.get(name) for name in tasks.available() if hasattr(tasks.get(name), "run")]
    modules += [training.get(mode) for mode in training.MODES]
    assert len(modules) >= 12
    for module in modules:
        spec = module.REPORT
        assert isinstance(spec, ReportSpec), module.__name__
        for metric in {spec.headline, *spec.plots, spec.gap} - {None}:
            assert any(fnmatchcase(metric, p) for p in spec.columns), (module.__name__, metric)


def test_report_keeps_no_task_or_mode_names(tmp_path, monkeypatch):
    """report.py holds no task or mode name, and a task's columns, plots and headline are what its REPORT says."""
    import ast

    from less_exp import tasks, training
    from less_exp.report_spec import ReportSpec

    names = set(tasks.available()) | set(training.MODES) | {p.stem for p in (Path(paths.conf_dir()) / "task").glob("*.yaml")}
    source = ast.parse(Path(report.__file__).read_text())
    literals = {node.value for node in ast.walk(source) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not literals & names

    monkeypatch.setattr(results, "versions", dict)
    declared = {"toy": ReportSpec(columns=("b*",), headline="b2", lower_is_better=False, plots=("b2",))}
    original = tasks.get
    monkeypatch.setattr(tasks, "get", lambda name: SimpleNamespace(REPORT=declared[name]) if name in declared else original(name))
    report.declared.cache_clear()
    try:
        for policy, budget, shift in (("full", None, 0.0), ("h2o", 32, 1.0), ("h2o", 64, 2.0)):
            metrics = {"a": 1.0, "b1": 2.0 + shift, "b2": 3.0 + shift, **_summary(policy, budget)}
            write_results(tmp_path / "runs" / f"{policy}_{budget}", "eval", metrics, _config("toy", policy), 1.0)
        rep = report.make_report([tmp_path / "runs"])
        assert rep.tables[0].columns == [*PPL_COLUMNS[:5], "b1", "b2", "run"]
        assert [p.name for p in rep.plots] == ["tiny_llama_toy_b2.png"] and rep.tables[0].headline == "b2 (higher is better)"

        declared["toy"] = ReportSpec(columns=("a",))
        report.declared.cache_clear()
        rep = report.make_report([tmp_path / "runs"])
        assert rep.tables[0].columns == [*PPL_COLUMNS[:5], "a", "run"] and rep.plots == [] and rep.tables[0].headline == ""
    finally:
        report.declared.cache_clear()
