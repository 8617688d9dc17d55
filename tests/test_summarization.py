"""Summarization tasks on a tiny model: batching, skipping, ROUGE, resume, data overrides, errors."""

from __future__ import annotations

import json

import pytest

from less_exp import eval as eval_job
from less_exp.errors import ConfigError, UnavailableError
from less_exp.tasks.summarization import ROWS, cut

PROMPT = "###\nArticle: {}\n\nSummarize the above article in 1 sentence.\n"


@pytest.fixture
def articles(tmp_path_factory):
    """Six short records and one too long for the tiny model (byte tokens > 2048)."""
    path = tmp_path_factory.mktemp("data") / "mini.jsonl"
    rows = [{"article": PROMPT.format(f"Story {i}: the council met on day {i} " * (1 + i % 3)), "summary_gt": f"The council met on day {i}."}
            for i in range(6)]
    rows.insert(3, {"article": PROMPT.format("A very long article. " * 120), "summary_gt": "Long."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base(path, *extra):
    return ["model=tiny_llama", "logger=none", "task=xsum", f"task.data_path={path}", "task.max_new_tokens=6", "task.batch_size=2", *extra]


def rows_of(folder):
    return [json.loads(line) for line in (folder / ROWS).read_text().splitlines()]


def test_scores_batches_and_counts_skipped_prompts(compose_config, tmp_path, articles):
    metrics = eval_job.evaluate(compose_config("eval", base(articles, "task.num_samples=null", "policy=h2o", "policy.heavy=8", "policy.recent=8")))
    assert metrics["num_samples"] == 6 and metrics["num_skipped"] == 1
    rows = rows_of(tmp_path)
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 4, 5, 6]
    for metric in ("rouge1", "rouge2", "rougeL"):
        assert metrics[metric] == pytest.approx(sum(r[metric] for r in rows) / len(rows))
        assert all(0.0 <= r[metric] <= 1.0 for r in rows)
    assert all("###" not in r["summary"] for r in rows)
    for metric in ("words", "repeated_3gram_share", "longest_repeat"):  # length and repetition of each output
        assert metrics[metric] == pytest.approx(sum(r[metric] for r in rows) / len(rows))
    assert metrics["policy"] == "h2o" and metrics["budget"] == 16


def test_num_samples_takes_the_first_records(compose_config, tmp_path, articles):
    metrics = eval_job.evaluate(compose_config("eval", base(articles, "task.num_samples=3")))
    assert metrics["num_samples"] == 3 and sorted(r["index"] for r in rows_of(tmp_path)) == [0, 1, 2]


def test_min_prompt_tokens_keeps_only_the_long_prompts(compose_config, tmp_path, articles):
    everything = eval_job.evaluate(compose_config("eval", [*base(articles, "task.num_samples=null"), f"paths.output_dir={tmp_path / 'all'}"]))
    lengths = {r["index"]: r["prompt_tokens"] for r in rows_of(tmp_path / "all")}
    shortest = sorted(set(lengths.values()))[1]
    metrics = eval_job.evaluate(compose_config("eval", [*base(articles, "task.num_samples=null", f"task.min_prompt_tokens={shortest}"),
                                                        f"paths.output_dir={tmp_path / 'long'}"]))
    kept = sorted(r["index"] for r in rows_of(tmp_path / "long"))
    assert kept == sorted(i for i, n in lengths.items() if n >= shortest) and 0 < len(kept) < len(lengths)
    assert metrics["num_samples"] == len(kept) and metrics["num_skipped"] == everything["num_skipped"] == 1
    assert metrics["mean_prompt_tokens"] > everything["mean_prompt_tokens"]
    with pytest.raises(ConfigError, match=r"task.min_prompt_tokens=100000 tokens \(the longest that fits has \d+\)"):
        eval_job.evaluate(compose_config("eval", [*base(articles, "task.min_prompt_tokens=100000"), f"paths.output_dir={tmp_path / 'none'}"]))


def test_killed_job_resumes_to_the_same_rows(compose_config, tmp_path, articles):
    whole = tmp_path / "whole"
    cut_short = tmp_path / "killed"
    overrides = base(articles, "task.num_samples=null", "policy=sink", "policy.sink=2", "policy.recent=10")
    reference = eval_job.evaluate(compose_config("eval", [*overrides, f"paths.output_dir={whole}"]))
    eval_job.evaluate(compose_config("eval", [*overrides, f"paths.output_dir={cut_short}"]))
    lines = (cut_short / ROWS).read_text().splitlines()
    (cut_short / ROWS).write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])  # two rows, then a half-written one
    resumed = eval_job.evaluate(compose_config("eval", [*overrides, f"paths.output_dir={cut_short}"]))
    by_index = lambda folder: {r["index"]: r["summary"] for r in rows_of(folder)}  # noqa: E731
    assert by_index(cut_short) == by_index(whole)
    assert {k: resumed[k] for k in ("rouge1", "rouge2", "rougeL", "num_samples")} == {
        k: reference[k] for k in ("rouge1", "rouge2", "rougeL", "num_samples")}
    # A different seed is a different run: it may not write into this run's folder.
    with pytest.raises(ConfigError, match="already holds the results of another run.*seed"):
        eval_job.evaluate(compose_config("eval", [*overrides, f"paths.output_dir={cut_short}", "seed=1"]))


