"""less-report: a fake multirun folder in, the markdown tables, PNGs and W&B run out."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from less_exp import report, results
from less_exp.results import write_results
from wandb_records import read_run

GRID = {"context_lengths": [256, 512], "depths": [0.0, 0.5, 1.0], "accuracy": [[1.0, 1.0, 0.5], [1.0, 0.0, 0.5]]}
PPL_COLUMNS = ["model", "method", "budget", "state (token-eq.)", "memory (tokens)", "perplexity", "nll", "num_tokens", "run"]


def _config(task, policy="full", feature_map="none", checkpoint=None, baseline_plus=False, model="tiny_llama"):
    return {
        "model": {"name": model},
        "policy": {"name": policy, "sink": 0, "heavy": 16, "recent": 16, "baseline_plus": baseline_plus},
        "feature_map": {"name": feature_map},
        "gating": {"name": "none"},
        "reweighting": {"name": "none"},
        "normalizer": {"name": "joint"},
        "task": {"name": task} if task else None,
        "checkpoint": checkpoint,
    }


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
    ("9_train", "train", {"mean_val_mse": 0.2, "layers_done": 2, "num_layers": 2, "state_token_equivalents": 4.25}, _config(None, "sink", "less_mlp", "ckpt/sink")),
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
        ["tiny_llama", "full", "full", "0", "full", "300", "5.7", "508", run("0_policy=full")],
        ["tiny_llama", "h2o", "32", "0", "32", "340.5", "5.83", "508", run("1_policy=h2o,b=32")],
        ["tiny_llama", "h2o", "32", "0", "32", "341.5", "5.83", "508", run("5_policy=h2o,seed=1")],
        ["tiny_llama", "h2o+less_mlp(ckpt)", "32", "4.25", "36", "330", "5.8", "508", run("3_policy=h2o,feature_map=less_mlp")],
        ["tiny_llama", "h2o", "64", "0", "64", "320.25", "5.77", "508", run("2_policy=h2o,b=64")],
        ["tiny_llama", "sink", "32", "0", "32", "350", "5.86", "508", run("4_policy=sink")],
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
        assert image.shape == (440, 640, 4) and image.std() > 0.01
        assert f"]({png.name})" in rep.markdown


def test_cli_writes_report_and_picks_metric(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(sweep / "1_policy=h2o,b=32"), str(sweep), "--out", str(out), "--metric", "nll"]) == 0
    printed = capsys.readouterr().out
    assert "| tiny_llama | h2o+less_mlp(ckpt) | 32 | 4.25 | 36 |" in printed
    assert printed.count("1_policy=h2o,b=32 |") == 1
    assert (out / "report.md").is_file()
    assert sorted(p.name for p in out.glob("*.png") if not p.name.startswith("passkey_")) == ["tiny_llama_perplexity_nll.png"]


def test_single_run_folder_defaults_to_its_report_folder(sweep):
    rep = report.make_report([sweep / "4_policy=sink"])
    assert rep.out_dir == sweep / "4_policy=sink" / "report"
    assert [r.name for r in rep.runs] == ["4_policy=sink"] and len(rep.plots) == 1 and rep.heatmaps == []


def test_method_label_names_the_state(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "manifest.json").write_text(json.dumps({"feature_map": {"name": "elu1"}}))
    from_checkpoint = {**_config("perplexity", "sink", checkpoint="ckpt"), "paths": {"root_dir": str(tmp_path)}}
    assert report.method_label(from_checkpoint, "sink") == "sink+elu1(ckpt)"
    assert report.method_label(_config("perplexity", "sink", checkpoint="gone"), "sink") == "sink+state(ckpt)"
    odd = {**_config("perplexity", "h2o", "less_mlp"), "gating": {"name": "scalar"}}
    assert report.method_label(odd, "h2o") == "h2o+less_mlp[gating=scalar]"
    assert report.method_label(_config("perplexity", "h2o", "less_mlp", "ckpt/h2o"), "h2o", loads_checkpoint=False) == "h2o+less_mlp"


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
    rep = report.make_report([sweep], logger="wandb", project="less-report-test")
    assert rep.wandb_run_dir.parent == sweep / "report" / "wandb"
    run = read_run(rep.wandb_run_dir)
    assert run["config"]["runs"] == len(RUNS) and run["summary"]["runs"] == len(RUNS)
    for task in ("passkey", "perplexity", "train"):
        assert run["summary"][f"table/{task}/_type"] == "table-file"
    (table_file,) = rep.wandb_run_dir.glob("files/media/table/table/perplexity_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == PPL_COLUMNS and len(table["data"]) == 6
    assert table["data"][3][:5] == ["tiny_llama", "h2o+less_mlp(ckpt)", 32, 4.25, 36]
    for png in rep.plots + rep.heatmaps:
        assert run["summary"][f"plot/{png.stem}/_type"] == "image-file"
    assert len(list(rep.wandb_run_dir.glob("files/media/images/plot/*.png"))) == len(rep.plots) + len(rep.heatmaps)


def test_plots_place_methods_at_their_memory(tmp_path, monkeypatch):
    """x is budget + state token-equivalents; one size per method gives bars, several give lines."""
    from less_exp import report_plots

    monkeypatch.setattr(results, "versions", dict)
    runs = [("full", None, 0.0, 0.30), ("h2o", 32, 0.0, 0.20), ("h2o", 32, 4.25, 0.25)]
    for i, (policy, budget, state, score) in enumerate(runs):
        config = _config("xsum", policy, "less_mlp" if state else "none", checkpoint="ckpt/h2o" if state else None)
        write_results(tmp_path / "one" / str(i), "eval", {"rouge1": score, **_summary(policy, budget, state)}, config, 1.0)
    drawn = []
    monkeypatch.setattr(report_plots, "_bars", lambda axes, lines: drawn.append({m: dict(p) for m, p in lines.items()}))
    rep = report.make_report([tmp_path / "one"], metrics=["rouge1"])
    assert [p.name for p in rep.plots] == ["tiny_llama_xsum_rouge1.png"]
    assert drawn == [{"h2o": {32: [0.2]}, "h2o+less_mlp(ckpt)": {36: [0.25]}}]
    write_results(tmp_path / "one" / "3", "eval", {"rouge1": 0.22, **_summary("h2o", 64)}, _config("xsum", "h2o"), 1.0)
    drawn.clear()
    assert report.make_report([tmp_path / "one"], metrics=["rouge1"]).plots and drawn == []
