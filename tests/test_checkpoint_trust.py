"""A checkpoint is data, never code: its components name allow-listed engine classes only, nothing
nested in it is instantiated, unknown manifest keys are refused, and every layer file's tensors are
verified by the sha256 saved with them. Crafted checkpoints go through the real ``less-eval`` and
``less-train`` commands: one line, exit code 2, no traceback, and nothing they name is called."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, safe_open, save_file
from tiny_training import EVAL, TINY, train_checkpoint

from less_exp import checkpoints, eval as eval_job, factory, paths, train as train_job
from less_exp.errors import ConfigError
from less_exp.factory import make_states
from less_exp.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

BIN = Path(sys.executable).parent
CALLABLE = "import os\n\ndef mkdir(path, **_):\n    os.mkdir(path)\n"  # accepts what a component is given
CHANGED = r"layer_001\.safetensors does not hold the tensors it was saved with \(sha256 differs\); retrain that layer: " \
          r"delete layer_001\.safetensors and rerun less-train with checkpoint="


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished two-layer sink checkpoint on tiny_llama; tests copy it before changing it."""
    return train_checkpoint(tmp_path_factory.mktemp("trained"), "training.epochs=1")


def _edit_fingerprints(folder: Path, edit, manifest: bool = True, layers: bool = True) -> None:
    """Apply ``edit(dict)`` to the manifest and/or every layer file's fingerprint, as a forger would (the
    tensors and their sha256 stay as saved)."""
    if manifest:
        data = json.loads((folder / checkpoints.MANIFEST).read_text())
        edit(data)
        (folder / checkpoints.MANIFEST).write_text(json.dumps(data))
    for layer in sorted(checkpoints.done_layers(folder)) if layers else ():
        path = checkpoints.layer_file(folder, layer)
        with safe_open(str(path), "pt") as fh:
            metadata = dict(fh.metadata())
        found = json.loads(metadata[checkpoints.FINGERPRINT])
        edit(found)
        metadata[checkpoints.FINGERPRINT] = json.dumps(found, sort_keys=True)
        save_file(load_file(str(path)), str(path), metadata=metadata)


