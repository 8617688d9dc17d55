"""Token-level perplexity over disjoint windows (DESIGN §7's measure).

The split is tokenized as one string (no BOS) and cut into ``seq_len``-token windows; within each
window tokens 1..L-1 are predicted from their prefix. Perplexity is ``exp`` of the mean negative
log-likelihood over all predicted tokens of all windows.
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
    if task.split not in data.SPLITS:
        raise ConfigError(f"task.split={task.split!r} is not one of {data.SPLITS}")
    data.check_available(cfg.data, task.split)


def run(model, tokenizer, cfg: DictConfig, tracker: Tracker) -> dict:
    """Perplexity, mean NLL, predicted-token count and window count on ``cfg.data``'s split."""
    task = cfg.task
    text = data.load_text(cfg.data, task.split)
    windows = data.token_windows(tokenizer, text, task.seq_len, task.max_windows)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode(), tqdm(total=len(windows), desc="perplexity", unit="window") as bar:
        for batch in windows.split(task.batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
            total_nll += nll
            total_tokens += targets.numel()
            bar.update(len(batch))
            tracker.log({"perplexity/batch_nll": nll / targets.numel(), "perplexity/running": math.exp(total_nll / total_tokens)}, step=bar.n)
    mean_nll = total_nll / total_tokens
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "num_tokens": total_tokens, "num_windows": len(windows)}
