"""``task=stop_probability`` on a tiny model: the end-token probability after another run's summaries,
through the real evicting cache, checked against whole-sequence passes; row selection; bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from less_exp import eval as eval_job, factory, runtime
from less_exp.errors import ConfigError
from less_exp.models import end_token_ids, load_model
from less_exp.tasks.stop_probability import ROWS

PROMPT = "###\nArticle: {}\n\nSummarize the above article in 1 sentence.\n"
SUMMARIES = [
    "The council met on day 0.",             # kept
    "The council met on day 1 and",          # not ended at a sentence
    "It met. It met. It met. It met.",       # repeats itself
    "Day three was long!",                   # kept
    "A short one?",                          # kept
]


def article(i: int) -> str:
    return PROMPT.format(f"Story {i}: the council met on day {i}. " * (4 + 3 * i))


@pytest.fixture
def run_files(tmp_path_factory):
    """An articles file and the summaries.jsonl a summarization run on it would have written."""
    folder = tmp_path_factory.mktemp("data")
    articles = folder / "mini.jsonl"
    articles.write_text("".join(json.dumps({"article": article(i),
                                            "summary_gt": f"The council met on day {i}."}) + "\n" for i in range(5)))
    summaries = folder / "summaries.jsonl"
    rows = [{"index": i, "summary": s, "repeated_3gram_share": 0.5 if s.startswith("It met") else 0.0} for i, s in enumerate(SUMMARIES)]
    summaries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return articles, summaries


def overrides(articles, summaries, *extra):
    return ["model=tiny_llama", "logger=none", "task=stop_probability", f"task.data_path={articles}",
            f"task.summaries={summaries}", *extra]


def rows_of(folder):
    return {r["index"]: r for r in map(json.loads, (folder / ROWS).read_text().splitlines())}


def whole_pass_log_p_end(cfg, prompt: str, summary: str) -> tuple[float, bool]:
    """The reference: the model (compressed when ``cfg`` says so) over prompt + summary in one parallel
    pass; the log-probability of an end token and whether one is the most likely next token."""
    runtime.seed_everything(cfg.seed)  # the untrained state's initialisation, as the job draws it
    model, tokenizer = load_model(cfg.model)
    model = factory.apply(model, cfg)
    ids = tokenizer(prompt)["input_ids"] + tokenizer(summary, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ids]), use_cache=False).logits[0, -1].double().log_softmax(-1)
    ends = sorted(end_token_ids(model, tokenizer))
    return torch.logsumexp(logp[ends], -1).item(), int(logp.argmax()) in ends


@pytest.mark.parametrize("policy", [["policy=full"], ["policy=sink", "policy.sink=2", "policy.recent=24",
                                                       "feature_map=less_mlp", "feature_map.key_scale_init=1.0"]])
def test_end_probability_matches_a_whole_sequence_pass(compose_config, tmp_path, run_files, policy):
    """Decoding the summary through the real cache gives the parallel form's probability; only summaries
    that ended at a sentence without repeating are scored."""
    articles, summaries = run_files
    cfg = compose_config("eval", overrides(articles, summaries, *policy))
    metrics = eval_job.evaluate(cfg)
    rows = rows_of(tmp_path)
    assert sorted(rows) == [0, 3, 4] and metrics["num_samples"] == 3 and metrics["num_skipped"] == 2
    for i, row in rows.items():
        log_p, greedy = whole_pass_log_p_end(cfg, article(i), SUMMARIES[i])
        assert row["log_p_end"] == pytest.approx(log_p, abs=1e-4) and row["greedy_stop"] is greedy
        assert row["p_end"] == pytest.approx(math.exp(row["log_p_end"]))
    assert metrics["greedy_stop_share"] == sum(r["greedy_stop"] for r in rows.values()) / 3
    assert metrics["mean_log_p_end"] == pytest.approx(sum(r["log_p_end"] for r in rows.values()) / 3)
    assert metrics["longest_prompt_tokens"] == max(r["prompt_tokens"] for r in rows.values())
    if "policy=sink" in policy:  # the prompts are longer than the budget: eviction changes the answer
        full = [whole_pass_log_p_end(compose_config("eval", overrides(articles, summaries, "policy=full")), article(i), SUMMARIES[i])[0]
                for i in rows]
        assert max(abs(a - r["log_p_end"]) for a, r in zip(full, rows.values())) > 1e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_half_precision_gives_finite_probabilities_close_to_float32(compose_config, tmp_path, run_files, dtype):
    articles, summaries = run_files
    sink = ["policy=sink", "policy.sink=2", "policy.recent=24", "feature_map=less_mlp"]
    ref = eval_job.evaluate(compose_config("eval", overrides(articles, summaries, *sink, f"paths.output_dir={tmp_path / 'f32'}")))
    got = eval_job.evaluate(compose_config("eval", overrides(articles, summaries, *sink, f"model.dtype={dtype}",
                                                             f"paths.output_dir={tmp_path / dtype}")))
    assert math.isfinite(got["mean_log_p_end"]) and 0 < got["mean_p_end"] < 1
    assert got["mean_log_p_end"] == pytest.approx(ref["mean_log_p_end"], abs=0 if dtype == "float32" else 0.01)


def test_killed_job_resumes_and_other_summaries_are_not_reused(compose_config, tmp_path, run_files, capsys):
    articles, summaries = run_files
    sink = ["policy=sink", "policy.sink=2", "policy.recent=24"]
    whole = eval_job.evaluate(compose_config("eval", overrides(articles, summaries, *sink, f"paths.output_dir={tmp_path / 'whole'}")))
    killed = tmp_path / "killed"
    eval_job.evaluate(compose_config("eval", overrides(articles, summaries, *sink, f"paths.output_dir={killed}")))
    lines = (killed / ROWS).read_text().splitlines()
    (killed / ROWS).write_text(lines[0] + "\n" + lines[1][:20])  # one row, then a half-written one
    resumed = eval_job.evaluate(compose_config("eval", overrides(articles, summaries, *sink, f"paths.output_dir={killed}")))
    assert "resuming, 1 of 3 samples" in capsys.readouterr().out
    assert rows_of(killed) == rows_of(tmp_path / "whole") and resumed["mean_log_p_end"] == whole["mean_log_p_end"]
    summaries.write_text(summaries.read_text().replace("The council met on day 0.", "The council met again."))
    eval_job.evaluate(compose_config("eval", overrides(articles, summaries, *sink, f"paths.output_dir={killed}")))
    assert "3 rows of another configuration or data file are not reused" in capsys.readouterr().out
    assert rows_of(killed)[0]["log_p_end"] != rows_of(tmp_path / "whole")[0]["log_p_end"]


def test_rows_without_their_repetition_get_it_measured(compose_config, tmp_path, run_files):
    """A summaries file of an older run (no repeated_3gram_share) still skips the summary that repeats itself."""
    articles, summaries = run_files
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({"index": i, "summary": s}) + "\n" for i, s in enumerate(SUMMARIES)))
    metrics = eval_job.evaluate(compose_config("eval", overrides(articles, bare)))
    assert sorted(rows_of(tmp_path)) == [0, 3, 4] and metrics["num_skipped"] == 2


def test_max_prompt_tokens_skips_longer_prompts(compose_config, tmp_path, run_files):
    articles, summaries = run_files
    metrics = eval_job.evaluate(compose_config("eval", overrides(articles, summaries, "task.max_prompt_tokens=200")))
    kept = rows_of(tmp_path)
    assert kept and all(r["prompt_tokens"] <= 200 for r in kept.values()) and len(kept) < 3
    assert metrics["num_skipped"] == 5 - len(kept)


@pytest.mark.parametrize("setting, content, match", [
    ("task.summaries=/no/such/summaries.jsonl", None, "task.summaries=/no/such/summaries.jsonl is not a file"),
    ("task.max_repetition=2", None, "task.max_repetition=2 must be a number in"),
    ("task.max_prompt_tokens=0", None, "task.max_prompt_tokens=0 must be a positive integer"),
    (None, '{"index": 0}\n', "line 1 is not a summaries.jsonl row"),
    (None, '{"index": 9, "summary": "Far away."}\n', "sample 9 is not in xsum test \\(5 records\\)"),
    (None, '{"index": 1, "summary": "no sentence end"}\n', "no summary ends a sentence"),
])
def test_bad_settings_and_files_fail_naming_them(compose_config, tmp_path, run_files, setting, content, match):
    articles, summaries = run_files
    if content is not None:
        summaries = tmp_path / "bad.jsonl"
        summaries.write_text(content)
    with pytest.raises(ConfigError, match=match):
        eval_job.evaluate(compose_config("eval", overrides(articles, summaries, *([setting] if setting else []))))
