"""``task=generate``: prompted generation with the real evicting cache (``model.generate``).

Prompts come from ``task.prompts`` (or the first ``task.num_prompts`` records of ``task.prompt_field``
in the data set); outputs go to ``generations.jsonl`` in the job folder and to a W&B table, each with
its length and repetition (``tasks.repetition``), whose means are the job's metrics.
"""

from __future__ import annotations

import json
import time

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from less_exp import data
from less_exp.adapter import LessCache, cache_kwargs, compression_of
from less_exp.errors import ConfigError
from less_exp.report_spec import ReportSpec
from less_exp.runtime import output_dir
from less_exp.tasks.repetition import METRICS as REPETITION, repetition
from less_exp.tracking import Tracker

REPORT = ReportSpec(
    columns=("tokens_per_s", "num_prompts", "new_tokens", "repeated_3gram_share", "longest_repeat", "words"),
    headline="repeated_3gram_share",
)

def validate(cfg: DictConfig) -> None:
    task = cfg.task
    if not task.prompts and not task.prompt_field:
        raise ConfigError("task=generate needs task.prompts (a list) or task.prompt_field (a field of the data records)")


def prompts(cfg: DictConfig) -> list[str]:
    task = cfg.task
    if task.prompts:
        return list(task.prompts)
    records = data.load_records(cfg.data, task.split)[: task.num_prompts]
    return [r[task.prompt_field] for r in records]


def new_cache(model):
    """A real evicting cache when compression is attached; otherwise transformers' default."""
    return LessCache(model) if compression_of(model) is not None else None


def run(model, tokenizer, cfg: DictConfig, tracker: Tracker) -> dict:
    task = cfg.task
    texts = prompts(cfg)
    device = next(model.parameters()).device
    sampling = {"do_sample": bool(task.do_sample)}
    if task.do_sample:
        sampling.update(temperature=float(task.temperature), top_p=float(task.top_p))
    rows, new_tokens, seconds = [], 0, 0.0
    for start in tqdm(range(0, len(texts), task.batch_size), desc="generate"):
        batch = tokenizer(texts[start : start + task.batch_size], return_tensors="pt", padding=True).to(device)
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, **cache_kwargs(new_cache(model)), max_new_tokens=task.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
        seconds += time.perf_counter() - began
        generated = out[:, batch.input_ids.shape[1] :]
        new_tokens += int((generated != tokenizer.pad_token_id).sum())
        for prompt, ids in zip(texts[start : start + task.batch_size], generated):
            output = tokenizer.decode(ids, skip_special_tokens=True)
            rows.append({"prompt": prompt, "output": output, **repetition(output)})
    with open(output_dir(cfg) / "generations.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tracker.log_table("generations", ["prompt", "output"], [[r["prompt"], r["output"]] for r in rows])
    for row in rows[:3]:
        print(f"--- {row['prompt']!r}\n{row['output']}")
    means = {m: sum(r[m] for r in rows) / len(rows) for m in REPETITION}
    return {"num_prompts": len(rows), "new_tokens": new_tokens, "tokens_per_s": new_tokens / seconds, **means}
