"""Layer-wise training on a tiny model: learning, resume, merging ranges, checkpoints in less-eval."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from less_exp import checkpoints, eval as eval_job, train as train_job
from less_exp.adapter import attention_modules, compression_of
from less_exp.errors import ConfigError
from less_exp.models import load_model
from less_exp.ops import attention_logits, sparse_attention
from less_exp.policies import Full
from less_exp.training import record
from tiny_training import EVAL, TINY, train_checkpoint
from wandb_records import read_run



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished two-layer checkpoint, shared by the read-only tests below."""
    return train_checkpoint(tmp_path_factory.mktemp("trained"), "training.epochs=2")


def _tensors(root):
    return {layer: load_file(str(checkpoints.layer_file(root, layer))) for layer in sorted(checkpoints.done_layers(root))}


def _assert_same_states(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for layer in ta:
        assert ta[layer].keys() == tb[layer].keys()
        for key in ta[layer]:
            assert torch.equal(ta[layer][key], tb[layer][key]), f"layer {layer} {key} differs"


def test_loss_decreases_and_beats_the_baselines(run_train, tmp_path, monkeypatch):
    loaded = []

    def load_and_keep(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        loaded.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model, tokenizer

    monkeypatch.setattr(train_job, "load_model", load_and_keep)
    metrics = run_train()
    (model, before), = loaded
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the base model must stay frozen"
    assert all(p.grad is None for p in model.parameters())
    assert metrics["complete"] and metrics["layers_trained"] == [0, 1]
    for layer in ("0", "1"):
        m = metrics["layers"][layer]
        assert m["val_mse"] < 0.5 * m["initial_val_mse"]
        assert m["val_mse"] < m["plain_mse"] and m["val_mse"] < m["baseline_plus_mse"]
        assert m["beats_baseline_plus"]
    manifest = checkpoints.read_manifest(tmp_path / "ckpt")
    assert manifest["layers_done"] == [0, 1] and manifest["complete"]
    assert manifest["model"]["name"] == "tiny_llama" and manifest["budget"] == {"sink": 4, "heavy": 0, "recent": 8}
    assert manifest["settings"]["feature_map"]["num_features"] == 8
    history = manifest["layers"]["1"]["train_history"]
    assert history[-1] < history[0]
    tensors = load_file(str(checkpoints.layer_file(tmp_path / "ckpt", 0)))
    assert all(key.startswith(("feature_map.", "normalizer.")) for key in tensors)
    assert not list((tmp_path / "ckpt" / "progress").glob("*.pt"))
    assert not list((tmp_path / "records").glob("layer_*/*.pt")), "records are removed once a layer is done"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["job"] == "train" and results["metrics"]["layers"]["0"]["val_mse"] == metrics["layers"]["0"]["val_mse"]


def test_killed_job_resumes_to_the_same_checkpoint(run_train, tmp_path, monkeypatch):
    run_train(checkpoint=tmp_path / "whole")
    save = checkpoints.save_progress
    calls = []

    def killed_in_layer_1_epoch_3(root, layer, progress):
        save(root, layer, progress)
        calls.append(layer)
        if calls.count(1) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_progress", killed_in_layer_1_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run_train(checkpoint=tmp_path / "killed")
    monkeypatch.setattr(checkpoints, "save_progress", save)
    assert checkpoints.done_layers(tmp_path / "killed") == {0}
    assert checkpoints.load_progress(tmp_path / "killed", 1)["epoch"] == 2

    resumed = run_train(checkpoint=tmp_path / "killed")
    assert resumed["layers_skipped"] == [0] and resumed["layers_trained"] == [1]
    _assert_same_states(tmp_path / "whole", tmp_path / "killed")
    whole = checkpoints.read_manifest(tmp_path / "whole")["layers"]
    assert checkpoints.read_manifest(tmp_path / "killed")["layers"]["1"]["val_history"] == whole["1"]["val_history"]


def test_layer_ranges_from_separate_jobs_merge(run_train, tmp_path):
    run_train(checkpoint=tmp_path / "whole")
    first = run_train("training.to_layer=1", checkpoint=tmp_path / "merged")
    assert not first["complete"] and first["layers_done"] == 1
    second = run_train("training.from_layer=1", checkpoint=tmp_path / "merged")
    assert second["complete"] and second["layers_trained"] == [1]
    assert checkpoints.read_manifest(tmp_path / "merged")["layers_done"] == [0, 1]
    _assert_same_states(tmp_path / "whole", tmp_path / "merged")


def test_a_different_setup_cannot_train_into_the_same_folder(run_train, trained):
    with pytest.raises(ConfigError, match="policy=sink.*this job has policy=h2o"):
        run_train("policy=h2o", "policy.heavy=4", "policy.recent=4", checkpoint=trained)
    with pytest.raises(ConfigError, match="feature_map"):
        run_train("feature_map.features=4", checkpoint=trained)


def _kl_to_full(compose_config, overrides) -> float:
    """Mean KL from the full cache's next-token distribution on held-out text: what training aims at."""
    from less_exp.factory import apply

    windows = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(7))
    logp = []
    for extra in (["policy=full"], overrides):
        cfg = compose_config("eval", [*EVAL, *extra])
        model, _ = load_model(cfg.model)
        with torch.no_grad():
            logp.append(torch.log_softmax(apply(model, cfg)(windows).logits.float(), -1))
    return float((logp[0].exp() * (logp[0] - logp[1])).sum(-1).mean())


def test_eval_loads_the_checkpoint_and_the_state_moves_the_model_towards_the_full_cache(compose_config, trained):
    cfg = compose_config("eval", [*EVAL, f"checkpoint={trained}"])
    metrics = eval_job.evaluate(cfg)
    assert metrics["state_token_equivalents"] == pytest.approx(4.25)
    assert _kl_to_full(compose_config, [f"checkpoint={trained}"]) < 0.5 * _kl_to_full(compose_config, [])

    from less_exp.factory import apply

    model, _ = load_model(cfg.model)
    states = compression_of(apply(model, cfg)).states
    for layer, tensors in _tensors(trained).items():
        own = states[layer].state_dict()
        assert all(torch.equal(own[k], v) for k, v in tensors.items())


def test_checkpoint_budget_any_transfers_the_state_to_another_budget(compose_config, trained):
    other = ["policy.recent=12", "checkpoint_budget=any", f"checkpoint={trained}"]
    metrics = eval_job.evaluate(compose_config("eval", [*EVAL, *other]))
    assert metrics["recent"] == 12 and metrics["state_token_equivalents"] == pytest.approx(4.25)
    assert _kl_to_full(compose_config, other) < 0.5 * _kl_to_full(compose_config, ["policy.recent=12"])
    with pytest.raises(ConfigError, match="trained with policy=sink"):
        eval_job.evaluate(compose_config("eval", [*EVAL, *other, "policy=window", "policy.recent=12"]))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model=tiny_qwen2"], "trained for model=tiny_llama"),
        (["checkpoint_budget=nearest"], "checkpoint_budget"),
        (["policy=h2o", "policy.heavy=4", "policy.recent=4"], "trained with policy=sink"),
        (["policy.recent=9"], "trained with policy=sink"),
        (["feature_map=elu1"], "holds feature_map=less_mlp"),
        (["feature_map=less_mlp", "policy.baseline_plus=true"], "Baseline\\+"),
    ],
)
def test_mismatched_checkpoint_fails_before_the_model_loads(compose_config, monkeypatch, trained, overrides, match):
    monkeypatch.setattr(eval_job, "load_model", _must_not_load)
    with pytest.raises(ConfigError, match=match):
        eval_job.evaluate(compose_config("eval", [*EVAL, f"checkpoint={trained}", *overrides]))


