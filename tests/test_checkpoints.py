"""Checkpoint identity and integrity: fingerprints in layer files, foreign and broken files refused."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file
from tiny_training import EVAL, train_checkpoint

from less_exp import checkpoints, eval as eval_job
from less_exp.errors import ConfigError, NonFiniteError
from less_exp.factory import make_states
from less_exp.models import load_model
from less_exp.training import layerwise

H2O = ["policy=h2o", "policy.heavy=4", "policy.recent=4"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished two-layer sink checkpoint on tiny_llama; tests copy it before changing it."""
    return train_checkpoint(tmp_path_factory.mktemp("trained"), "training.epochs=1")


@pytest.fixture
def copy_of(trained, tmp_path):
    return lambda name: shutil.copytree(trained, tmp_path / name)


def _evaluate(compose_config, folder, *overrides):
    return eval_job.evaluate(compose_config("eval", [*EVAL, f"checkpoint={folder}", *overrides]))


def _rewrite_layer(root, layer, tensors=None, **fingerprint_model):
    """Rewrite a layer file as a forger would: other tensors (with their sha256, which anyone can compute)
    and/or other model fields in its fingerprint."""
    path = checkpoints.layer_file(root, layer)
    with safe_open(str(path), "pt") as fh:
        metadata = dict(fh.metadata())
    found = json.loads(metadata[checkpoints.FINGERPRINT])
    found["model"].update(fingerprint_model)
    metadata[checkpoints.FINGERPRINT] = json.dumps(found, sort_keys=True)
    tensors = tensors if tensors is not None else load_file(str(path))
    metadata[checkpoints.TENSORS_SHA256] = checkpoints.tensors_digest(tensors)
    save_file(tensors, str(path), metadata=metadata)


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model must not load for a checkpoint refused by its files")


def test_every_layer_file_carries_the_fingerprint_of_its_training(trained):
    manifest = checkpoints.read_manifest(trained)
    for layer in (0, 1):
        found, metrics = checkpoints.read_layer(trained, layer)
        assert found == checkpoints.fingerprint(manifest)
        assert metrics == manifest["layers"][str(layer)]
    model = found["model"]
    assert model["model_type"] == "llama" and model["num_layers"] == 2 and model["head_dim"] == 16
    assert len(model["config_hash"]) == 16 and len(model["weights_hash"]) == 16
    assert found["training"] == {"mode": "layerwise", "data": "wikitext2"} and found["policy"]["name"] == "sink"


def test_hashes_identify_the_model_not_its_load(compose_config):
    cfg = compose_config("eval", EVAL)
    (a, _), (b, _) = load_model(cfg.model), load_model(cfg.model)
    qwen, _ = load_model(compose_config("eval", ["model=tiny_qwen2"]).model)
    assert checkpoints.model_identity(a) == checkpoints.model_identity(b)
    assert checkpoints.config_hash(a.config) == checkpoints.config_hash(b.half().config)
    other = checkpoints.model_identity(qwen)
    assert other["config_hash"] != checkpoints.model_identity(a)["config_hash"]
    assert other["weights_hash"] != checkpoints.model_identity(a)["weights_hash"]


def test_relabelling_a_folder_of_other_states_is_refused(run_train, copy_of):
    folder = copy_of("relabel")
    (folder / "manifest.json").unlink()
    with pytest.raises(ConfigError, match=r"layer_000\.safetensors was trained with policy=sink .*this job has policy=h2o"):
        run_train(*H2O, checkpoint=folder)
    assert not (folder / "manifest.json").exists()
    with pytest.raises(ConfigError, match=r"layer_000\.safetensors was trained with training.mode=layerwise"):
        checkpoints.open_for_training(folder, {**checkpoints.read_layer(folder, 0)[0], "training": {"mode": "e2e", "data": "wikitext2"}})

    again = run_train("training.epochs=1", checkpoint=folder)
    assert again["layers_skipped"] == [0, 1] and again["complete"]


def test_progress_of_another_setup_is_not_resumed(run_train, tmp_path, monkeypatch):
    save = checkpoints.save_progress

    def killed(root, layer, progress):
        save(root, layer, progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_progress", killed)
    with pytest.raises(KeyboardInterrupt):
        run_train(checkpoint=tmp_path / "killed")
    monkeypatch.undo()
    (tmp_path / "killed" / "manifest.json").unlink()
    with pytest.raises(ConfigError, match=r"progress/layer_000\.pt was saved with policy=sink .*this job has policy=h2o"):
        run_train(*H2O, checkpoint=tmp_path / "killed")


def test_foreign_checkpoint_with_an_edited_manifest_is_refused(compose_config, copy_of, monkeypatch):
    folder = copy_of("foreign")
    manifest = checkpoints.read_manifest(folder)
    monkeypatch.setattr(eval_job, "load_model", _must_not_load)
    manifest["model"]["name"] = "tiny_qwen2"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"trained for model\.id=tiny_llama, but this run's model=tiny_qwen2"):
        _evaluate(compose_config, folder, "model=tiny_qwen2")
    manifest["model"]["id"] = "tiny_qwen2"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"layer_000\.safetensors was trained with model\.id=tiny_llama, "
                                          r"model\.name=tiny_llama, but manifest\.json says model\.id=tiny_qwen2"):
        _evaluate(compose_config, folder, "model=tiny_qwen2")


