"""lm-eval on the in-memory (compressed) model agrees with the project's own perplexity task."""

from __future__ import annotations

import json
import math

import pytest
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from less_exp import data, eval as eval_job
from less_exp.errors import ConfigError, UnavailableError
from less_exp.tasks.perplexity import rolling_windows

TINY = ["model=tiny_llama", "task.seq_len=64", "task.max_windows=3", "logger=none"]
LESS = ["policy=h2o", "policy.heavy=8", "policy.recent=8", "feature_map=less_mlp", "feature_map.key_scale_init=1.0"]


@pytest.mark.parametrize("n", [1, 5, 64, 65, 128, 130, 200])
def test_rolling_windows_match_lm_eval(n):
    ids = list(range(100, 100 + n))
    ours = rolling_windows(ids, 7, 64)
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 7, 64, 1)]
    assert [t for _, t in ours] == [t for _, t in theirs]
    for (inputs, targets), (context, continuation) in zip(ours, theirs):
        # lm-eval scores (context + continuation)[:-1] truncated to max_length from the left.
        assert inputs == (context + continuation)[:-1][-64:]
    assert sum(len(t) for _, t in ours) == n


@pytest.mark.parametrize("policy", [[], LESS], ids=["full", "h2o+less"])
def test_harness_word_perplexity_equals_rolling_perplexity_task(compose_config, policy):
    harness = eval_job.evaluate(compose_config("eval", [*TINY, *policy, "task=wikitext_harness"]))
    own = eval_job.evaluate(compose_config("eval", [*TINY, *policy, "task=perplexity", "task.windows=rolling"]))
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"):
        assert harness[key] == pytest.approx(own[key], rel=2e-5), key
    assert (harness["num_words"], harness["num_bytes"], harness["num_tokens"]) == (own["num_words"], own["num_bytes"], own["num_tokens"])
    assert harness["bits_per_byte"] == pytest.approx(math.log2(harness["byte_perplexity"]), rel=1e-6)


def test_harness_sees_the_compression(compose_config):
    full = eval_job.evaluate(compose_config("eval", [*TINY, "task=wikitext_harness"]))
    evicting = eval_job.evaluate(compose_config("eval", [*TINY, "task=wikitext_harness", "policy=window", "policy.recent=8"]))
    assert evicting["word_perplexity"] != pytest.approx(full["word_perplexity"], rel=1e-4)
    assert evicting["policy"] == "window" and evicting["budget"] == 8


def test_disjoint_and_rolling_score_the_same_text(compose_config, tmp_path):
    disjoint = eval_job.evaluate(compose_config("eval", [*TINY, "task=perplexity"]))
    rolling = eval_job.evaluate(compose_config("eval", [*TINY, "task=perplexity", "task.windows=rolling"]))
    assert (disjoint["num_words"], disjoint["num_bytes"]) == (rolling["num_words"], rolling["num_bytes"])
    assert (disjoint["num_tokens"], rolling["num_tokens"]) == (3 * 63, 3 * 64)
    total = disjoint["nll"] * disjoint["num_tokens"]
    assert disjoint["word_perplexity"] == pytest.approx(math.exp(total / disjoint["num_words"]))
    assert disjoint["byte_perplexity"] == pytest.approx(math.exp(total / disjoint["num_bytes"]))


def test_harness_writes_its_results_and_task_yaml(compose_config, tmp_path):
    eval_job.evaluate(compose_config("eval", [*TINY, "task=wikitext_harness"]))
    raw = json.loads((tmp_path / "harness_results.json").read_text())
    assert "word_perplexity,none" in raw["less_wikitext"]
    doc = json.loads((tmp_path / "harness_tasks" / "less_wikitext.jsonl").read_text())
    cfg = compose_config("eval", TINY)
    text = data.load_text(cfg.data, "test")
    assert 100 < len(doc["page"]) < 1000 and text.startswith(doc["page"])


def test_hub_tasks_offline_fail_before_the_model_loads(compose_config, monkeypatch):
    from less_exp import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(eval_job, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    with pytest.raises(UnavailableError, match="hellaswag.*not reachable.*wikitext_harness"):
        eval_job.evaluate(compose_config("eval", ["model=tiny_llama", "logger=none", "task=harness", "task.names=[hellaswag]"]))


def test_harness_bad_values_fail_before_the_model_loads(compose_config):
    with pytest.raises(ConfigError, match="hellaswagg.*did you mean"):
        eval_job.evaluate(compose_config("eval", ["model=tiny_llama", "logger=none", "task=harness", "task.names=[hellaswagg]"]))
    with pytest.raises(ConfigError, match="task.seq_len"):
        eval_job.evaluate(compose_config("eval", ["model=tiny_llama", "logger=none", "task=wikitext_harness", "task.seq_len=100000"]))
    with pytest.raises(ConfigError, match="task.windows"):
        eval_job.evaluate(compose_config("eval", [*TINY, "task.windows=sliding"]))


def test_harness_generation_uses_the_evicting_cache(compose_config, tmp_path, monkeypatch):
    """A generate_until task of one's own (task.include_path) decodes through LessCache: targets set to
    what greedy decoding through the evicting cache gives (two of three) score exactly 2/3."""
    import torch

    from less_exp.adapter import LessCache, cache_kwargs
    from less_exp.adapter.cache import LessCacheLayer
    from less_exp.factory import apply
    from less_exp.models import load_model

    overrides = ["model=tiny_llama", "logger=none", "task=harness", "task.names=[tiny_count]",
                 "task.seq_len=256", "policy=h2o", "policy.heavy=4", "policy.recent=4"]
    cfg = compose_config("eval", overrides)
    model, tok = load_model(cfg.model)
    apply(model, cfg)
    questions = [f"Count: {i} {i + 1} {i + 2} {i + 3}" for i in range(3)]
    answers = []
    for q in questions:
        ids = tok(q, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                 **cache_kwargs(LessCache(model)))
        answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0])
    answers[2] = answers[2] + "never generated"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in zip(questions, answers)))
    (tasks / "count.yaml").write_text(
        "task: tiny_count\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(tasks / 'docs.jsonl'))}}}}}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\n"
        "generation_kwargs: {until: ['\\n'], max_gen_toks: 6, do_sample: false}\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n"
    )
    steps = []
    attend = LessCacheLayer.attend
    monkeypatch.setattr(LessCacheLayer, "attend", lambda self, *a, **k: steps.append(1) or attend(self, *a, **k))
    metrics = eval_job.evaluate(compose_config("eval", [*overrides, f"task.include_path={tasks}"]))
    assert metrics["tiny_count/exact_match"] == pytest.approx(2 / 3)
    assert steps, "generation must decode through the evicting cache"
    assert metrics["policy"] == "h2o"
