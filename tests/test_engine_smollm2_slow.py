"""The compression engine on the embedded SmolLM2 (slow: a few minutes on 2 CPU cores)."""

import pytest
import torch

from less_exp.adapter import build
from less_exp.models import load_model
from less_exp.policies import H2O, TOVA, Full, Sink, Window
from less_exp.state import JointNormalizer, LessMLP, LessStates
from less_exp.tasks.consistency import max_abs_logit_diff

pytestmark = pytest.mark.slow

POLICIES = [Full(), Window(recent=30), Sink(sink=4, recent=30), H2O(heavy=16, recent=16), TOVA(heavy=32)]


@pytest.fixture(scope="module")
def smollm2(compose_config):
    return load_model(compose_config("eval", ["model=smollm2_135m"]).model)


@pytest.fixture(scope="module")
def compose_config(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from less_exp import paths

    def _compose(name, overrides):
        with initialize_config_dir(config_dir=paths.conf_dir(), version_base="1.3"):
            return compose(name, overrides=overrides)

    return _compose


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
@pytest.mark.parametrize("with_state", [False, True], ids=["plain", "less"])
def test_smollm2_parallel_and_decoding_agree(smollm2, policy, with_state):
    model, tokenizer = smollm2
    text = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 12
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :160]
    torch.manual_seed(0)
    states = LessStates.build(lambda: LessMLP(64, 9, 3, key_scale_init=1.0, dropout=0.0), JointNormalizer, 30, 64)
    build(model, policy, states.eval() if with_state else None)
    assert max_abs_logit_diff(model, ids, prefill=40) < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("policy", [Sink(sink=4, recent=30), H2O(heavy=16, recent=16)], ids=lambda p: p.name)
def test_smollm2_forms_agree_in_half_precision(compose_config, dtype, policy):
    """On the real model in half precision, chunked decoding with a padded row stays within the dtype's
    own noise, what sdpa + DynamicCache show on the same tokens: twice it for sink; four times for H2O,
    whose ranking sees that noise in the model's own queries and keys and may break a near-tie the
    other way (measured: 2.0x in bfloat16, 3.1x in float16)."""
    from less_exp.tasks.consistency import batch, sdpa_logit_diff

    model, tokenizer = load_model(compose_config("eval", ["model=smollm2_135m", f"model.dtype={str(dtype)[6:]}"]).model)
    text = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 12
    x, mask = batch(tokenizer(text, return_tensors="pt").input_ids[:, :128], pad=20, pad_token_id=tokenizer.pad_token_id)
    floor = sdpa_logit_diff(model, x, mask, prefill=10, chunk=8)
    torch.manual_seed(0)
    states = LessStates.build(lambda: LessMLP(64, 9, 3, key_scale_init=1.0, dropout=0.0), JointNormalizer, 30, 64)
    build(model, policy, states.eval())
    factor = 4 if policy.uses_scores else 2
    assert max_abs_logit_diff(model, x, mask, prefill=10, chunk=8) <= factor * floor