def test_foreign_checkpoint_is_refused_by_the_model_hashes(compose_config, copy_of, trained):
    """Manifest and layer files relabelled alike: only the model's config and weights tell."""
    folder = copy_of("forged")
    manifest = checkpoints.read_manifest(folder)
    manifest["model"].update(name="tiny_qwen2", id="tiny_qwen2")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for layer in (0, 1):
        _rewrite_layer(folder, layer, name="tiny_qwen2", id="tiny_qwen2")

    def load(folder, model_name):
        cfg = compose_config("eval", [*EVAL, f"model={model_name}", f"checkpoint={folder}"])
        manifest = checkpoints.check(cfg)
        model, _ = load_model(cfg.model)
        states = make_states(cfg, model, *checkpoints.state_nodes(cfg, manifest))
        checkpoints.load_into(states, folder, manifest, model=model)
        return states

    with pytest.raises(ConfigError, match=r"trained for model\.config_hash=\w+, .*model\.weights_hash=\w+, but this run's model"):
        load(folder, "tiny_qwen2")
    own = load(trained, "tiny_llama")[1].state_dict()
    assert all(torch.equal(own[k], v) for k, v in load_file(str(checkpoints.layer_file(trained, 1))).items())


def test_non_finite_layer_file_is_refused_on_load(compose_config, copy_of):
    folder = copy_of("nan")
    tensors = load_file(str(checkpoints.layer_file(folder, 1)))
    key = sorted(tensors)[0]
    tensors[key][(0,) * tensors[key].dim()] = float("nan")
    _rewrite_layer(folder, 1, tensors)
    with pytest.raises(NonFiniteError, match=rf"layer_001\.safetensors holds non-finite parameters \({key}\); retrain"):
        _evaluate(compose_config, folder)
    assert NonFiniteError.exit_code == 4


@pytest.mark.parametrize("keep", [100, -8])
def test_truncated_layer_file_is_refused_and_can_be_retrained(compose_config, copy_of, run_train, monkeypatch, keep):
    folder = copy_of(f"truncated{keep}")
    path = checkpoints.layer_file(folder, 1)
    path.write_bytes(path.read_bytes()[:keep])
    expected = r"layer_001\.safetensors is unreadable \(truncated or corrupt: [^\n]*\); .*delete layer_001\.safetensors"
    with monkeypatch.context() as mp:
        mp.setattr(eval_job, "load_model", _must_not_load)
        with pytest.raises(ConfigError, match=expected):
            _evaluate(compose_config, folder)
    with pytest.raises(ConfigError, match=expected):
        run_train("training.epochs=1", checkpoint=folder)
    path.unlink()
    again = run_train("training.epochs=1", checkpoint=folder)
    assert again["layers_trained"] == [1] and again["complete"]


def test_training_that_turns_non_finite_writes_nothing(run_train, tmp_path, monkeypatch):
    monkeypatch.setattr(layerwise, "detached_copy", lambda sd: {k: torch.full_like(v, float("nan")) for k, v in sd.items()})
    with pytest.raises(NonFiniteError, match=r"layer 0: the trained state has non-finite parameters"):
        run_train("training.epochs=1")
    folder = tmp_path / "ckpt"
    assert checkpoints.done_layers(folder) == set()
    assert not checkpoints.progress_file(folder, 0).exists()
    assert checkpoints.read_manifest(folder)["layers_done"] == []


@dataclass
class Payload:
    """Not a tensor, dict, list, number or string: ``weights_only`` must refuse to unpickle it."""

    value: int = 0


def test_progress_is_loaded_weights_only(run_train, tmp_path, monkeypatch):
    saved = []
    save = checkpoints.save_progress

    def keep(root, layer, progress):
        save(root, layer, progress)
        saved.append(checkpoints.progress_file(root, layer).read_bytes())

    monkeypatch.setattr(checkpoints, "save_progress", keep)
    run_train("training.epochs=1", "training.to_layer=1")
    path = checkpoints.progress_file(tmp_path / "ckpt", 0)
    path.write_bytes(saved[0])
    progress = torch.load(path, weights_only=True)
    assert progress["epoch"] == 1 and checkpoints.load_progress(tmp_path / "ckpt", 0)["epoch"] == 1

    torch.save({**progress, "payload": Payload()}, path)
    with pytest.raises(ConfigError, match=r"progress/layer_000\.pt is unreadable .*delete it to restart layer 0"):
        checkpoints.load_progress(tmp_path / "ckpt", 0)
