"""The Python API: ``less_exp.compress`` on a model the caller built, against less-eval's own path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tiny_training import train_checkpoint

import less_exp
from less_exp import eval as eval_job, paths, tiny
from less_exp.adapter import compression_of
from less_exp.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPTS = ["The history of the Roman Empire", "In a surprising"]  # unequal lengths: the batch is left-padded
NEW_TOKENS = 20
H2O = {"heavy": 6, "recent": 6}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(dtype)``: the tiny sink checkpoint (recent=8) trained on tiny_llama loaded in ``dtype``."""
    made = {}

    def _trained(dtype: str) -> Path:
        if dtype not in made:
            made[dtype] = train_checkpoint(tmp_path_factory.mktemp(f"trained_{dtype}"), "training.epochs=1",
                                           "logger=none", f"model.dtype={dtype}")
        return made[dtype]

    return _trained


def user_model(dtype: str = "float32", seed: int = 0, name: str = "tiny_llama"):
    """The tiny model as a user would hold it: built with transformers, in eval mode, nothing of less-exp applied."""
    cfg = OmegaConf.load(Path(paths.conf_dir()) / "model" / f"{name}.yaml")
    cfg.seed = seed
    model, tokenizer = tiny.build_tiny(cfg, DTYPES[dtype])
    return model.eval(), tokenizer


def generate(model, tokenizer, **kwargs):
    """Greedy continuations of PROMPTS (token ids) and every step's logits."""
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**batch, **kwargs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    return out.sequences[:, batch.input_ids.shape[1]:], torch.stack(out.scores)


def eval_outputs(compose_config, tmp_path, *overrides) -> list[str]:
    """What less-eval's generate task writes for PROMPTS."""
    cfg = compose_config("eval", ["model=tiny_llama", "logger=none", "task=generate", f"task.prompts={json.dumps(PROMPTS)}",
                                  f"task.max_new_tokens={NEW_TOKENS}", "task.batch_size=2", *overrides])
    eval_job.evaluate(cfg)
    rows = Path(cfg.paths.output_dir, "generations.jsonl").read_text().splitlines()
    return [json.loads(row)["output"] for row in rows]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("with_checkpoint", [False, True], ids=["plain_h2o", "sink_checkpoint"])
def test_compressed_generate_gives_less_evals_tokens(compose_config, tmp_path, trained, dtype, with_checkpoint):
    model, tokenizer = user_model(dtype)
    full, _ = generate(model, tokenizer)
    if with_checkpoint:
        ckpt = trained(dtype)
        compressed = less_exp.compress(model, checkpoint=ckpt)  # policy and budget from the manifest
        overrides = ["policy=sink", "policy.recent=8", f"checkpoint={ckpt}"]
    else:
        compressed = less_exp.compress(model, "h2o", **H2O)
        overrides = ["policy=h2o", *(f"policy.{k}={v}" for k, v in H2O.items())]
    tokens, logits = generate(model, tokenizer, **compressed.generate_kwargs())
    assert torch.isfinite(logits).all()
    assert not torch.equal(tokens, full)  # the budget is well below the prompts plus new tokens: eviction shows
    expected = eval_outputs(compose_config, tmp_path, f"model.dtype={dtype}", *overrides)
    assert tokenizer.batch_decode(tokens, skip_special_tokens=True) == expected
    summary = compressed.describe(64)
    assert summary["policy"] == ("sink" if with_checkpoint else "h2o")
    assert (summary["state_features"] > 0) == with_checkpoint


def test_remove_restores_the_full_cache_and_the_attention_implementation():
    model, tokenizer = user_model()
    model.set_attn_implementation("eager")
    ids = tokenizer(PROMPTS[:1], return_tensors="pt").input_ids
    with torch.inference_mode():
        before = model(ids).logits
    full, _ = generate(model, tokenizer)
    with less_exp.compress(model, "sink", sink=2, recent=4) as compressed:
        assert compressed.compressing and model.config._attn_implementation == "less"
        with torch.inference_mode():
            assert not torch.allclose(model(ids).logits, before)
    assert compression_of(model) is None and model.config._attn_implementation == "eager"
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)
    assert torch.equal(generate(model, tokenizer)[0], full)
    less_exp.compress(model, "h2o", **H2O).remove()  # a removed model can be compressed again


def test_full_policy_without_a_state_leaves_the_model_alone():
    model, tokenizer = user_model()
    full, _ = generate(model, tokenizer)
    compressed = less_exp.compress(model, "full")
    assert not compressed.compressing and compressed.generate_kwargs() == {}
    assert torch.equal(generate(model, tokenizer, **compressed.generate_kwargs())[0], full)


def test_a_policy_object_is_the_preset_it_equals():
    from less_exp.policies import H2O as H2OPolicy

    model, tokenizer = user_model()
    with less_exp.compress(model, H2OPolicy(**H2O)) as by_object:
        assert by_object.config.policy._target_ == "less_exp.policies.H2O"
        tokens = generate(model, tokenizer, **by_object.generate_kwargs())[0]
    by_name = less_exp.compress(model, "h2o", **H2O)
    assert torch.equal(tokens, generate(model, tokenizer, **by_name.generate_kwargs())[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy": "h20"}, "policy='h20' is not a preset of conf/policy/; choose one of full, h2o, sink, tova, window"),
        ({"policy": "h2o", "heavi": 5}, "compress: unknown setting heavi=5; known: sink, heavy, recent"),
        ({"policy": "h2o", "heavy": -1}, "policy=h2o: policy.heavy must be >= 0, got -1"),
        ({"policy": "h2o", "feature_map": {"name": "less_mlp", "hiden": 8}}, "compress: feature_map has no setting hiden=8"),
        ({"policy": "h2o", "baseline_plus": True}, "policy.baseline_plus=true needs a feature_map"),
        ({}, "compress: give policy= (one of full, h2o, sink, tova, window) or checkpoint="),
    ],
)
def test_a_wrong_argument_is_one_config_error_line(kwargs, message):
    model, _ = user_model()
    with pytest.raises(ConfigError) as err:
        less_exp.compress(model, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert compression_of(model) is None and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ({"seed": 1}, "the states belong to another model"),  # same shapes, other weights
        ({"dtype": "bfloat16"}, "the states belong to another model"),  # float32-trained weights rounded to bfloat16
        ({"name": "tiny_qwen2"}, "the states belong to another model"),
    ],
)
def test_a_checkpoint_for_another_model_is_refused(trained, model_args, message):
    model, _ = user_model(**model_args)
    with pytest.raises(ConfigError) as err:
        less_exp.compress(model, checkpoint=trained("float32"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert compression_of(model) is None and model.config._attn_implementation == "sdpa"


def test_a_checkpoint_is_checked_against_the_policy_as_less_eval_checks_it(trained):
    model, _ = user_model()
    with pytest.raises(ConfigError, match="^checkpoint=.* was trained with policy=sink .*checkpoint_budget=any"):
        less_exp.compress(model, "sink", checkpoint=trained("float32"))  # the preset's recent=100, trained at 8
    compressed = less_exp.compress(model, "sink", checkpoint=trained("float32"), recent=16, checkpoint_budget="any")
    assert compressed.describe(64)["recent"] == 16 and compressed.describe(64)["state_features"] > 0
