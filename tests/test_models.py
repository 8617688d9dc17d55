"""Model presets: tiny ones build and run, the embedded one loads from its cache, hub ones fail fast offline."""

from __future__ import annotations

import time

import pytest
import torch
from omegaconf import OmegaConf

from less_exp import embedded, paths
from less_exp.errors import UnavailableError
from less_exp.models import check_available, load_model
from less_exp.tiny import byte_tokenizer


def preset(name: str):
    return OmegaConf.load(paths.CONF_DIR / "model" / f"{name}.yaml")


def presets(source: str) -> list[str]:
    return sorted(p.stem for p in (paths.CONF_DIR / "model").glob("*.yaml") if preset(p.stem).source == source)


@pytest.mark.parametrize("name", presets("tiny"))
def test_tiny_preset_builds_and_runs(compose_config, name):
    cfg = compose_config("eval", [f"model={name}"])
    model, tokenizer = load_model(cfg.model)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    batch = tokenizer(["a longer first line", "short"], return_tensors="pt", padding=True)
    logits = model(**batch, use_cache=False).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_tiny_presets_include_gqa_and_mha():
    groups = {name: preset(name).config for name in presets("tiny")}
    assert any(c.num_key_value_heads < c.num_attention_heads for c in groups.values())
    assert any(c.num_key_value_heads == c.num_attention_heads for c in groups.values())


def test_tiny_model_is_seeded_and_leaves_global_rng_alone(compose_config):
    cfg = compose_config("eval", ["model=tiny_llama"])
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first, _ = load_model(cfg.model)
    assert torch.equal(torch.rand(1), expected)
    second, _ = load_model(cfg.model)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = byte_tokenizer()
    text = "Größe = 3 @-@ <unk>\n\t✓"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("name", presets("hub"))
def test_hub_preset_fails_fast_offline(name):
    cfg = preset(name)
    assert "/" in cfg.hub_id and cfg.dtype in ("float16", "bfloat16") and cfg.max_length >= 2048
    started = time.perf_counter()
    with pytest.raises(UnavailableError, match="model=smollm2_135m") as err:
        check_available(cfg)
    assert cfg.hub_id in str(err.value)
    assert time.perf_counter() - started < 5


def test_smollm2_loads_from_cache():
    cfg = preset("smollm2_135m")
    if not embedded.is_prepared(cfg, paths.cache_dir()):
        pytest.skip("embedded model not converted yet (scripts/setup.sh does it)")
    model, tokenizer = load_model(cfg)
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids, use_cache=False).logits
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
