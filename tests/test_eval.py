"""The eval job end to end on a tiny model: metrics, results.json, W&B offline run, clear errors."""

from __future__ import annotations

import json
import re
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from less_exp import data, eval as eval_job
from less_exp.errors import ConfigError, UnavailableError
from less_exp.models import load_model
from wandb_records import read_run

TINY = ["model=tiny_llama", "task.seq_len=64", "task.max_windows=3"]


def test_perplexity_matches_direct_computation(compose_config, tmp_path):
    cfg = compose_config("eval", [*TINY, "logger=none", "task.batch_size=2"])
    metrics = eval_job.evaluate(cfg)
    assert metrics["num_windows"] == 3 and metrics["num_tokens"] == 3 * 63
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["nll"]))
    model, tokenizer = load_model(cfg.model)
    windows = data.token_windows(tokenizer, data.load_text(cfg.data, "test"), 64, 3)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    assert metrics["nll"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)

    record = json.loads((tmp_path / "results.json").read_text())
    assert record["job"] == "eval" and record["metrics"] == metrics and record["duration_s"] > 0
    assert record["config"]["model"]["config"]["max_position_embeddings"] == 2048
    assert record["config"]["paths"]["output_dir"] == str(tmp_path)


def test_wandb_offline_run_holds_config_and_metrics(compose_config, tmp_path):
    cfg = compose_config("eval", [*TINY, "logger=wandb", "logger.tags=[test]"])
    metrics = eval_job.evaluate(cfg)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    assert run["config"]["model"]["name"] == "tiny_llama"
    assert run["config"]["task"] == OmegaConf.to_container(cfg.task, resolve=True)
    assert run["config"]["paths"]["output_dir"] == str(tmp_path)
    assert run["summary"]["perplexity"] == pytest.approx(metrics["perplexity"])
    assert run["summary"]["num_tokens"] == metrics["num_tokens"]
    assert [row["perplexity/running"] for row in run["history"]][-1] == pytest.approx(metrics["perplexity"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("task.seq_len=1", "seq_len"),
        ("task.seq_len=4096", "model.max_length"),
        ("task.max_windows=0", "max_windows"),
        ("task.batch_size=0", "batch_size"),
        ("task.split=dev", "split"),
        ("device=cuda:7", "device") if not torch.cuda.is_available() else ("device=nonsense", "device"),
        ("seed=abc", "seed"),
    ],
)
def test_bad_values_fail_before_loading(compose_config, monkeypatch, override, match):
    monkeypatch.setattr(eval_job, "load_model", _must_not_load)
    with pytest.raises(ConfigError, match=match):
        eval_job.evaluate(compose_config("eval", [*TINY, "logger=none", override]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.max_windows=0"], "task.max_windows=0 must be a positive integer or null (null: every window)"),
        (["task=xsum", "task.num_samples=-3"], "task.num_samples=-3 must be a positive integer or null (null: every record)"),
        (["task=xsum", "task.min_prompt_tokens=true"], "task.min_prompt_tokens=True must be a positive integer or null (null: every prompt)"),
        (["task=harness", "task.limit=2.5"], "task.limit=2.5 must be a positive integer or null (null: every document)"),
    ],
)
def test_counts_that_may_be_null_say_what_null_means(compose_config, monkeypatch, overrides, message):
    monkeypatch.setattr(eval_job, "load_model", _must_not_load)
    with pytest.raises(ConfigError) as caught:
        eval_job.evaluate(compose_config("eval", ["model=tiny_llama", "logger=none", *overrides]))
    assert str(caught.value) == message


def test_offline_hub_model_fails_before_loading(compose_config, monkeypatch):
    monkeypatch.setattr(eval_job, "load_model", _must_not_load)
    with pytest.raises(UnavailableError, match="model=smollm2_135m"):
        eval_job.evaluate(compose_config("eval", ["model=llama2_7b", "logger=none"]))


