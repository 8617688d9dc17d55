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

import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm.auto import tqdm

from less_exp import data
from less_exp.errors import ConfigError
from less_exp.models import max_positions
from less_exp.tracking import Tracker

WINDOWS = ("disjoint", "rolling")


def validate(cfg: DictConfig) -> None:
    """Check the task's values against the model and the data before anything heavy runs."""
    task = cfg.task
    limit = max_positions(cfg.model)
    if not isinstance(task.seq_len, int) or not 2 <= task.seq_len <= limit:
        raise ConfigError(f"task.seq_len={task.seq_len} must be an integer in [2, {limit}] (model.max_length)")
    if task.max_windows is not None and (not isinstance(task.max_windows, int) or task.max_windows < 1):
        raise ConfigError(f"task.max_windows={task.max_windows} must be a positive integer or null (all windows)")
    if not isinstance(task.batch_size, int) or task.batch_size < 1:
        raise ConfigError(f"task.batch_size={task.batch_size} must be a positive integer")
    if task.get("windows", "disjoint") not in WINDOWS:
        raise ConfigError(f"task.windows={task.windows!r} is not one of {WINDOWS}")
    if task.split not in data.SPLITS:
        raise ConfigError(f"task.split={task.split!r} is not one of {data.SPLITS}")
    data.check_available(cfg.data, task.split)


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


def _batches(tokenizer, split_text: str, text: str, task: DictConfig) -> tuple[list[tuple[torch.Tensor, torch.Tensor, int]], int]:
    """``(inputs [b, L], targets [b, n], start)`` batches, where logits ``start..start+n-1`` predict
    the targets, and the number of windows. Disjoint windows cut the whole split's tokens; rolling
    windows tokenize the scored ``text`` alone, as the harness does."""
    if task.get("windows", "disjoint") == "disjoint":
        windows = data.token_windows(tokenizer, split_text, task.seq_len, task.max_windows)
        return [(w, w[:, 1:], 0) for w in windows.split(task.batch_size)], len(windows)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    pairs = rolling_windows(ids, prefix_token_id(tokenizer), task.seq_len)
    batches, group = [], []
    for inputs, targets in pairs + [([], [])]:
        shape = (len(inputs), len(targets))
        if group and (shape != (len(group[0][0]), len(group[0][1])) or len(group) == task.batch_size):
            width, n = len(group[0][0]), len(group[0][1])
            batches.append((torch.tensor([g[0] for g in group]), torch.tensor([g[1] for g in group]), width - n))
            group = []
        group.append((inputs, targets))
    return batches, len(pairs)


def run(model, tokenizer, cfg: DictConfig, tracker: Tracker) -> dict:
    """Token, word and byte perplexity, bits per byte and the counts behind them on ``cfg.data``'s split."""
    task = cfg.task
    split_text = data.load_text(cfg.data, task.split)
    text = data.scored_text(tokenizer, split_text, task.seq_len, task.max_windows)
    batches, num_windows = _batches(tokenizer, split_text, text, task)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode(), tqdm(total=num_windows, desc="perplexity", unit="window") as bar:
        for inputs, targets, start in batches:
            logits = model(input_ids=inputs.to(device), use_cache=False).logits[:, start : start + targets.shape[1]]
            nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.to(device).flatten(), reduction="sum").item()
            total_nll += nll
            total_tokens += targets.numel()
            bar.update(len(inputs))
            tracker.log({"perplexity/batch_nll": nll / targets.numel(), "perplexity/running": math.exp(total_nll / total_tokens)}, step=bar.n)
    words, num_bytes = data.count_words(text), data.count_bytes(text)
    mean_nll = total_nll / total_tokens
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
    }
