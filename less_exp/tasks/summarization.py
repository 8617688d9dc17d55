"""``task=xsum`` and ``task=cnn_dailymail``: summarization by generation with the real evicting cache.

The H2O 0-shot prompt (``###\\nArticle: ...\\n\\nSummarize the above article in N sentences.\\n``;
``task.instruction`` replaces its last line, to ask for three sentences say), through the model's chat
template when the model is an instruct model (``task.prompt_format``, :mod:`less_exp.prompts`; ``raw``
gives the papers' prompts), temperature-0.3 sampling seeded per batch (or ``task.do_sample=false`` for
greedy), at most 128 new tokens, output cut at ``###``. Prompts that do not fit the model with their
new tokens are skipped and counted; ``task.min_prompt_tokens`` keeps only the long prompts (those past
a state's training windows, say), to test them in numbers a first-N sample does not hold. Scores are
ROUGE-1/2/L F-measures (rouge-score, stemmed) and the output's length and repetition
(``tasks.repetition``), averaged over the scored samples; ``less-report`` pairs runs on the same samples.

Rows are appended to ``summaries.jsonl`` batch by batch, tagged with a key of everything that shapes
the output, so a killed job rerun in the same folder continues where it stopped and gives the same
rows as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from less_exp import data, prompts
from less_exp.errors import ConfigError
from less_exp.models import max_positions
from less_exp.report_spec import PairedRows, ReportSpec
from less_exp.runtime import output_dir
from less_exp.adapter import cache_kwargs
from less_exp.tasks.generate import new_cache
from less_exp.tasks.repetition import METRICS as REPETITION, repetition
from less_exp.tracking import Tracker

ROUGE = ("rouge1", "rouge2", "rougeL")
ROWS = "summaries.jsonl"
REPORT = ReportSpec(
    columns=(*ROUGE, "repeated_3gram_share", "looping", "longest_repeat", "words", "*_vs_plain*", "paired_samples", "num_samples", "num_skipped", "prompt_format"),
    headline="rouge1", lower_is_better=False, plots=ROUGE,
    paired=PairedRows(ROWS, ("rouge1", "rougeL", "repeated_3gram_share", "looping"), "rouge1"),
)


def dataset(cfg: DictConfig) -> DictConfig:
    """The task's data preset, with ``task.data_path`` (a jsonl of the preset's fields) replacing its local file."""
    ds = OmegaConf.create(OmegaConf.to_container(cfg.task.dataset, resolve=True))
    if cfg.task.get("data_path"):
        ds.local.files[cfg.task.split] = str(Path(str(cfg.task.data_path)).expanduser().resolve())
    return ds


def validate(cfg: DictConfig) -> None:
    """The records file or data set is there (the schema bounds the values)."""
    task = cfg.task
    if task.get("data_path") and not Path(str(task.data_path)).expanduser().is_file():
        raise ConfigError(f"task.data_path={task.data_path} is not a file (a jsonl with the fields {dict(task.dataset.local.fields)})")
    data.check_available(dataset(cfg), task.split)


def prompt_texts(cfg: DictConfig, tokenizer, records: list[dict]) -> tuple[list[str], bool]:
    """The records' prompts as the model reads them (``task.instruction``, then the prompt format) and
    whether that is the chat template."""
    chat = prompts.use_chat(cfg.task.get("prompt_format", "raw"), cfg.model, tokenizer)
    return [prompts.render(tokenizer, prompts.with_instruction(r["input"], cfg.task.get("instruction")), chat) for r in records], chat


def run_key(cfg: DictConfig, records: list[dict]) -> str:
    """A short hash of everything that decides the generated text and its scores: the config and the
    prompts and references themselves, so rows written for an older data file are never reused."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "policy", "feature_map", "gating", "reweighting", "normalizer")}
    task = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items()
            if k != "batch_size" and not (k == "min_prompt_tokens" and v is None)}  # unset: the key of runs before it existed
    data = hashlib.sha1(json.dumps([[r["input"], r["target"]] for r in records]).encode()).hexdigest()
    blob = json.dumps({**parts, "task": task, "checkpoint": cfg.get("checkpoint"), "seed": cfg.seed, "data": data},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def cut(text: str, stop: str | None) -> str:
    """The output up to the stop string, stripped."""
    return (text.split(stop, 1)[0] if stop else text).strip()


def _batches(lengths: dict[int, int], batch_size: int) -> list[list[int]]:
    """Record indices grouped by similar prompt length (less padding, similar ratio budgets)."""
    order = sorted(lengths, key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def done_rows(path: Path, key: str, wanted) -> dict[int, dict]:
    """Rows of this run (same config and data) already on disk for the ``wanted`` indices; a line cut
    short by a kill is dropped from the file; rows of another config or data file are left there and
    said so, never reused."""
    if not path.is_file():
        return {}
    good, rows, stale = [], {}, 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        good.append(line)
        if row.get("run_key") == key and row.get("index") in wanted:
            rows[row["index"]] = row
        else:
            stale += 1
    if stale:
        print(f"{path.name}: {stale} rows of another configuration or data file are not reused")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in good), encoding="utf-8")
    os.replace(tmp, path)
    return rows