def test_rows_of_an_older_data_file_are_never_reused(compose_config, tmp_path, articles, capsys):
    """Same config and folder, but the data file changed: its old rows are left aside, not averaged in."""
    overrides = base(articles, "task.num_samples=null", "policy=sink", "policy.sink=2", "policy.recent=10")
    first = eval_job.evaluate(compose_config("eval", [*overrides, f"paths.output_dir={tmp_path / 'run'}"]))
    assert first["num_samples"] == 6
    articles.write_text("".join(json.dumps({"article": PROMPT.format(f"Other story {i}. " * 3), "summary_gt": f"Other {i}."}) + "\n"
                                for i in range(2)))
    second = eval_job.evaluate(compose_config("eval", [*overrides, f"paths.output_dir={tmp_path / 'run'}"]))
    assert second["num_samples"] == 2
    assert "6 rows of another configuration or data file are not reused" in capsys.readouterr().out
    fresh = eval_job.evaluate(compose_config("eval", [*overrides, f"paths.output_dir={tmp_path / 'fresh'}"]))
    assert {k: second[k] for k in ("rouge1", "rougeL")} == {k: fresh[k] for k in ("rouge1", "rougeL")}


@pytest.mark.parametrize("content, match", [
    ("", "holds no records"),
    ('{"article": "x"}\n', "line 1 has no field 'summary_gt'"),
    ('{"article": "x", "summary_gt": "y"}\n{not json\n', "line 2 is not JSON"),
])
def test_bad_data_files_fail_naming_the_file(compose_config, tmp_path, content, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(ConfigError, match=match):
        eval_job.evaluate(compose_config("eval", base(bad)))


def test_ratio_budget_is_reported_at_the_mean_prompt_length(compose_config, tmp_path, articles):
    metrics = eval_job.evaluate(compose_config("eval", base(
        articles, "task.num_samples=3", "task.batch_size=1", "policy=h2o", "policy.ratio_of=length", "policy.heavy=0.1", "policy.recent=0.1")))
    lengths = [r["prompt_tokens"] for r in rows_of(tmp_path)]
    assert metrics["budget_length"] == round(sum(lengths) / 3) == round(metrics["mean_prompt_tokens"])
    assert metrics["heavy"] == metrics["recent"] == round(0.1 * metrics["budget_length"])


def test_cnn_dailymail_runs_on_a_given_file(compose_config, tmp_path, articles):
    metrics = eval_job.evaluate(compose_config("eval", [*base(articles, "task.num_samples=2"), "task=cnn_dailymail"]))
    assert metrics["num_samples"] == 2 and (tmp_path / ROWS).is_file()


def test_cut_at_the_stop_string():
    assert cut(" The council met.\n###\nArticle: next", "###") == "The council met."
    assert cut(" no stop here ", None) == "no stop here"


def test_presets_and_bad_values(compose_config, tmp_path):
    cnn = compose_config("eval", ["task=cnn_dailymail"])
    assert cnn.task.dataset.name == "cnn_dailymail" and "3 sentences" in cnn.task.dataset.hub.prompt
    assert compose_config("eval", ["task=xsum"]).task.dataset.local.files.test == "xsum_0shot.jsonl"
    with pytest.raises(UnavailableError, match="cnn_dailymail"):
        eval_job.evaluate(compose_config("eval", ["model=tiny_llama", "logger=none", "task=cnn_dailymail"]))
    for bad, match in [("task.num_samples=0", "num_samples"), (f"task.data_path={tmp_path}/none.jsonl", "data_path"),
                       ("task.temperature=0", "temperature"), ("task.max_new_tokens=5000", "max_new_tokens"),
                       ("task.min_prompt_tokens=0", "min_prompt_tokens"), ("task.min_prompt_tokens=true", "min_prompt_tokens")]:
        with pytest.raises(ConfigError, match=match):
            eval_job.evaluate(compose_config("eval", ["model=tiny_llama", "logger=none", "task=xsum", bad]))
