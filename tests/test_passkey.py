"""task=passkey: the prompt builder, the scoring, and the task end to end on a tiny model."""

import json

import pytest
from PIL import Image

from less_exp import eval as eval_job
from less_exp.errors import ConfigError
from less_exp.models import load_model
from less_exp.passkey import FILLER, NEEDLE, answer_of, build_prompt, compose, draw_passkey, is_correct
from less_exp.tiny import byte_tokenizer

TOKENIZER = byte_tokenizer()  # one token per byte: token offsets are character offsets
LONGEST_SENTENCE = max(len(s) for s in FILLER) + 1  # with its separating space
TINY = ["model=tiny_llama", "logger=none", "task=passkey", "task.context_lengths=[256,320]", "task.depths=[0,1]",
        "task.trials=1", "task.max_new_tokens=4"]


@pytest.mark.parametrize("length", [250, 300, 517, 1024])
def test_prompt_fills_the_target_length_with_whole_sentences(length):
    prompt = build_prompt(TOKENIZER, length, 0.5, "12345")
    assert prompt.num_tokens == len(TOKENIZER(prompt.text).input_ids)
    assert length - LONGEST_SENTENCE < prompt.num_tokens <= length
    assert (prompt.text, prompt.needle_after) == compose("12345", 0.5, prompt.filler_sentences)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_sits_at_its_depth_of_the_filler(depth):
    prompt = build_prompt(TOKENIZER, 2000, depth, "40912")
    instruction, haystack, question = prompt.text.split("\n")
    needle = NEEDLE.format(passkey="40912")
    relative = haystack.index(needle) / (len(haystack) - len(needle))
    assert relative == pytest.approx(depth, abs=LONGEST_SENTENCE / len(haystack))
    assert prompt.needle_after == round(depth * prompt.filler_sentences) and prompt.filler_sentences > 50
    assert haystack.startswith(needle) == (depth == 0.0) and haystack.endswith(needle) == (depth == 1.0)
    assert prompt.text.count("40912") == 2 and question.endswith("The pass key is")


def test_passkeys_are_reproducible_and_differ_across_trials():
    keys = [draw_passkey(5, 0, 512, 0.5, trial) for trial in range(10)]
    assert keys == [draw_passkey(5, 0, 512, 0.5, trial) for trial in range(10)]
    assert len(set(keys)) == 10 and all(len(k) == 5 and k.isdigit() and k[0] != "0" for k in keys)
    assert keys != [draw_passkey(5, 1, 512, 0.5, trial) for trial in range(10)]
    prompt = build_prompt(TOKENIZER, 400, 0.25, keys[3])
    assert prompt.passkey == keys[3] and NEEDLE.format(passkey=keys[3]) in prompt.text


def test_too_short_a_length_is_refused():
    with pytest.raises(ValueError, match="too short"):
        build_prompt(TOKENIZER, 100, 0.5, "12345")


@pytest.mark.parametrize(
    "output, answer, correct",
    [
        (" 12345.\n", "12345", True),
        ("12345 is the pass key", "12345", True),
        (" the pass key.", None, False),
        (" 1234.", "1234", False),
        (" 123456", "123456", False),
        (" a 12-digit key 12345", "12", False),  # only the first number counts
    ],
)
def test_scoring_takes_the_first_number(output, answer, correct):
    assert answer_of(output) == answer
    assert is_correct(output, "12345") is correct


@pytest.mark.parametrize("policy", [["policy=full"], ["policy=h2o", "policy.heavy=8", "policy.recent=8"]])
def test_passkey_task_end_to_end(compose_config, tmp_path, policy):
    metrics = eval_job.evaluate(compose_config("eval", [*TINY, *policy]))
    rows = [json.loads(line) for line in (tmp_path / "passkey.jsonl").read_text().splitlines()]
    record = json.loads((tmp_path / "results.json").read_text())
    grid = record["metrics"]["passkey_grid"]
    assert grid["context_lengths"] == [256, 320] and grid["depths"] == [0.0, 1.0]
    assert len(grid["accuracy"]) == 2 and all(len(accs) == 2 for accs in grid["accuracy"])
    assert metrics["num_prompts"] == len(rows) == 4
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    assert metrics["accuracy@256"] == pytest.approx(sum(grid["accuracy"][0]) / 2)
    assert all(r["tokens"] <= r["context_length"] and len(r["passkey"]) == 5 for r in rows)
    assert metrics["policy"] == policy[0].split("=")[1]
    with Image.open(tmp_path / "passkey_heatmap.png") as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_accuracy_counts_the_answers_that_hold_the_passkey(compose_config, tmp_path, monkeypatch):
    """A model that recalls the passkey only in the shorter contexts scores 1 there and 0 in the longer."""
    import re

    import torch

    def load_recalling_model(*args, **kwargs):
        model, tok = load_model(*args, **kwargs)

        def generate(input_ids, **kw):
            answers = []
            for row in input_ids:
                key = re.search(r"The pass key is (\d+)", tok.decode(row, skip_special_tokens=True)).group(1)
                answers.append(tok(f" {key if len(row) <= 256 else '0' * len(key)}.", add_special_tokens=False).input_ids)
            width = max(map(len, answers))
            new = torch.tensor([a + [tok.pad_token_id] * (width - len(a)) for a in answers])
            return torch.cat([input_ids, new], dim=1)

        model.generate = generate
        return model, tok

    monkeypatch.setattr(eval_job, "load_model", load_recalling_model)
    metrics = eval_job.evaluate(compose_config("eval", [*TINY, "policy=full"]))
    assert metrics["accuracy@256"] == 1.0 and metrics["accuracy@320"] == 0.0 and metrics["accuracy"] == 0.5
    assert metrics["passkey_grid"]["accuracy"] == [[1.0, 1.0], [0.0, 0.0]]


def test_ratio_budget_resolves_at_each_context_length(compose_config):
    """10% of each prompt: the real cache sizes itself at prefill; the summary reports the longest length's."""
    ratio = ["policy=h2o", "policy.ratio_of=length", "policy.heavy=0.05", "policy.recent=0.05"]
    metrics = eval_job.evaluate(compose_config("eval", [*TINY, *ratio]))
    assert metrics["budget_length"] == 320 and metrics["budget"] == 2 * round(0.05 * 320)
    fixed = eval_job.evaluate(compose_config("eval", [*TINY, "policy=h2o", "policy.heavy=13", "policy.recent=13"]))
    assert metrics["num_prompts"] == fixed["num_prompts"] == 4


@pytest.mark.parametrize(
    "override, match",
    [
        ("task.depths=[0,1.5]", "task.depths"),
        ("task.context_lengths=[256,4096]", "model.max_length=2048"),
        ("task.trials=0", "task.trials"),
        ("task.context_lengths=[]", "task.context_lengths"),
    ],
)
def test_bad_configs_fail_before_the_model_loads(compose_config, monkeypatch, override, match):
    monkeypatch.setattr(eval_job, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError, match=match):
        eval_job.evaluate(compose_config("eval", [*TINY, override]))


def test_too_short_a_context_fails_before_generating(compose_config):
    with pytest.raises(ConfigError, match="task.context_lengths has 100: 100 tokens is too short"):
        eval_job.evaluate(compose_config("eval", [*TINY, "task.context_lengths=[100,256]"]))
