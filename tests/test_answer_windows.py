"""Answer windows (data=c4_answers): instruction prompts on documents followed by the full-cache model's
own greedy answers, their loss weights, caching, training on them and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from less_exp import eval as eval_job, factory, train as train_job
from less_exp.adapter import LessCache, build, cache_kwargs, switch
from less_exp.errors import ConfigError
from less_exp.models import end_token_ids, load_model
from less_exp.training import answers, output, teacher, unlikelihood
from tiny_training import EVAL, TINY

pytestmark = pytest.mark.usefixtures("one_thread")

ANSWERS = ["data=c4_answers", "data.answers.templates=['Q {text} A:','T {text} ?']", "data.answers.min_doc_tokens=8",
           "data.answers.max_doc_tokens=24", "data.answers.max_new_tokens=8", "data.answers.stop=null",
           # the tiny random model never ends an answer within 8 tokens: keep its answers
           "data.answers.drop_unfinished=false", "data.answers.max_repetition=null"]
E2E = [*TINY, "training=e2e", "training.num_sequences=6", "training.epochs=2", "training.lr=3e-2", *ANSWERS]


def test_answer_windows_hold_the_models_own_greedy_answers_and_are_cached(compose_config, tmp_path, monkeypatch):
    cfg = compose_config("train", E2E)
    model, tokenizer = load_model(cfg.model)
    windows, answer = answers.build(cfg.data, model, tokenizer, "train", 64, 4, tmp_path / "cache", cfg.model.name)
    assert windows.shape == answer.shape == (4, 64) and answer.dtype == torch.bool
    ends, episodes = end_token_ids(model, tokenizer), 0
    for ids, mask in zip(windows, answer):
        runs = unlikelihood.spans(mask)
        assert runs, "every window holds at least one answer"
        for start, stop in runs:
            if stop == 64:
                continue  # cut by the window's end
            greedy = model.generate(input_ids=ids[None, :start], max_new_tokens=8, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)[0, start:].tolist()
            assert ids[start:stop].tolist() == answers.reply_tokens(greedy, ends, None, tokenizer)
            episodes += 1
    assert episodes >= 4
    assert not answer[:, :2].any(), "a window opens with a prompt"

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached build generates nothing")

    monkeypatch.setattr(model, "generate", no_generation)
    again = answers.build(cfg.data, model, tokenizer, "train", 64, 4, tmp_path / "cache", cfg.model.name)
    assert torch.equal(again[0], windows) and torch.equal(again[1], answer)
    reweighted = compose_config("train", [*E2E, "data.answers.weight=16"]).data
    assert torch.equal(answers.build(reweighted, model, tokenizer, "train", 64, 4, tmp_path / "cache", cfg.model.name)[0], windows), \
        "the loss weight changes no window: a weight sweep reuses them"
    as_int = compose_config("train", [*E2E, "data.answers.student_share=0"]).data
    assert torch.equal(answers.build(as_int, model, tokenizer, "train", 64, 4, tmp_path / "cache", cfg.model.name)[0], windows), \
        "student_share=0 and the preset's 0.0 are one setting: the cached windows serve both"


def test_a_killed_build_resumes_at_its_next_window_and_equals_an_uninterrupted_one(compose_config, tmp_path, monkeypatch):
    cfg = compose_config("train", E2E)
    model, tokenizer = load_model(cfg.model)
    whole = answers.build(cfg.data, model, tokenizer, "train", 64, 5, tmp_path / "whole", cfg.model.name)
    real, calls = answers._window, []

    def killed_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(answers, "_window", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        answers.build(cfg.data, model, tokenizer, "train", 64, 5, tmp_path / "cache", cfg.model.name)
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".partial.pt")], "finished windows are kept"
    calls.clear()
    monkeypatch.setattr(answers, "_window", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = answers.build(cfg.data, model, tokenizer, "train", 64, 5, tmp_path / "cache", cfg.model.name)
    assert len(calls) == 3, "the resumed build makes only the windows the killed one had not"
    assert torch.equal(resumed[0], whole[0]) and torch.equal(resumed[1], whole[1])
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".partial.pt")], "a finished build leaves no partial file"


def test_short_documents_at_a_windows_end_fill_it_and_the_set_goes_on(compose_config, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": text}) + "\n" for text in ["word " * 12, "tiny", "bit", "end"] * 30))
    cfg = compose_config("train", [*E2E, f"data.source.local.files.train={docs}", "data.source.local.rows=null"])
    model, tokenizer = load_model(cfg.model)
    windows, answer = answers.build(cfg.data, model, tokenizer, "train", 64, 12, tmp_path / "cache", cfg.model.name)
    assert windows.shape == (12, 64) and answer.any(1).all()


def test_the_student_share_of_answers_is_the_students_own_generation_with_the_real_cache(compose_config, tmp_path):
    cfg = compose_config("train", [*E2E, "data.answers.student_share=1.0"])
    model, tokenizer = load_model(cfg.model)
    torch.manual_seed(0)
    states = factory.make_states(cfg, model)
    student = build(model, factory.instantiate_component(cfg.policy), states)
    states.eval()
    switch(model, None)
    windows, answer = answers.build(cfg.data, model, tokenizer, "train", 64, 3, tmp_path / "cache", cfg.model.name, student)
    teacher_windows, _ = answers.build(compose_config("train", E2E).data, model, tokenizer, "train", 64, 3,
                                       tmp_path / "cache", cfg.model.name)
    assert not torch.equal(windows, teacher_windows), "the student answers otherwise than the full-cache model"
    start, stop = unlikelihood.spans(answer[0])[0]
    switch(model, student)
    greedy = model.generate(input_ids=windows[:1, :start], max_new_tokens=8, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id, **cache_kwargs(LessCache(model)))[0, start:].tolist()
    switch(model, None)
    assert windows[0, start:stop].tolist() == answers.reply_tokens(greedy, end_token_ids(model, tokenizer), None, tokenizer)
    assert model.config._attn_implementation == "sdpa", "the build leaves the model on full attention for the teacher"
    states.requires_grad_(False)
    with torch.no_grad():
        states[0].parameters().__next__().add_(1.0)
    again, _ = answers.build(cfg.data, model, tokenizer, "train", 64, 3, tmp_path / "cache", cfg.model.name, student)
    assert len(list((tmp_path / "cache").glob("answers_*.pt"))) == 3, "other student parameters are another cache entry"


def test_an_answer_keeps_its_tokens_as_generated_and_ends_with_the_token_that_stopped_it(compose_config):
    _, tokenizer = load_model(compose_config("train", E2E).model)
    word = tokenizer(" hello", add_special_tokens=False)["input_ids"]
    stop = tokenizer("###", add_special_tokens=False)["input_ids"]
    eos = 7
    assert answers.reply_tokens([*word, eos, *word], {eos}, None, tokenizer) == [*word, eos], \
        "the end token stays in the answer (a state must learn to predict it) and nothing after it"
    assert answers.reply_tokens([*word, *stop, *word], set(), "###", tokenizer) == word, "cut where the stop string begins"
    assert answers.reply_tokens([*word, *word], {eos}, "###", tokenizer) == [*word, *word], "cut by max_new_tokens: all of it"


def test_teacher_answers_that_loop_or_never_end_are_not_kept_as_targets(compose_config):
    cfg = compose_config("train", [*E2E, "data.answers.drop_unfinished=true", "data.answers.max_repetition=0.3"])
    _, tokenizer = load_model(cfg.model)
    answer = tokenizer(" The council approved the new budget on Monday.", add_special_tokens=False)["input_ids"]
    loop = tokenizer(" He was found. He was found. He was found. He was found.", add_special_tokens=False)["input_ids"]
    assert answers.kept(answer, True, cfg.data.answers, tokenizer)
    assert not answers.kept(answer, False, cfg.data.answers, tokenizer), "still running at max_new_tokens"
    assert not answers.kept(loop, True, cfg.data.answers, tokenizer), "a loop, though it ended"
    keep_all = compose_config("train", E2E).data.answers
    assert answers.kept(loop, False, keep_all, tokenizer)


def test_a_set_whose_answers_are_all_dropped_says_which_settings_dropped_them(compose_config, tmp_path):
    cfg = compose_config("train", [*E2E, "data.answers.drop_unfinished=true"])
    model, tokenizer = load_model(cfg.model)
    with pytest.raises(ConfigError, match=r"fill only [01] answer window .*answers dropped .*drop_unfinished and max_repetition"):
        answers.build(cfg.data, model, tokenizer, "train", 64, 4, tmp_path / "cache", cfg.model.name)


def test_the_student_answers_its_share_of_the_episodes_spread_evenly():
    assert [answers.student_writes(e, 0.5) for e in range(6)] == [False, True, False, True, False, True]
    assert sum(answers.student_writes(e, 0.25) for e in range(100)) == 25
    assert not any(answers.student_writes(e, 0.0) for e in range(10))
    assert all(answers.student_writes(e, 1.0) for e in range(10))


def test_the_answer_weight_lands_on_the_positions_that_predict_answer_tokens():
    answer = torch.tensor([[False, False, True, True, False]])
    weights = answers.position_weights(answer, 4.0)
    assert weights.tolist() == [[1.0, 4.0, 4.0, 1.0]]


def test_weighted_losses_equal_the_mean_at_unit_weights_and_follow_the_weights(compose_config):
    cfg = compose_config("train", E2E)
    model, _ = load_model(cfg.model)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = teacher.top_k_targets(model(input_ids=ids).logits[:, :-1] * 2, 16)
        mean, _, _, per, _ = output.losses(model, ids, target)
        ones, _, _, _, _ = output.losses(model, ids, target, torch.ones(2, 31))
        only_first = torch.zeros(2, 31)
        only_first[:, 0] = 1.0
        first, _, _, _, _ = output.losses(model, ids, target, only_first)
    torch.testing.assert_close(ones, mean)
    torch.testing.assert_close(mean, per.mean())
    torch.testing.assert_close(first, per[:, 0].mean())


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_e2e_on_answer_windows_lowers_the_answer_tokens_kl(compose_config, tmp_path, share):
    metrics = train_job.train(compose_config("train", [*E2E, f"data.answers.student_share={share}",
                                                       f"checkpoint={tmp_path / 'ckpt'}"]))
    assert metrics["complete"]
    assert metrics["val_answer_kl"] < 0.7 * metrics["initial_val_answer_kl"]
    assert metrics["val_answer_kl"] < metrics["plain_val_answer_kl"]
    assert metrics["val_kl"] < metrics["initial_val_kl"]
    trained = eval_job.evaluate(compose_config("eval", [*EVAL, "task=perplexity", f"checkpoint={tmp_path / 'ckpt'}"]))
    assert torch.isfinite(torch.tensor(trained["perplexity"]))


@pytest.mark.parametrize("override, message", [
    ("data.answers.templates=['no field']", r"data\.answers\.templates .* \{text\}"),
    ("data.answers.max_new_tokens=0", r"data\.answers\.max_new_tokens=0 must be a positive integer"),
    ("data.answers.max_new_tokens=60", r"min_doc_tokens \+ max_new_tokens = 68 leave no room in training\.seq_len=64"),
    ("data.answers.weight=0", r"data\.answers\.weight=0 must be a number > 0"),
    ("data.answers.student_share=2", r"data\.answers\.student_share=2 must be a number in \[0, 1\]"),
    ("data.answers.max_repetition=1.5", r"data\.answers\.max_repetition=1\.5 must be a number in \[0, 1\] or null"),
    ("data.answers.drop_unfinished=maybe", r"data\.answers\.drop_unfinished='maybe' must be true or false"),
])
def test_bad_answer_settings_are_refused_before_the_model_loads(compose_config, override, message, monkeypatch):
    monkeypatch.setattr(train_job, "load_model", lambda *a, **k: pytest.fail("the model loaded"), raising=False)
    with pytest.raises(ConfigError, match=message):
        train_job.train(compose_config("train", [*E2E, override]))


def test_answer_windows_are_refused_for_layerwise_training_and_for_evaluation(compose_config):
    with pytest.raises(ConfigError, match=r"data=c4_answers .*training=e2e or training=progressive"):
        train_job.train(compose_config("train", [*TINY, *ANSWERS]))
    with pytest.raises(ConfigError, match=r"data=c4_answers is training data .*less-eval data=c4"):
        eval_job.evaluate(compose_config("eval", [*EVAL, "task=perplexity", *ANSWERS[:1]]))
