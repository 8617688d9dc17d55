"""Data loaders on the offline files, windowing, and the error that says what to set."""

from __future__ import annotations

import pytest
import torch

from less_exp import data
from less_exp.errors import ConfigError, UnavailableError
from less_exp.tiny import byte_tokenizer


@pytest.fixture
def wikitext(compose_config):
    return compose_config("eval", ["data=wikitext2"]).data


def test_wikitext_splits_read_local_files(wikitext):
    test = data.load_text(wikitext, "test")
    assert test.startswith(" \n = Robert <unk> = \n") and len(test.split()) > 200_000
    assert data.load_text(wikitext, "train") == data.load_text(wikitext, "validation") != test


def test_xsum_records_have_input_and_target(compose_config):
    records = data.load_records(compose_config("eval", ["data=xsum"]).data, "test")
    assert len(records) == 1000
    first = records[0]
    assert first["input"].startswith("###\nArticle: ") and first["input"].endswith("in 1 sentence.\n")
    assert first["target"] == first["summary_gt"] and first["target"]


def test_text_set_has_no_records(wikitext):
    with pytest.raises(ConfigError, match="load_text"):
        data.load_records(wikitext, "test")


def test_local_jsonl_path_override(compose_config, tmp_path):
    path = tmp_path / "cnn.jsonl"
    path.write_text('{"article": "A", "summary_gt": "B"}\n\n{"article": "C", "summary_gt": "D"}\n')
    cfg = compose_config("eval", ["data=cnn_dailymail", f"data.local.files.test={path}"]).data
    assert [(r["input"], r["target"]) for r in data.load_records(cfg, "test")] == [("A", "B"), ("C", "D")]


@pytest.mark.parametrize("name", ["wikitext2", "xsum", "cnn_dailymail", "c4"])
def test_missing_data_offline_says_what_to_set(compose_config, monkeypatch, tmp_path, name):
    monkeypatch.setenv("LESS_DATA_ROOT", str(tmp_path / "nowhere"))
    cfg = compose_config("eval", [f"data={name}"]).data
    with pytest.raises(UnavailableError, match="LESS_DATA_ROOT") as err:
        data.check_available(cfg, "test")
    assert "paths.data_root" in str(err.value) and str(tmp_path / "nowhere") in str(err.value)


def test_unknown_split_is_rejected(wikitext):
    with pytest.raises(ConfigError, match="split"):
        data.load_text(wikitext, "dev")


def test_token_windows_are_disjoint_prefix_windows():
    tokenizer = byte_tokenizer()
    text = "abcdefghij" * 10
    windows = data.token_windows(tokenizer, text, seq_len=16, max_windows=None)
    assert windows.shape == (6, 16) and windows.dtype == torch.long
    assert windows.flatten().tolist() == list(text.encode())[:96]
    assert tokenizer.bos_token_id not in windows
    assert torch.equal(data.token_windows(tokenizer, text, 16, 2), windows[:2])


def test_token_windows_reject_too_short_text():
    with pytest.raises(ConfigError, match="fewer than one window"):
        data.token_windows(byte_tokenizer(), "short", seq_len=16)
    with pytest.raises(ConfigError, match="seq_len"):
        data.token_windows(byte_tokenizer(), "short", seq_len=1)


def test_c4_splits_are_disjoint_documents_of_the_offline_sample(compose_config):
    """Training never sees the held-out C4 text: the three splits are stated document ranges."""
    import json

    cfg = compose_config("eval", ["data=c4"]).data
    docs = [json.loads(line)["text"] for line in data.local_file(cfg, "train").read_text().splitlines() if line.strip()]
    texts = {split: data.load_text(cfg, split) for split in ("train", "validation", "test")}
    assert texts["train"] == "\n\n".join(docs[:240]) and texts["test"] == "\n\n".join(docs[270:300])
    assert texts["validation"] == "\n\n".join(docs[240:270])
    assert docs[250] not in texts["train"] and docs[280] not in texts["validation"]


def test_rows_that_do_not_fit_the_file_are_refused(compose_config):
    cfg = compose_config("eval", ["data=c4", "data.local.rows.test=[250,400]"]).data
    with pytest.raises(ConfigError, match=r"data.local.rows.test=\[250, 400\) does not fit the 300 documents"):
        data.load_text(cfg, "test")


def test_a_mixture_gives_each_part_its_share_interleaved(compose_config):
    mix = compose_config("train", ["data=c4_wikitext2", "data.weights.c4=3", "data.weights.wikitext2=1"]).data
    tok = byte_tokenizer()
    windows, domains = data.training_windows(mix, tok, "train", 256, 8)
    assert windows.shape == (8, 256) and domains.count("c4") == 6 and domains.count("wikitext2") == 2
    assert domains[:4] == ["c4", "wikitext2", "c4", "wikitext2"], "parts interleave, so any prefix holds both"
    c4 = data.token_windows(tok, data.load_text(mix.mixture.c4, "train"), 256, 6)
    wiki = data.token_windows(tok, data.load_text(mix.mixture.wikitext2, "train"), 256, 2)
    assert torch.equal(windows[[i for i, d in enumerate(domains) if d == "c4"]], c4)
    assert torch.equal(windows[[i for i, d in enumerate(domains) if d == "wikitext2"]], wiki)
    single, names = data.training_windows(compose_config("train", ["data=c4"]).data, tok, "train", 256, 3)
    assert names == ["c4"] * 3 and torch.equal(single, c4[:3])


def test_validation_of_a_mixture_holds_every_domain():
    from less_exp.training.layerwise import split, split_domains

    domains = ["c4", "wikitext2"] * 5
    train, val = split_domains(domains, 0.2, seed=0)
    assert sorted(train + val) == list(range(10)) and {domains[i] for i in val} == {"c4", "wikitext2"}
    assert split_domains(["c4"] * 10, 0.2, seed=0) == split(10, 0.2, seed=0)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["data.weights.c4=0"], r"data\.weights\.c4=0 must be a number > 0"),
        (["~data.weights.wikitext2"], r"data\.weights names \['c4'\] but the mixture holds \['c4', 'wikitext2'\]"),
    ],
)
def test_bad_mixture_weights_are_refused(compose_config, overrides, match):
    mix = compose_config("train", ["data=c4_wikitext2", *overrides]).data
    with pytest.raises(ConfigError, match=match):
        data.check_available(mix, "train", mixture=True)


def test_evaluation_on_a_mixture_says_to_pick_one(compose_config):
    mix = compose_config("eval", ["data=c4_wikitext2"]).data
    with pytest.raises(ConfigError, match=r"data=c4_wikitext2 is a training mixture of c4, wikitext2; evaluate on one"):
        data.check_available(mix, "test")
    with pytest.raises(ConfigError, match="training mixture"):
        data.load_text(mix, "test")


def test_xsum_articles_are_the_prompts_articles_as_plain_text(compose_config):
    text = data.load_text(compose_config("eval", ["data=xsum_articles"]).data, "test")
    records = data.load_records(compose_config("eval", ["data=xsum"]).data, "test")
    first = records[0]["input"].removeprefix("###\nArticle: ").removesuffix("\n\nSummarize the above article in 1 sentence.\n")
    assert text.startswith(first + "\n\n") and "###" not in text and "Summarize the above" not in text
    assert len(text.split("\n\n")) >= len(records)