def _change_one_byte(path: Path) -> None:
    """Flip the lowest bit of a byte in the middle of the file's tensor data (past its JSON header)."""
    blob = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", blob[:8])[0]
    blob[(start + len(blob)) // 2] ^= 1
    path.write_bytes(bytes(blob))


def _top_level(target: Path):
    """The feature map itself names a callable of an importable module, ``pwn.mkdir`` (see CALLABLE)."""
    return lambda data: data["feature_map"].update(_target_="pwn.mkdir", path=str(target))


def _nested(target: Path):
    """A component's value is a Hydra node that would call ``os.mkdir`` while the feature map is built."""
    return lambda data: data["feature_map"].update(hidden={"_target_": "os.mkdir", "path": str(target)})


def _command(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A real less-* command, with ``cwd/lib`` importable (where ``pwn`` lives), its runs under ``cwd``."""
    env = {**os.environ, "LESS_OUTPUT_DIR": str(cwd / "outputs"), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(cwd / "lib"), os.environ.get("PYTHONPATH")]))}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("LESS_DEBUG", None)
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def _prepare(name: str, trained: Path, root: Path) -> tuple[list[str], Path, str | None]:
    """A copy of ``trained`` changed as case ``name`` says: the command to run, its folder and the pattern of
    its one error line (None: it must succeed)."""
    cwd = root / name
    (cwd / "lib").mkdir(parents=True)
    (cwd / "lib" / "pwn.py").write_text(CALLABLE)
    folder = Path(shutil.copytree(trained, cwd / "ckpt"))
    evaluate = ["less-eval", *EVAL, f"checkpoint={folder}"]
    if name == "top-level":
        _edit_fingerprints(folder, _top_level(cwd / "pwned"))
        return evaluate, cwd, r"manifest\.json feature_map\._target_='pwn\.mkdir' is not an engine feature_map class " \
                              r".*less_exp\.state\.LessMLP.*; delete manifest\.json and rerun less-train with checkpoint="
    if name == "nested":
        _edit_fingerprints(folder, _nested(cwd / "pwned"))
        return evaluate, cwd, r"manifest\.json holds feature_map\.hidden\._target_, which is not plain data"
    if name == "layer-only":
        _edit_fingerprints(folder, _top_level(cwd / "pwned"), manifest=False)
        return evaluate, cwd, r"layer_000\.safetensors's fingerprint feature_map\._target_='pwn\.mkdir' is not an " \
                              r"engine feature_map class .*; retrain that layer: delete layer_000\.safetensors"
    if name == "junk-key":
        _edit_fingerprints(folder, lambda data: data.update(junk=1), layers=False)
        return evaluate, cwd, r"manifest\.json has unknown key 'junk' \(known: format, model, .*\); delete manifest\.json"
    if name in ("changed-byte", "changed-byte-init-from"):
        _change_one_byte(checkpoints.layer_file(folder, 1))
        if name == "changed-byte":
            return evaluate, cwd, CHANGED
        start = ["less-train", *TINY, "training=e2e", f"training.init_from={folder}", f"checkpoint={cwd / 'next'}"]
        return start, cwd, CHANGED
    return evaluate, cwd, None


CASES = ["top-level", "nested", "layer-only", "junk-key", "changed-byte", "changed-byte-init-from", "untouched"]


@pytest.fixture(scope="module")
def outcomes(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    prepared = {name: _prepare(name, trained, root) for name in CASES}
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(CASES, pool.map(lambda name: _command(*prepared[name][:2]), CASES)))
    return {name: (done[name], *prepared[name][1:]) for name in CASES}


@pytest.mark.parametrize("case", [c for c in CASES if c != "untouched"])
def test_a_crafted_checkpoint_is_one_line_and_nothing_it_names_is_called(outcomes, case):
    done, cwd, pattern = outcomes[case]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == 2, done.stderr[-1500:]
    assert "Traceback" not in done.stderr, done.stderr[-1500:]
    assert len(errors) == 1 and re.search(pattern, errors[0]), done.stderr[-1500:]
    assert f"checkpoint={cwd / 'ckpt'}" in errors[0]
    assert not (cwd / "pwned").exists()
    assert all(json.loads(p.read_text())["status"] != "ok" for p in cwd.rglob("results.json"))


def test_an_untouched_checkpoint_still_evaluates(outcomes):
    done, cwd, _ = outcomes["untouched"]
    assert done.returncode == 0, done.stderr[-1500:]
    results = [json.loads(p.read_text()) for p in (cwd / "outputs").rglob("results.json")]
    assert [r["status"] for r in results] == ["ok"]


@pytest.mark.parametrize("craft", [_top_level, _nested])
def test_through_hydra_the_crafted_components_would_run(tmp_path, monkeypatch, craft):
    """The witness that the cases above test something: Hydra, which built a checkpoint's components
    before, calls both crafted feature maps while building them."""
    from hydra.utils import instantiate

    (tmp_path / "pwn.py").write_text(CALLABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = {"feature_map": {"_target_": "less_exp.state.LessMLP", "hidden": 32}}
    craft(tmp_path / "pwned")(data)
    with contextlib.suppress(Exception):
        instantiate(data["feature_map"], head_dim=16, num_heads=2, num_kv_heads=1, _convert_="all")
    assert (tmp_path / "pwned").is_dir()


def test_the_allow_list_covers_every_configured_component():
    for group in checkpoints.COMPONENTS:
        for file in (Path(paths.conf_dir()) / group).glob("*.yaml"):
            target = OmegaConf.load(file).get("_target_")
            if target is not None:
                assert target in checkpoints.allowed(group), f"{file} names {target}, missing from ENGINE_CLASSES"
    assert "os.mkdir" not in checkpoints.allowed("feature_map")
    assert "less_exp.state.LessMLP" not in checkpoints.allowed("gating"), "a class is allowed in its own group only"


@pytest.mark.parametrize("edit, where", [
    (lambda m: m["normalizer"].update(_partial_=True), r"normalizer\._partial_"),
    (lambda m: m["feature_map"].update(sizes=[1, {"_args_": [2]}]), r"feature_map\.sizes\[1\]\._args_"),
    (lambda m: m["settings"].update(_recursive_=False), r"settings\._recursive_"),
    (lambda m: m["layers"]["0"].update(extra={"_target_": "os.system"}), r"layers\.0\.extra\._target_"),
])
def test_hydra_keys_anywhere_in_a_manifest_are_refused(trained, tmp_path, edit, where):
    folder = Path(shutil.copytree(trained, tmp_path / "ckpt"))
    _edit_fingerprints(folder, edit, layers=False)
    with pytest.raises(ConfigError, match=rf"checkpoint={folder}: manifest\.json holds {where}, which is not plain data"):
        checkpoints.read_manifest(folder)


def test_a_component_of_another_group_is_refused(trained, tmp_path):
    folder = Path(shutil.copytree(trained, tmp_path / "ckpt"))
    _edit_fingerprints(folder, lambda data: data["normalizer"].update(_target_="less_exp.state.LessMLP"))
    with pytest.raises(ConfigError, match=r"normalizer\._target_='less_exp\.state\.LessMLP' is not an engine normalizer class"):
        checkpoints.read_manifest(folder)
    with pytest.raises(ConfigError, match=r"layer_000\.safetensors's fingerprint normalizer\._target_"):
        checkpoints.read_layer(folder, 0)


def test_a_changed_layer_is_not_counted_as_done_and_retrains(trained, tmp_path, run_train):
    folder = Path(shutil.copytree(trained, tmp_path / "ckpt"))
    _change_one_byte(checkpoints.layer_file(folder, 1))
    with pytest.raises(ConfigError, match=CHANGED):
        run_train("training.epochs=1", checkpoint=folder)
    checkpoints.layer_file(folder, 1).unlink()
    again = run_train("training.epochs=1", checkpoint=folder)
    assert again["layers_trained"] == [1] and again["complete"]


def test_interpolating_toward_a_changed_checkpoint_is_refused(trained, tmp_path, compose_config):
    toward = Path(shutil.copytree(trained, tmp_path / "toward"))
    _change_one_byte(checkpoints.layer_file(toward, 1))
    overrides = [*(o for o in TINY if not o.startswith("training.")), "training=interpolate", "training.seq_len=64",
                 f"training.init_from={trained}", f"training.toward={toward}", "training.alpha=0.5",
                 f"checkpoint={tmp_path / 'mixed'}"]
    with pytest.raises(ConfigError, match=CHANGED):
        train_job.train(compose_config("train", overrides))
    assert not checkpoints.done_layers(tmp_path / "mixed")


def test_a_layer_file_without_its_tensor_hash_is_refused(trained, tmp_path, compose_config):
    folder = Path(shutil.copytree(trained, tmp_path / "old"))
    path = checkpoints.layer_file(folder, 0)
    with safe_open(str(path), "pt") as fh:
        metadata = {k: v for k, v in fh.metadata().items() if k != checkpoints.TENSORS_SHA256}
    save_file(load_file(str(path)), str(path), metadata=metadata)
    with pytest.raises(ConfigError, match=r"layer_000\.safetensors carries no tensors_sha256 .*older less-exp.*"
                                          r"delete layer_000\.safetensors and rerun less-train"):
        eval_job.evaluate(compose_config("eval", [*EVAL, f"checkpoint={folder}"]))


def test_an_untouched_checkpoint_loads_exactly_as_saved(trained, compose_config):
    cfg = compose_config("eval", [*EVAL, f"checkpoint={trained}", "model.dtype=float32"])
    manifest = checkpoints.check(cfg)
    model, _ = load_model(cfg.model)
    nodes = checkpoints.state_nodes(cfg, manifest)
    assert all(isinstance(node, dict) for node in nodes), "a checkpoint's components are data, built without Hydra"
    states = make_states(cfg, model, *nodes)
    checkpoints.load_into(states, trained, manifest, model=model)
    for layer, state in enumerate(states):
        own = state.state_dict()
        saved = load_file(str(checkpoints.layer_file(trained, layer)))
        assert set(saved) == set(own)
        assert all(torch.equal(own[k], v.to(own[k].dtype)) for k, v in saved.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_tensor_hash_holds_in_every_dtype_and_sees_one_bit(tmp_path, dtype):
    module = torch.nn.Linear(4, 3).to(dtype)
    tensors = {k: v.detach().clone() for k, v in module.state_dict().items()}
    path = checkpoints.layer_file(tmp_path, 0)
    save_file(tensors, str(path), metadata={checkpoints.TENSORS_SHA256: checkpoints.tensors_digest(tensors)})
    loaded = torch.nn.Linear(4, 3).to(dtype)
    checkpoints.load_layer(tmp_path, 0, loaded)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tensors.items())
    _change_one_byte(path)
    with pytest.raises(ConfigError, match=r"layer_000\.safetensors does not hold the tensors it was saved with"):
        checkpoints.load_layer(tmp_path, 0, loaded)


@pytest.mark.parametrize("group", ["feature_map", "normalizer", "reweighting", "gating"])
def test_every_configured_component_builds_the_same_from_checkpoint_data(group):
    """A checkpoint's component (a plain dict, built without Hydra) makes what its config makes through Hydra."""
    kwargs = dict(head_dim=16, num_heads=2, num_kv_heads=1, **({"features": 8} if group == "gating" else {}))
    for file in sorted((Path(paths.conf_dir()) / group).glob("*.yaml")):
        node = OmegaConf.load(file)
        if "_target_" not in node:
            continue
        through_hydra = factory._component(group, node, **kwargs)
        from_data = factory._component(group, OmegaConf.to_container(node, resolve=True), **kwargs)
        assert type(from_data) is type(through_hydra), file
        shapes = {k: v.shape for k, v in through_hydra.state_dict().items()}
        assert {k: v.shape for k, v in from_data.state_dict().items()} == shapes, file