def run(model, tokenizer, cfg: DictConfig, tracker: Tracker) -> dict:
    from rouge_score import rouge_scorer

    task = cfg.task
    records = data.load_records(dataset(cfg), task.split)
    if task.num_samples is not None:
        records = records[: task.num_samples]
    limit = max_positions(cfg.model)
    texts, chat = prompt_texts(cfg, tokenizer, records)
    encoded = {i: ids for i, ids in enumerate(prompts.encode(tokenizer, texts, chat)["input_ids"])}
    lengths = {i: len(ids) for i, ids in encoded.items() if len(ids) + task.max_new_tokens <= limit}
    skipped = len(records) - len(lengths)
    if not lengths:
        raise ConfigError(f"{task.name}: none of the {len(records)} prompts fits model.max_length={limit} with "
                          f"task.max_new_tokens={task.max_new_tokens}")
    shortest = task.get("min_prompt_tokens")
    if shortest is not None:
        longest = max(lengths.values())
        lengths = {i: n for i, n in lengths.items() if n >= shortest}
        if not lengths:
            raise ConfigError(f"{task.name}: none of the {len(records)} prompts has task.min_prompt_tokens={shortest} tokens "
                              f"(the longest that fits has {longest}); lower it or raise task.num_samples")
    key, path = run_key(cfg, records), output_dir(cfg) / ROWS
    rows = done_rows(path, key, lengths)
    if rows:
        print(f"{task.name}: resuming, {len(rows)} of {len(lengths)} samples already in {path}")
    scorer = rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=True)
    device = next(model.parameters()).device
    sampling = {"do_sample": bool(task.do_sample)}
    if task.do_sample:
        sampling.update(temperature=float(task.temperature), top_p=float(task.top_p), top_k=0)
    stop = {"stop_strings": [task.stop], "tokenizer": tokenizer} if task.stop else {}
    seconds, new_tokens = 0.0, 0
    batches = _batches(lengths, task.batch_size)
    with path.open("a", encoding="utf-8") as sink, tqdm(total=len(lengths), initial=len(rows), desc=task.name, unit="sample") as bar:
        for batch in batches:
            if all(i in rows for i in batch):
                continue
            inputs = prompts.encode(tokenizer, [texts[i] for i in batch], chat, return_tensors="pt", padding=True).to(device)
            torch.manual_seed(cfg.seed * 1_000_003 + batch[0])
            began = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**inputs, **cache_kwargs(new_cache(model)), max_new_tokens=task.max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, **sampling, **stop)
            seconds += time.perf_counter() - began
            generated = out[:, inputs.input_ids.shape[1] :]
            new_tokens += int((generated != tokenizer.pad_token_id).sum())
            for i, ids in zip(batch, generated):
                summary = cut(tokenizer.decode(ids, skip_special_tokens=True), task.stop)
                scores = scorer.score(records[i]["target"], summary)
                row = {"index": i, "run_key": key, "prompt_tokens": lengths[i], "summary": summary, "target": records[i]["target"],
                       **{m: scores[m].fmeasure for m in ROUGE}, **repetition(summary)}
                sink.write(json.dumps(row) + "\n")
                rows[i] = row
            sink.flush()
            bar.update(len(batch))
            tracker.log({f"{task.name}/{m}_running": _mean(rows, m) for m in ROUGE}, step=bar.n)
    scored = [rows[i] for i in sorted(lengths)]
    tracker.log_table(f"{task.name}/summaries", ["index", "summary", "target", *ROUGE],
                      [[r["index"], r["summary"], r["target"], *(r[m] for m in ROUGE)] for r in scored[:100]])
    for row in scored[:2]:
        print(f"--- [{row['index']}] {row['summary']!r}\n    reference: {row['target']!r}")
    for row in scored:  # rows written before repetition was measured get it now
        if any(m not in row for m in REPETITION):
            row.update(repetition(row["summary"]))
    metrics = {m: _mean(rows, m) for m in (*ROUGE, *REPETITION)}
    metrics.update(num_samples=len(scored), num_skipped=skipped, prompt_format="chat" if chat else "raw",
                   mean_prompt_tokens=sum(lengths.values()) / max(len(lengths), 1))
    if seconds:
        metrics["tokens_per_s"] = new_tokens / seconds
    metrics["budget_length"] = round(metrics["mean_prompt_tokens"])
    return metrics


def _mean(rows: dict[int, dict], metric: str) -> float:
    return sum(r[metric] for r in rows.values()) / len(rows) if rows else 0.0