def test_broken_checkpoints_fail_clearly(compose_config, trained, tmp_path):
    def evaluate(folder, *overrides):
        return eval_job.evaluate(compose_config("eval", [*EVAL, f"checkpoint={folder}", *overrides]))

    with pytest.raises(ConfigError, match="no manifest.json"):
        evaluate(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="settings"):
        evaluate(trained, "feature_map=less_mlp", "feature_map.hidden=16")

    missing = shutil.copytree(trained, tmp_path / "missing")
    checkpoints.layer_file(missing, 1).unlink()
    with pytest.raises(ConfigError, match=r"lacks layers \[1\]"):
        evaluate(missing)

    corrupt = shutil.copytree(trained, tmp_path / "corrupt")
    path = checkpoints.layer_file(corrupt, 0)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match="layer_000.safetensors is unreadable"):
        evaluate(corrupt)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["training.mode=qat"], "training.mode='qat' must be one of layerwise, e2e"),
        (["feature_map=none"], "feature_map"),
        (["policy=full"], "evicts nothing"),
        (["training.val_fraction=0"], "val_fraction"),
        (["training.seq_len=8"], "not smaller than the sequence"),
        (["training.from_layer=1", "training.to_layer=1"], "from_layer"),
        (["training.record_dtype=int8"], "record_dtype"),
    ],
)
def test_bad_training_configs_fail_before_the_model_loads(compose_config, monkeypatch, overrides, match):
    monkeypatch.setattr(train_job, "load_model", _must_not_load)
    base = [o for o in TINY if not o.startswith("feature_map.")] if "feature_map=none" in overrides else TINY
    with pytest.raises(ConfigError, match=match):
        train_job.train(compose_config("train", [*base, *overrides]))


def test_layer_range_past_the_model_fails(run_train):
    with pytest.raises(ConfigError, match="to_layer=3 but the model has 2 layers"):
        run_train("training.to_layer=3")
    with pytest.raises(ConfigError, match="from_layer=5, to_layer=2 but the model has 2 layers"):
        run_train("training.from_layer=5")


def test_records_reproduce_the_attention_output(compose_config, tmp_path):
    """o_proj(full attention over the recorded q, k, v) is the recorded O: the records are what the model computed."""
    cfg = compose_config("train", TINY)
    model, _ = load_model(cfg.model)
    windows = torch.randint(0, 256, (3, 32))
    record.record_layers(model, windows, [0, 1], tmp_path, torch.float32, {"test": 1}, batch_size=2)
    assert model.config._attn_implementation == "sdpa"
    module = attention_modules(model)[1]
    rec = torch.load(record.sequence_file(tmp_path, 1, 2))
    keep = Full().keep_mask(Full().budget(), torch.ones(1, 32, dtype=torch.bool), 2).keep
    out, _, _ = sparse_attention(attention_logits(rec["q"][None], rec["k"][None], module.scaling), keep, rec["v"][None])
    o = module.o_proj(out.reshape(1, -1, 32, out.shape[-1]).transpose(1, 2).reshape(1, 32, -1))[0]
    torch.testing.assert_close(o, rec["o"], atol=1e-5, rtol=1e-4)


def test_wandb_gets_per_layer_errors(compose_config, tmp_path):
    cfg = compose_config("train", [*TINY, "logger=wandb", "training.epochs=1"])
    train_job.train(cfg)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history = read_run(run_dir)["history"]
    assert any("layer_001/val_mse" in row for row in history)
    rows = [row for row in history if "layers/baseline_plus_mse" in row]
    assert [row["layer"] for row in rows] == [0, 1]
    assert all("layers/plain_mse" in row and "layers/val_mse" in row for row in rows)


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model must not load when the config is invalid")

