"""Prompt formats (less_exp.prompts): the chat template for instruct models in summarization and in answer
windows, the instruction override, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GenerationMixin

from less_exp import eval as eval_job, prompts, tiny
from less_exp.errors import ConfigError
from less_exp.models import load_model
from less_exp.tasks.summarization import ROWS
from less_exp.training import answers, unlikelihood
from tiny_training import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = ("<|sys|>be brief<|end|>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPT = "###\nArticle: {}\n\nSummarize the above article in 1 sentence.\n"


@pytest.fixture
def chat_tokenizer(monkeypatch):
    """The tiny models' byte tokenizer with a chat template, as an instruct model's has."""
    real = tiny.byte_tokenizer

    def with_template():
        tokenizer = real()
        tokenizer.chat_template = TEMPLATE
        return tokenizer

    monkeypatch.setattr(tiny, "byte_tokenizer", with_template)
    return with_template()


def test_instruction_replaces_the_prompts_last_paragraph_only():
    prompt = PROMPT.format("First line.\n\nSecond paragraph.")
    longer = prompts.with_instruction(prompt, "Summarize the above article in 3 sentences.")
    assert longer == "###\nArticle: First line.\n\nSecond paragraph.\n\nSummarize the above article in 3 sentences.\n"
    assert prompts.with_instruction(prompt, None) == prompt
    with pytest.raises(ConfigError, match="task.instruction: .* no instruction paragraph"):
        prompts.with_instruction("one line, no paragraph", "Say more.")


def test_the_chat_form_is_the_user_turn_without_the_raw_separator(chat_tokenizer):
    text = prompts.render(chat_tokenizer, PROMPT.format("News."), chat=True)
    assert text == "<|sys|>be brief<|end|><|user|>Article: News.\n\nSummarize the above article in 1 sentence.<|end|><|assistant|>"
    assert prompts.render(chat_tokenizer, PROMPT.format("News."), chat=False) == PROMPT.format("News.")
    head, tail = prompts.split_template(chat_tokenizer, "###\nQ {text} A:", chat=True)
    assert (head, tail) == ("<|sys|>be brief<|end|><|user|>Q ", " A:<|end|><|assistant|>")
    assert prompts.split_template(chat_tokenizer, "###\nQ {text} A:", chat=False) == ("###\nQ ", " A:")


@pytest.mark.parametrize("fmt, instruct, has_template, chat", [
    ("auto", True, True, True), ("auto", False, True, False), ("auto", True, False, False),
    ("raw", True, True, False), ("chat", False, True, True),
])
def test_auto_means_chat_for_an_instruct_model_with_a_template(fmt, instruct, has_template, chat):
    tokenizer = tiny.byte_tokenizer()
    tokenizer.chat_template = TEMPLATE if has_template else None
    assert prompts.use_chat(fmt, OmegaConf.create({"name": "m", "instruct": instruct}), tokenizer) is chat


def test_chat_on_a_tokenizer_without_a_template_is_one_line(compose_config):
    cfg = compose_config("eval", ["model=tiny_llama", "logger=none", "task=xsum", "task.prompt_format=chat", "task.num_samples=1"])
    with pytest.raises(ConfigError, match=r"^task.prompt_format=chat: the tokenizer of model=tiny_llama has no chat template; "
                                          r"use task.prompt_format=raw$"):
        eval_job.evaluate(cfg)


@pytest.fixture
def articles(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mini.jsonl"
    rows = [{"article": PROMPT.format(f"Story {i}: the council met on day {i}."), "summary_gt": f"The council met on day {i}."}
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_summaries_are_written_from_the_chat_form_with_the_instruction_and_say_so(compose_config, tmp_path, articles, chat_tokenizer,
                                                                                  monkeypatch):
    path, records = articles
    seen, generate = [], GenerationMixin.generate

    def recording(self, *args, **kwargs):
        seen.extend(chat_tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=True))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    instruction = "Summarize the above article in 3 sentences."
    common = ["model=tiny_llama", "logger=none", "task=xsum", f"task.data_path={path}", "task.max_new_tokens=4",
              "task.do_sample=false", "task.batch_size=1", f"task.instruction='{instruction}'"]
    metrics = eval_job.evaluate(compose_config("eval", [*common, "task.prompt_format=chat"]))
    assert metrics["prompt_format"] == "chat"
    expected = [prompts.render(chat_tokenizer, prompts.with_instruction(r["article"], instruction), True) for r in records]
    assert sorted(seen) == sorted(expected)
    rows = [json.loads(line) for line in (tmp_path / ROWS).read_text().splitlines()]
    assert {r["index"]: r["prompt_tokens"] for r in rows} == {i: len(chat_tokenizer(t, add_special_tokens=False).input_ids)
                                                              for i, t in enumerate(expected)}
    seen.clear()
    raw = eval_job.evaluate(compose_config("eval", [*common, "task.prompt_format=raw"]))
    assert raw["prompt_format"] == "raw"
    assert sorted(seen) == sorted(prompts.with_instruction(r["article"], instruction) for r in records)


ANSWERS = ["data=c4_answers", "data.answers.templates=['Q {text} A:']", "data.answers.min_doc_tokens=8",
           "data.answers.max_doc_tokens=24", "data.answers.max_new_tokens=6", "data.answers.stop=null",
           "data.answers.drop_unfinished=false", "data.answers.max_repetition=null"]


def test_answer_windows_in_chat_form_answer_after_the_assistant_turn(compose_config, tmp_path, chat_tokenizer):
    cfg = compose_config("train", [*TINY, "training=e2e", *ANSWERS])
    model, tokenizer = load_model(cfg.model)
    windows, answer = answers.build(cfg.data, model, tokenizer, "train", 96, 2, tmp_path, cfg.model.name, chat=True)
    head, tail = (tokenizer(part, add_special_tokens=False).input_ids for part in prompts.split_template(tokenizer, "Q {text} A:", True))
    assert windows[0, : len(head)].tolist() == head, "a window opens with the templated turn"
    spans = [span for row in answer for span in unlikelihood.spans(row)]
    assert spans
    for ids, mask in zip(windows, answer):
        for start, _ in unlikelihood.spans(mask):
            assert ids[start - len(tail) : start].tolist() == tail, "every answer follows the assistant's turn"
    raw, _ = answers.build(cfg.data, model, tokenizer, "train", 96, 2, tmp_path, cfg.model.name, chat=False)
    assert not torch.equal(raw, windows), "raw and chat windows are cached apart"
    assert "<|assistant|>" not in tokenizer.decode(raw[0])


def test_stop_probability_reads_the_prompts_in_the_summaries_format(compose_config, tmp_path, articles, chat_tokenizer):
    path, records = articles
    summaries = tmp_path / "summaries.jsonl"
    summaries.write_text("".join(json.dumps({"index": i, "summary": f"The council met on day {i}."}) + "\n" for i in range(3)))
    common = ["model=tiny_llama", "logger=none", "task=stop_probability", f"task.data_path={path}", f"task.summaries={summaries}"]
    for fmt in ("chat", "raw"):
        metrics = eval_job.evaluate(compose_config("eval", [*common, f"task.prompt_format={fmt}", f"paths.output_dir={tmp_path / fmt}"]))
        assert metrics["prompt_format"] == fmt and metrics["num_samples"] == 3
        lengths = {json.loads(line)["index"]: json.loads(line)["prompt_tokens"] for line in (tmp_path / fmt / "stops.jsonl").read_text().splitlines()}
        chat = fmt == "chat"
        assert lengths == {i: len(prompts.encode(chat_tokenizer, prompts.render(chat_tokenizer, r["article"], chat), chat).input_ids)
                           for i, r in enumerate(records)}
