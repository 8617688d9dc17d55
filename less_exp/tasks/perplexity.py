"""Perplexity over the data's split tokenized as one string (DESIGN §7's measure).

``task.windows=disjoint`` (the default): ``seq_len``-token windows side by side; within each window
tokens 1..L-1 are predicted from their prefix. ``task.windows=rolling``: lm-eval's rolling
log-likelihood over the same text: a prefix token (BOS, else EOS) predicts the first token, every
later window predicts ``seq_len`` tokens from the token before it, and a short last window keeps a
full window of context. Token perplexity is ``exp`` of the mean NLL over predicted tokens; word and
byte perplexity and bits per byte divide the same total NLL by the scored text's words and bytes,
as lm-eval does, so ``task=wikitext_harness`` can be checked against this task.
"""

from __future__ import annotations

import itertools
import math
import time

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm.auto import tqdm

from less_exp import data
from less_exp.peak_memory import PeakMemory
from less_exp.report_spec import ReportSpec
from less_exp.tracking import Tracker

REPORT = ReportSpec(
    columns=("perplexity", "gap_closed", "nll", "word_perplexity", "num_tokens", "state_features", "state_parameters", "train_s"),
    headline="perplexity", plots=("perplexity",), gap="perplexity",
)


def validate(cfg: DictConfig) -> None:
    """The split must be readable before anything heavy runs (the schema bounds the values)."""
    validate_text(cfg)


def validate_text(cfg: DictConfig) -> None:
    """The scored text's split on disk or on the hub (shared with ``task=wikitext_harness``)."""
    data.check_available(cfg.data, cfg.task.split)


def prefix_token_id(tokenizer) -> int:
    """The token that conditions a text's first token in rolling mode (lm-eval's choice)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def rolling_windows(ids: list[int], prefix: int, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """``(inputs, targets)`` pairs; the last ``len(targets)`` positions of ``inputs`` predict ``targets``.

    Every token of ``ids`` is a target exactly once; inputs are at most ``seq_len`` tokens.
    """
    shifted = [prefix] + ids
    first = min(seq_len, len(ids))
    windows = [(shifted[:first], ids[:first])]
    done = first
    while done < len(ids):
        end = done + min(len(ids) - done, seq_len)
        windows.append((shifted[end - seq_len : end], ids[done:end]))
        done = end
    return windows


def _batches(tokenizer, windows: torch.Tensor, text: str, task: DictConfig) -> tuple[list[tuple[torch.Tensor, torch.Tensor, int]], int]:
    """``(inputs [b, L], targets [b, n], start)`` batches, where logits ``start..start+n-1`` predict
    the targets, and the number of windows. Disjoint mode uses the split's ``windows``; rolling
    windows tokenize the scored ``text`` alone, as the harness does."""
    if task.get("windows", "disjoint") == "disjoint":
        return [(w, w[:, 1:], 0) for w in windows.split(task.batch_size)], len(windows)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    pairs = rolling_windows(ids, prefix_token_id(tokenizer), task.seq_len)
    batches = []
    for (width, n), same_shape in itertools.groupby(pairs, key=lambda p: (len(p[0]), len(p[1]))):
        same_shape = list(same_shape)
        for i in range(0, len(same_shape), task.batch_size):
            chunk = same_shape[i : i + task.batch_size]
            batches.append((torch.tensor([c[0] for c in chunk]), torch.tensor([c[1] for c in chunk]), width - n))
    return batches, len(pairs)


def run(model, tokenizer, cfg: DictConfig, tracker: Tracker) -> dict:
    """Token, word and byte perplexity, bits per byte and the counts behind them on ``cfg.data``'s split."""
    task = cfg.task
    windows, text = data.scored_windows(tokenizer, data.load_text(cfg.data, task.split), task.seq_len, task.max_windows)
    batches, num_windows = _batches(tokenizer, windows, text, task)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    started = time.perf_counter()
    with torch.inference_mode(), PeakMemory(device) as peak, tqdm(total=num_windows, desc="perplexity", unit="window") as bar:
        for inputs, targets, start in batches:
            logits = model(input_ids=inputs.to(device), use_cache=False).logits[:, start : start + targets.shape[1]]
            nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.to(device).flatten(), reduction="sum").item()
            total_nll += nll
            total_tokens += targets.numel()
            bar.update(len(inputs))
            tracker.log({"perplexity/batch_nll": nll / targets.numel(), "perplexity/running": math.exp(total_nll / total_tokens)}, step=bar.n)
    seconds = time.perf_counter() - started
    words, num_bytes = data.count_words(text), data.count_bytes(text)
    mean_nll = total_nll / total_tokens
    cost = {"scoring_s": seconds} if peak.bytes is None else {"scoring_s": seconds, "scoring_peak_mb": peak.bytes / 2**20}
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "word_perplexity": math.exp(total_nll / words),
        "byte_perplexity": math.exp(total_nll / num_bytes),
        "bits_per_byte": total_nll / num_bytes / math.log(2),
        "num_tokens": total_tokens,
        "num_words": words,
        "num_bytes": num_bytes,
        "num_windows": num_windows,
        **cost,  # the forward passes' time and peak memory above what was held before them
    }
