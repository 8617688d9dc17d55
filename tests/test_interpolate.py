"""training=interpolate: states between two checkpoints of one set-up, exact at both ends, refused for
checkpoints of different set-ups before the model loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_training import EVAL, TINY, train_checkpoint

from less_exp import checkpoints, eval as eval_job, train as train_job
from less_exp.errors import ConfigError
from less_exp.training import interpolate


@pytest.fixture(scope="module")
def ends(tmp_path_factory):
    """Two tiny two-layer checkpoints of one set-up, trained from different seeds."""
    start = train_checkpoint(tmp_path_factory.mktemp("start"), "training.epochs=2")
    end = train_checkpoint(tmp_path_factory.mktemp("end"), "training.epochs=2", "seed=1")
    return start, end


def _tensors(root):
    return {layer: load_file(str(checkpoints.layer_file(root, layer))) for layer in sorted(checkpoints.done_layers(root))}


def _mix_job(compose_config, ends, alpha, out, *extra):
    overrides = ["model=tiny_llama", "logger=none", "policy=sink", "policy.recent=8", "feature_map.hidden=32",
                 "feature_map.dropout=0", "feature_map.key_scale_init=1.0", "training=interpolate", "training.seq_len=64",
                 f"training.init_from={ends[0]}", f"training.toward={ends[1]}", f"training.alpha={alpha}",
                 f"checkpoint={out}", *extra]
    return train_job.train(compose_config("train", overrides))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mix_is_exact_at_the_ends_and_rounds_once_between(dtype):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 8, generator=g) * 3).to(dtype), (torch.randn(64, 8, generator=g) * 3).to(dtype)
    assert torch.equal(interpolate.mix(a, b, 0.0), a) and torch.equal(interpolate.mix(a, b, 1.0), b)
    got = interpolate.mix(a, b, 0.3)
    assert got.dtype == dtype
    exact = 0.7 * a.double() + 0.3 * b.double()  # one rounding away, so within one unit of the dtype's precision
    torch.testing.assert_close(got.double(), exact, rtol=torch.finfo(dtype).eps, atol=0)


def test_fixed_tensors_are_kept_and_must_agree():
    a = {"w": torch.zeros(3), "omega": torch.ones(2, 3), "count": torch.tensor([3, 4])}
    b = {"w": torch.ones(3), "omega": torch.ones(2, 3), "count": torch.tensor([3, 4])}
    got = interpolate.mix_layer(a, b, 0.25, fixed={"omega"})
    assert torch.equal(got["w"], torch.full((3,), 0.25)) and torch.equal(got["omega"], a["omega"])
    assert torch.equal(got["count"], a["count"])
    for name in ("omega", "count"):
        other = {**b, name: b[name] + 1}
        with pytest.raises(ValueError, match=f"fixed tensor {name} differs"):
            interpolate.mix_layer(a, other, 0.25, fixed={"omega"})


def test_interpolated_checkpoint_is_the_mix_of_its_ends(compose_config, ends, tmp_path):
    start, end = _tensors(ends[0]), _tensors(ends[1])
    assert any(not torch.equal(start[0][k], end[0][k]) for k in start[0])  # the two ends differ
    for alpha in (0.0, 0.25, 1.0):
        out = tmp_path / f"mix{alpha}"
        metrics = _mix_job(compose_config, ends, alpha, out)
        assert metrics["complete"] and metrics["alpha"] == alpha
        got = _tensors(out)
        for layer, tensors in got.items():
            for name, value in tensors.items():
                expected = torch.lerp(start[layer][name].double(), end[layer][name].double(), alpha).to(value.dtype)
                assert torch.equal(value, expected), (alpha, layer, name)
        training = checkpoints.read_manifest(out)["training"]
        assert training == {"mode": "interpolate", "data": "wikitext2", "init_from": str(ends[0].resolve()),
                            "toward": str(ends[1].resolve()), "alpha": alpha}
    # what less-eval measures with the ends of the line is what it measures with the checkpoints themselves
    for alpha, own in ((0.0, ends[0]), (1.0, ends[1])):
        mixed = eval_job.evaluate(compose_config("eval", [*EVAL, f"checkpoint={tmp_path / f'mix{alpha}'}"]))
        direct = eval_job.evaluate(compose_config("eval", [*EVAL, f"checkpoint={own}"]))
        assert mixed["perplexity"] == direct["perplexity"]


def test_interpolation_is_evaluated_in_the_same_job(compose_config, ends, tmp_path):
    metrics = _mix_job(compose_config, ends, 0.5, tmp_path / "mix", "task=perplexity", "task.seq_len=64",
                       "task.max_windows=2")
    evaluation = metrics["evaluation"]
    assert evaluation["perplexity"] > 1 and evaluation["state_token_equivalents"] == metrics["state_token_equivalents"]


def _foreign(root, tmp_path):
    """A copy of ``root`` whose manifest says its states were trained with 4 features a head."""
    copy = tmp_path / "foreign"
    shutil.copytree(root, copy)
    manifest = json.loads((copy / checkpoints.MANIFEST).read_text())
    manifest["feature_map"]["features"] = 4
    (copy / checkpoints.MANIFEST).write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("change, message", [
    ({"toward": None}, r"training.toward is not set"),
    ({"init_from": "nowhere"}, r"training.init_from=nowhere: no manifest.json there"),
    ({"alpha": 1.5}, r"training.alpha=1.5 must be a number in \[0, 1\]"),
    ({"alpha": True}, r"training.alpha=True must be a number"),
    ({"toward": "foreign"}, r"training.toward=.*foreign holds states trained with feature_map.features=4, but "
                            r"training.init_from=.* holds feature_map.features=8"),
])
def test_bad_settings_are_refused_before_the_model_loads(compose_config, ends, tmp_path, monkeypatch, change, message):
    monkeypatch.setattr(train_job, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    settings = {"init_from": str(ends[0]), "toward": str(ends[1]), "alpha": 0.5, **change}
    if settings["toward"] == "foreign":
        settings["toward"] = str(_foreign(ends[1], tmp_path))
    overrides = ["model=tiny_llama", "logger=none", "training=interpolate", f"checkpoint={tmp_path / 'out'}",
                 *(f"training.{key}={'null' if value is None else value}" for key, value in settings.items())]
    with pytest.raises(ConfigError, match=message):
        train_job.train(compose_config("train", overrides))


def test_ends_with_different_fixed_features_are_refused(compose_config, tmp_path):
    """Performer's random projection is a buffer: two checkpoints whose projections differ have no states between them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    performer = ["feature_map=performer", "feature_map.features=4"]
    tiny = [o for o in TINY if not o.startswith("feature_map.")] + performer + ["training.epochs=1"]
    start, end = tmp_path / "a", tmp_path / "b"
    train_job.train(compose_config("train", [*tiny, f"checkpoint={start}"]))
    train_job.train(compose_config("train", [*tiny, "seed=1", f"checkpoint={end}"]))
    path = checkpoints.layer_file(end, 1)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    (name,) = [k for k in tensors if k.endswith("omega")]
    forged = {**tensors, name: -tensors[name]}
    save_file(forged, str(path), metadata={**meta, checkpoints.TENSORS_SHA256: checkpoints.tensors_digest(forged)})
    overrides = ["model=tiny_llama", "logger=none", "policy=sink", "policy.recent=8", *performer, "training=interpolate",
                 "training.seq_len=64", f"training.init_from={start}", f"training.toward={end}",
                 f"checkpoint={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match=rf"layer 1: its fixed tensor {name} differs between the two ends"):
        train_job.train(compose_config("train", overrides))
