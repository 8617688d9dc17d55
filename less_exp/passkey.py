"""Passkey-retrieval prompts: a random passkey hidden at a chosen depth of repeated filler text.

The classic long-context recall probe (Mohtashami & Jaggi 2023, "Landmark Attention"): an
instruction, filler sentences with the passkey sentence inserted after a fraction ``depth`` of them
(0.0 = first, 1.0 = last), and a question that the model completes with the passkey. Prompts are
sized in tokens of the real tokenizer: as many whole filler sentences as fit in the target length.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: its text, token count, the passkey, and where the needle sits in the filler."""

    text: str
    num_tokens: int
    passkey: str
    depth: float
    filler_sentences: int  # whole filler sentences in the prompt
    needle_after: int  # of which this many come before the needle


def draw_passkey(digits: int, seed: int, *cell) -> str:
    """A ``digits``-digit passkey (no leading zero), a function of ``seed`` and the grid ``cell``."""
    rng = random.Random("passkey/" + "/".join(str(part) for part in (seed, *cell)))
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def compose(passkey: str, depth: float, filler_sentences: int) -> tuple[str, int]:
    """The prompt text with ``filler_sentences`` filler sentences, and how many precede the needle."""
    before = round(depth * filler_sentences)
    sentences = [FILLER[i % len(FILLER)] for i in range(filler_sentences)]
    haystack = " ".join([*sentences[:before], NEEDLE.format(passkey=passkey), *sentences[before:]])
    return "\n".join([INSTRUCTION, haystack, QUESTION]), before


def build_prompt(tokenizer, length: int, depth: float, passkey: str) -> PasskeyPrompt:
    """The longest prompt of whole filler sentences whose tokenization is at most ``length`` tokens.

    Raises ``ValueError`` when even the instruction, needle and question alone exceed ``length``.
    """

    def measure(n: int) -> tuple[int, str, int]:
        text, before = compose(passkey, depth, n)
        return len(tokenizer(text).input_ids), text, before

    fits = measure(0)
    if fits[0] > length:
        raise ValueError(f"{length} tokens is too short: the instruction, passkey and question alone take {fits[0]} tokens")
    low, high = 0, 1  # low fits; grow high until it does not, then bisect
    while (found := measure(high))[0] <= length:
        low, fits, high = high, found, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        found = measure(mid)
        if found[0] <= length:
            low, fits = mid, found
        else:
            high = mid
    num_tokens, text, before = fits
    return PasskeyPrompt(text, num_tokens, passkey, float(depth), low, before)


def answer_of(output: str) -> str | None:
    """The first run of digits in a generated answer, or None when there is none."""
    match = re.search(r"\d+", output)
    return match.group() if match else None


def is_correct(output: str, passkey: str) -> bool:
    """Whether the first number the model generated is exactly the passkey."""
    return answer_of(output) == passkey