def test_missing_data_fails_before_loading(compose_config, monkeypatch, tmp_path):
    monkeypatch.setattr(eval_job, "load_model", _must_not_load)
    monkeypatch.setenv("LESS_DATA_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(UnavailableError, match="LESS_DATA_ROOT"):
        eval_job.evaluate(compose_config("eval", [*TINY, "logger=none"]))


def test_command_line_sweep(tmp_path):
    env = {**os.environ, "LESS_OUTPUT_DIR": str(tmp_path)}
    data_dir = f"data.local.dir={data.local_file(compose_config_data(), 'test').parent}"
    cmd = [sys.executable, "-m", "less_exp.eval", "-m", *TINY[:2], "task.max_windows=1,2", "logger=none", data_dir]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = sorted(Path(tmp_path, "multirun", "eval").glob("*/*/results.json"))
    names = [p.parent.name for p in results]  # <job number>_<overrides>_<hash of all overrides>
    assert [name.rsplit("_", 1)[0] for name in names] == [
        f"{i}_data.local.dir=wikitext-2,model=tiny_llama,task.max_windows={i + 1},task.seq_len=64" for i in range(2)
    ]
    assert all(re.fullmatch(r"[0-9a-f]{8}", name.rsplit("_", 1)[1]) for name in names)
    assert [json.loads(p.read_text())["metrics"]["num_windows"] for p in results] == [1, 2]
    assert proc.stdout.count("perplexity: perplexity=") == 2


def compose_config_data():
    from hydra import compose, initialize_config_dir

    from less_exp import paths

    with initialize_config_dir(config_dir=paths.conf_dir(), version_base="1.3"):
        return compose("eval").data


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ("checkpoint=/work/out/ckpt/h2o,policy=h2o", "checkpoint=h2o,policy=h2o"),
        ("checkpoint=ckpt/h2o/,policy=h2o", "checkpoint=h2o_,policy=h2o"),
        ("task.context_lengths=[512,1024],policy=sink", "task.context_lengths=[512,1024],policy=sink"),
    ],
)
def test_sweep_folder_names_stay_flat(overrides, name):
    from less_exp.paths import run_dirname

    assert run_dirname(overrides) == name
    long = run_dirname("x=" + "a" * 300)
    assert len(long) == 160 and long != run_dirname("x=" + "a" * 299 + "b")


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model must not load when the config is invalid")


@pytest.mark.usefixtures("one_thread")
def test_checkpoint_alone_takes_the_manifests_policy_and_budget(compose_config, tmp_path, capsys):
    from tiny_training import EVAL, train_checkpoint

    from less_exp import checkpoints

    ckpt = train_checkpoint(tmp_path / "trained", "training.epochs=1", "logger=none")
    trained = checkpoints.read_manifest(ckpt)["budget"]
    window = [f"checkpoint={ckpt}", "model=tiny_llama", "logger=none", "task.seq_len=64", "task.max_windows=2"]
    taken = eval_job.evaluate(compose_config("eval", window))
    assert f"policy: sink (sink=4 heavy=0 recent=8) from checkpoint={ckpt}'s manifest" in capsys.readouterr().out
    assert {key: taken[key] for key in trained} == trained and taken["policy"] == "sink"
    assert taken["state_features"] > 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["config"]["policy"]["name"] == "sink" and record["config"]["policy"]["recent"] == 8
    named = eval_job.evaluate(compose_config("eval", [*EVAL, f"checkpoint={ckpt}"]))
    assert named["perplexity"] == taken["perplexity"]
    assert eval_job.evaluate(compose_config("eval", [*window, "checkpoint_budget=any"]))["perplexity"] == taken["perplexity"]
    with pytest.raises(ConfigError, match="was trained with policy=sink"):  # a policy the user names is checked as before
        eval_job.evaluate(compose_config("eval", [*window, "policy=h2o", "policy.heavy=4", "policy.recent=4"]))


@pytest.mark.parametrize("cuda", [True, False])
def test_device_auto_is_the_default_and_picks_cuda_when_available(compose_config, monkeypatch, cuda):
    from less_exp import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert compose_config("eval").device == compose_config("train").device == "auto"
    assert runtime.resolve_device("auto") == torch.device("cuda" if cuda else "cpu")
