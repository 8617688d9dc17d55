"""Trackers: logger=none accepts everything; logger=wandb keeps its files in the output folder, and a job's
run carries its group, job type, ablation axes (flat keys and tags) and headline metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from less_exp import paths, tracking  # noqa: E402
from less_exp.errors import ConfigError  # noqa: E402
from wandb_records import read_run  # noqa: E402


def test_none_tracker_accepts_everything(compose_config, tmp_path):
    cfg = compose_config("eval", ["logger=none"])
    with tracking.make_tracker(cfg.logger, {}, tmp_path, "eval") as tracker:
        tracker.log({"a": 1}, step=0)
        tracker.log_table("t", ["x"], [[1]])
        tracker.log_image("i", None)
        tracker.summary({"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_unknown_logger_is_rejected(compose_config, tmp_path):
    cfg = compose_config("eval", ["logger=none", "logger.name=tensorboard"])
    with pytest.raises(ConfigError, match="logger"):
        tracking.make_tracker(cfg.logger, {}, tmp_path, "eval")


def test_wandb_tracker_logs_tables_images_and_summary(compose_config, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_CACHE_DIR")
    cfg = compose_config("eval", ["logger=wandb", "logger.group=g", "logger.run_name=r"])
    figure, axes = plt.subplots()
    axes.plot([1, 2, 3])
    with tracking.make_tracker(cfg.logger, {"k": {"v": 1}}, tmp_path, "eval") as tracker:
        assert tracker.run_dir.parent == tmp_path / "wandb"
        tracker.log({"loss": 0.5}, step=1)
        tracker.log_table("rows", ["x", "y"], [[1, 2], [3, 4]])
        tracker.log_image("curve", figure, caption="c")
        tracker.summary({"score": 7})
    plt.close(figure)
    run = read_run(tracker.run_dir)
    assert run["config"]["k"] == {"v": 1}
    assert run["summary"]["score"] == 7 and run["summary"]["rows/_type"] == "table-file"
    assert run["summary"]["curve/_type"] == "image-file"
    assert list(tracker.run_dir.glob("files/media/images/curve*.png"))
    assert (tmp_path / "wandb" / "cache").is_dir()


TINY_EVAL = ["model=tiny_llama", "task.seq_len=64", "task.max_windows=2"]


def test_eval_run_carries_group_axes_tags_and_headline(compose_config, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from less_exp import eval as eval_job, tasks

    monkeypatch.setattr(tasks.get("perplexity"), "REPORT", SimpleNamespace(headline="nll"), raising=False)
    cfg = compose_config("eval", [*TINY_EVAL, "policy=h2o", "policy.heavy=8", "policy.recent=8", "feature_map=less_mlp",
                                  "gating=decay", "logger=wandb", "logger.group=study-1", "logger.tags=[mine]"])
    metrics = eval_job.evaluate(cfg)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    assert run["group"] == "study-1" and run["job_type"] == "eval"
    flat = {key[len(tracking.AXIS_PREFIX):]: value for key, value in run["config"].items() if key.startswith(tracking.AXIS_PREFIX)}
    assert flat == tracking.axes(cfg, "eval")
    assert {k: flat[k] for k in ("model", "policy", "budget", "budget_heavy", "feature_map", "gating", "normalizer", "task")} == {
        "model": "tiny_llama", "policy": "h2o", "budget": 16, "budget_heavy": 8, "feature_map": "less_mlp", "gating": "decay",
        "normalizer": "joint", "task": "perplexity"}
    assert flat["checkpoint"] is False and flat["training_mode"] is None and flat["data"] == "wikitext2"
    assert run["config"]["policy"]["name"] == "h2o"  # the nested config stays
    assert {"mine", "policy:h2o", "budget:16", "feature_map:less_mlp", "gating:decay", "task:perplexity"} <= set(run["tags"])
    assert run["summary"]["perplexity"] == pytest.approx(metrics["perplexity"])
    assert run["summary"]["headline"] == pytest.approx(metrics["nll"]) and run["summary"]["headline_metric"] == "nll"


def test_axes_of_a_checkpoint_eval_come_from_its_manifest(compose_config, tmp_path):
    from less_exp import checkpoints

    ckpt = tmp_path / "train_run" / "checkpoint"
    ckpt.mkdir(parents=True)
    manifest = {"format": checkpoints.FORMAT, "feature_map": {"name": "taylor"}, "normalizer": {"name": "norm"},
                "gating": {"name": "scalar_gate"}, "training": {"mode": "progressive"}}
    (ckpt / checkpoints.MANIFEST).write_text(json.dumps(manifest))
    cfg = compose_config("eval", [*TINY_EVAL, "policy=sink", f"checkpoint={ckpt}"])
    axes = tracking.axes(cfg, "eval")
    assert (axes["feature_map"], axes["normalizer"], axes["gating"], axes["reweighting"]) == ("taylor", "norm", "scalar_gate", "none")
    assert axes["training_mode"] == "progressive" and axes["checkpoint"] == "train_run/checkpoint"
    plain = tracking.axes(compose_config("eval", [*TINY_EVAL, "policy=sink"]), "eval")
    assert (plain["feature_map"], plain["normalizer"], plain["checkpoint"]) == ("none", "none", False)
    assert plain["budget"] == plain["budget_sink"] + plain["budget_recent"] > 0


def test_axes_of_a_train_job_and_a_per_prompt_budget(compose_config):
    train = tracking.axes(compose_config("train", ["model=tiny_llama", "training=e2e", "training.init_from=/runs/ab12/checkpoint"]), "train")
    assert train["training_mode"] == "e2e" and train["task"] is None and train["checkpoint"] == "ab12/checkpoint"
    ratio = tracking.axes(compose_config("eval", ["policy=h2o", "policy.ratio_of=length", "policy.heavy=0.1",
                                                  "policy.recent=0.2", "task=xsum"]), "eval")
    assert ratio["budget"] is None and (ratio["budget_heavy"], ratio["budget_recent"], ratio["budget_ratio_of"]) == (0.1, 0.2, "length")
    assert ratio["data"] == "xsum" and "budget:None" not in tracking.axis_tags(ratio)


def test_long_tags_are_cut_to_wandb_limit_and_stay_distinct():
    tags = tracking.axis_tags({"checkpoint": "a" * 100 + "x", "feature_map": "a" * 100 + "y", "policy": "h2o"})
    assert all(len(t) <= tracking.TAG_LIMIT for t in tags) and len(set(tags)) == 3
    assert tags[2] == "policy:h2o" and tags[0].startswith("checkpoint:aaa")


def test_sweep_is_one_group_and_its_report_joins_it(tmp_path):
    from less_exp import data, report

    env = {**os.environ, "LESS_OUTPUT_DIR": str(tmp_path)}
    with initialize_config_dir(config_dir=paths.conf_dir(), version_base="1.3"):
        data_dir = data.local_file(compose("eval").data, "test").parent
    cmd = [sys.executable, "-m", "less_exp.eval", "-m", "model=tiny_llama", "task.seq_len=32", "task.max_windows=1,2",
           "logger=wandb", f"data.local.dir={data_dir}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (sweep,) = (tmp_path / "multirun" / "eval").iterdir()
    runs = [read_run(d) for d in sorted(sweep.glob("*/wandb/offline-run-*"))]
    assert len(runs) == 2 and {r["group"] for r in runs} == {sweep.name}
    assert {r["job_type"] for r in runs} == {"eval"} and all("axis/policy" in r["config"] for r in runs)
    assert sorted(r["summary"]["num_windows"] for r in runs) == [1, 2]

    rep = report.make_report([sweep], logger="wandb")
    own = read_run(rep.wandb_run_dir)
    assert (own["group"], own["job_type"]) == (sweep.name, "report")
    assert report.main([str(sweep), "--out", str(tmp_path / "other"), "--logger", "wandb", "--group", "mine"]) == 0
    (other,) = (tmp_path / "other" / "wandb").glob("offline-run-*")
    assert read_run(other)["group"] == "mine"
