"""The engine's tasks end to end on a tiny model through the eval job."""

import json
from pathlib import Path

import pytest

from less_exp.errors import ConfigError
from less_exp.eval import evaluate

TINY = ["model=tiny_llama", "logger=none", "policy=h2o", "policy.heavy=8", "policy.recent=8"]


def test_consistency_task(compose_config):
    metrics = evaluate(compose_config("eval", [*TINY, "feature_map=less_mlp", "task=consistency",
                                               "task.seq_len=96", "task.prefill=24"]))
    assert metrics["max_abs_logit_diff"] < 1e-4 and metrics["num_tokens"] == 96


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("policy", ["sink", "h2o", "tova"])
def test_consistency_task_in_every_dtype_with_chunks_and_padding(compose_config, dtype, policy):
    """Chunked decoding and a left-padded row whose padding outlasts the prefill: within the dtype's own
    noise (sdpa + DynamicCache on the same tokens), and below 1e-3 in float32."""
    overrides = ["model=tiny_llama", "logger=none", f"policy={policy}", "feature_map=less_mlp",
                 "feature_map.key_scale_init=1.0", f"model.dtype={dtype}", "task=consistency", "task.seq_len=80",
                 "task.prefill=6", "task.chunk=5", "task.pad=11"]
    overrides += {"sink": ["policy.recent=8"], "h2o": ["policy.heavy=6", "policy.recent=2"],
                  "tova": ["policy.heavy=6", "policy.recent=1"]}[policy]
    metrics = evaluate(compose_config("eval", overrides))
    bound = 1e-3 if dtype == "float32" else 2 * metrics["sdpa_logit_diff"] + 1e-2
    assert metrics["max_abs_logit_diff"] <= bound
    assert metrics["pad"] == 11 and metrics["chunk"] == 5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_less_perplexity_is_finite_and_close_to_float32(compose_config, dtype):
    """Every float16 LESS run used to give NaN (the state's empty denominator was clamped to 1e-30)."""
    base = [*TINY, "feature_map=less_mlp", "task.seq_len=128", "task.max_windows=2"]
    ref = evaluate(compose_config("eval", base))["perplexity"]
    half = evaluate(compose_config("eval", [*base, f"model.dtype={dtype}"]))["perplexity"]
    assert half == pytest.approx(ref, rel=0.01)


def test_generate_task_writes_generations(compose_config, tmp_path):
    metrics = evaluate(compose_config("eval", [*TINY, "task=generate", "task.max_new_tokens=24"]))
    rows = [json.loads(line) for line in Path(tmp_path, "generations.jsonl").read_text().splitlines()]
    assert metrics["num_prompts"] == len(rows) == 2
    assert metrics["new_tokens"] > 0 and all(row["output"] for row in rows)
    for metric in ("words", "repeated_3gram_share", "longest_repeat"):
        assert metrics[metric] == pytest.approx(sum(row[metric] for row in rows) / 2)
    assert all(row["words"] > 0 for row in rows)


def test_bench_task_shows_flat_memory_for_the_policy(compose_config):
    metrics = evaluate(compose_config("eval", [*TINY, "task=bench", "task.context_lengths=[64,256]",
                                               "task.decode_tokens=6", "task.warmup_tokens=2",
                                               "task.prefill_chunk=64", "task.memory_cap_gb=0.02",
                                               "task.max_batch=300", "task.throughput_tokens=2"]))
    assert metrics["policy/64/cache_mb"] == metrics["policy/256/cache_mb"]
    # under a 20 MB cap the full cache's rows grow with the context, the policy's do not
    assert metrics["full/256/throughput_batch"] < metrics["full/64/throughput_batch"] <= 300
    assert metrics["policy/256/throughput_batch"] == metrics["policy/64/throughput_batch"] > metrics["full/256/throughput_batch"]
    assert all(metrics[f"{m}/256/throughput_tokens_per_s"] > 0 for m in ("full", "policy", "less"))
    assert metrics["policy/256/throughput_vs_full"] == pytest.approx(
        metrics["policy/256/throughput_tokens_per_s"] / metrics["full/256/throughput_tokens_per_s"])
    assert all(metrics[f"{m}/256/prefill_peak_mb"] >= 0 for m in ("full", "policy", "less"))
    assert metrics["less/64/cache_mb"] == metrics["less/256/cache_mb"] > metrics["policy/64/cache_mb"]
    assert metrics["full/256/cache_mb"] == pytest.approx(4 * metrics["full/64/cache_mb"], rel=0.1)
    assert metrics["state_token_equivalents"] > 0


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["task=bench", "task.context_lengths=[64]", "policy=full"], "compares the full cache"),
        (["task=bench", "task.context_lengths=[8]"], "shortest context"),
        (["task=consistency", "policy=full"], "policy other"),
        (["task=consistency", "task.prefill=0"], "task.prefill"),
        (["task=consistency", "policy.ratio_of=length", "policy.heavy=0.1", "policy.recent=0.1"], "ratio_of=length"),
        (["task=consistency", "task.chunk=0"], "task.chunk"),
        (["task=consistency", "task.pad=-1"], "task.pad"),
    ],
)
def test_engine_tasks_reject_bad_configs(compose_config, overrides, match):
    with pytest.raises(ConfigError, match=match):
        evaluate(compose_config("eval", [*TINY, *overrides]))
