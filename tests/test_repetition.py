"""Repetition of generated text: the three measures against brute force and on the loops they exist for."""

from __future__ import annotations

import random

import pytest

from less_exp.tasks.repetition import longest_repeat, repeated_ngram_share, repetition, words


def brute_longest_repeat(tokens):
    n = len(tokens)
    return max((k for k in range(1, n) for i in range(n - k + 1) for j in range(i + 1, n - k + 1)
                if tokens[i:i + k] == tokens[j:j + k]), default=0)


@pytest.mark.parametrize("seed", range(20))
def test_longest_repeat_matches_brute_force(seed):
    rng = random.Random(seed)
    tokens = [rng.choice("abc") for _ in range(rng.randint(0, 25))]
    assert longest_repeat(tokens) == brute_longest_repeat(tokens)


def test_loops_score_high_and_plain_text_scores_zero():
    fresh = repetition("The council met on Tuesday to discuss the new budget for schools.")
    assert fresh == {"words": 12, "repeated_3gram_share": 0.0, "looping": 0.0, "longest_repeat": 1}  # "the" twice
    loop = repetition("Hernando Hernando Hernando Hernando Hernando Hernando")
    assert loop["repeated_3gram_share"] == pytest.approx(3 / 4) and loop["longest_repeat"] == 5 and loop["looping"] == 1.0
    sentence = "He said it was over. " * 4
    looped = repetition(sentence)
    assert looped["words"] == 20 and looped["longest_repeat"] == 15
    assert looped["repeated_3gram_share"] == pytest.approx(13 / 18)
    assert repetition("") == {"words": 0, "repeated_3gram_share": 0.0, "looping": 0.0, "longest_repeat": 0}


def test_words_ignore_case_and_punctuation():
    assert words("It's the plan, isn't it? THE PLAN.") == ["it's", "the", "plan", "isn't", "it", "the", "plan"]
    assert repeated_ngram_share(["a", "b"]) == 0.0
