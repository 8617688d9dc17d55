"""No result lost or silently wrong: runs started together keep their own folders, a folder holding
another configuration's results is not overwritten, and a NaN stops the job where it appears and is
written as a failure, never as a result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from less_exp import eval as eval_job, factory, runtime, train as train_job
from less_exp.errors import ConfigError, NonFiniteError
from less_exp.training import record

BIN = Path(sys.executable).parent
TINY = ["model=tiny_llama", "logger=none", "task.seq_len=64", "task.max_windows=1"]
LESS = ["policy=h2o", "policy.heavy=8", "policy.recent=8", "feature_map=less_mlp"]


def _start(args, out):
    env = {**os.environ, "LESS_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([str(BIN / "less-eval"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(folder):
    return sorted(Path(folder).rglob("results.json"))


def test_runs_and_sweeps_started_together_keep_all_their_results(tmp_path):
    sweep = tmp_path / "sweep"
    procs = [_start(TINY, tmp_path / "plain") for _ in range(2)]
    procs += [_start(["-m", *TINY, f"hydra.sweep.dir={sweep}", f"seed={seed}", "policy=sink,window", "policy.recent=8"],
                     tmp_path) for seed in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    plain = _results(tmp_path / "plain")
    assert len(plain) == 2 and plain[0].parent != plain[1].parent
    swept = _results(sweep)
    assert len(swept) == 4
    seeds = sorted((json.loads(p.read_text())["config"]["seed"], json.loads(p.read_text())["config"]["policy"]["name"])
                   for p in swept)
    assert seeds == [(0, "sink"), (0, "window"), (1, "sink"), (1, "window")]


def test_a_failed_job_does_not_stop_the_rest_of_its_sweep(tmp_path):
    """The first job's budget does not fit its sequences: it fails in one line, the second still runs,
    and the sweep exits with the failure's code."""
    sweep = tmp_path / "sweep"
    proc = _start(["-m", *TINY, f"hydra.sweep.dir={sweep}", "policy=sink", "policy.recent=100,8"], tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "less-eval: error:" in err and "Traceback" not in err
    records = [json.loads(path.read_text()) for path in _results(sweep)]
    (done,) = [record for record in records if record["status"] == "ok"]
    assert done["config"]["policy"]["recent"] == 8
    assert [record["status"] for record in records].count("failed") == 1  # the bad point's own record


def test_a_folder_with_another_configurations_results_is_not_overwritten(compose_config, tmp_path):
    out = tmp_path / "run"
    first = eval_job.evaluate(compose_config("eval", [*TINY, f"paths.output_dir={out}"]))
    again = eval_job.evaluate(compose_config("eval", [*TINY, f"paths.output_dir={out}"]))  # the same run again: fine
    assert again["perplexity"] == first["perplexity"]
    with pytest.raises(ConfigError, match=r"already holds the results of another run \(differs in task.seq_len\)"):
        eval_job.evaluate(compose_config("eval", [*TINY, "task.seq_len=32", f"paths.output_dir={out}"]))
    assert json.loads((out / "results.json").read_text())["metrics"]["perplexity"] == first["perplexity"]


def _poison_state(monkeypatch, layer=1):
    apply = factory.apply

    def poisoned(model, cfg):
        model = apply(model, cfg)
        from less_exp.adapter import compression_of

        with torch.no_grad():
            next(compression_of(model).states[layer].parameters()).fill_(float("nan"))
        return model

    monkeypatch.setattr(factory, "apply", poisoned)


@pytest.mark.parametrize("task", [TINY, ["model=tiny_llama", "logger=none", "task=generate", "task.max_new_tokens=8"]],
                         ids=["perplexity", "generate"])
def test_a_nan_in_a_state_fails_the_job_naming_the_layer(compose_config, tmp_path, monkeypatch, task):
    _poison_state(monkeypatch)
    with pytest.raises(NonFiniteError, match=r"non-finite output of the attention of layer 1 at row 0, position \d+ \(dtype float32\)"):
        eval_job.evaluate(compose_config("eval", [*task, *LESS]))
    record_ = json.loads((tmp_path / "results.json").read_text())
    assert record_["status"] == "failed" and "layer 1" in record_["error"] and record_["metrics"] == {}


def test_the_command_line_says_it_in_one_line_with_exit_code_4(compose_config, monkeypatch, capsys):
    _poison_state(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        runtime.run_cli("less-eval", eval_job.evaluate, compose_config("eval", [*TINY, *LESS]))
    assert exit_.value.code == 4
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # progress bars aside
    assert len(err) == 1 and err[0].startswith("less-eval: error: non-finite output of the attention of layer 1")


def test_a_nan_metric_is_written_as_a_failure(compose_config, tmp_path, monkeypatch):
    from less_exp.tasks import perplexity

    run = perplexity.run
    monkeypatch.setattr(perplexity, "run", lambda *a: {**run(*a), "perplexity": float("nan")})
    with pytest.raises(NonFiniteError, match="metric perplexity is nan"):
        eval_job.evaluate(compose_config("eval", TINY))
    record_ = json.loads((tmp_path / "results.json").read_text())
    assert record_["status"] == "failed" and "perplexity" not in record_["metrics"]


def test_a_nan_in_the_training_data_fails_the_training(compose_config, tmp_path, monkeypatch):
    """Recorded activations with a NaN: training stops naming the layer instead of keeping the untrained state."""
    save = record.save_atomic

    def poisoned_save(obj, path):
        if isinstance(obj, dict) and "k" in obj:
            obj = {**obj, "k": obj["k"].clone().index_fill_(-2, torch.tensor([20]), float("nan"))}
        save(obj, path)

    monkeypatch.setattr(record, "save_atomic", poisoned_save)
    overrides = ["model=tiny_llama", "logger=none", "policy=sink", "policy.recent=8", "training.seq_len=64",
                 "training.num_sequences=4", "training.epochs=1", f"checkpoint={tmp_path / 'ckpt'}"]
    with pytest.raises(NonFiniteError, match="layer 0, epoch 1: the training loss is nan"):
        train_job.train(compose_config("train", overrides))
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"
    assert not list((tmp_path / "ckpt").glob("layer_*.safetensors"))
