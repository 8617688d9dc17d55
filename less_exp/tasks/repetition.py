"""How much a generated text repeats itself: the failure mode a state that never forgets can cause
("Hernando Hernando Hernando ...", one sentence to the token limit), which ROUGE alone hides.

Measured on lower-cased words: ``words`` (output length), ``repeated_3gram_share`` (the share of the
output's word 3-grams that already occurred earlier in it; 0 for text without repeats, near 1 for a
loop), ``looping`` (1 when more than half of them are repeats: a mean over outputs is the share of
outputs that are mostly loop) and ``longest_repeat`` (the longest run of words that occurs twice,
overlaps allowed).
"""

from __future__ import annotations

import re

METRICS = ("words", "repeated_3gram_share", "looping", "longest_repeat")
LOOPING = 0.5  # repeated 3-gram share above which an output counts as looping
_WORD = re.compile(r"\w+(?:'\w+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repeated_ngram_share(tokens: list[str], n: int = 3) -> float:
    """Share of the n-grams that repeat an earlier one (0.0 for fewer than ``n`` words)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen, repeats = set(), 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


def longest_repeat(tokens: list[str]) -> int:
    """Length of the longest word sequence that occurs at two positions (dynamic programming over
    pairs of end positions, O(n^2) for the few hundred words of a generation)."""
    n, best = len(tokens), 0
    previous = [0] * (n + 1)
    for i in range(1, n + 1):
        current = [0] * (n + 1)
        for j in range(i + 1, n + 1):
            if tokens[i - 1] == tokens[j - 1]:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def repetition(text: str) -> dict:
    """``{words, repeated_3gram_share, looping, longest_repeat}`` of one generated text."""
    tokens = words(text)
    share = repeated_ngram_share(tokens)
    return {"words": len(tokens), "repeated_3gram_share": share, "looping": float(share > LOOPING),
            "longest_repeat": longest_repeat(tokens)}
