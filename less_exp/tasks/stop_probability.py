"""``task=stop_probability``: how readily a model ends an answer that another run ended.

Summaries that loop are summaries that did not stop. This task reads the ``summaries.jsonl`` of an
earlier summarization run (``task.summaries``, usually the plain policy's in the generation check),
keeps the summaries that ended at a sentence and repeat nothing (``task.max_repetition``), and asks the
model under test, with the real evicting cache (the prompt prefilled, the summary decoded token by
token as ``generate`` would), for the probability of an end token right after that summary. The same
rows for the full cache, the plain policy and a trained state say whether a state changes the decision
to stop where the reference run stopped. ``less-report`` pairs ``log_p_end`` with the plain policy's
on the same samples.

Greedy decoding stops only where an end token is the most likely token, so each row also says whether
it is (``greedy_stop``); ``greedy_stop_share`` is the share of the summaries that greedy decoding with
the model under test would end where the reference did.

Rows go to ``stops.jsonl`` (index, prompt_tokens, p_end, log_p_end, greedy_stop) one by one, tagged with
a key of the config, the data and the summaries read, so a killed job rerun in the same folder continues.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from less_exp import data, prompts
from less_exp.adapter import compression_of
from less_exp.errors import ConfigError
from less_exp.models import end_token_ids, max_positions
from less_exp.report_spec import PairedRows, ReportSpec
from less_exp.runtime import output_dir
from less_exp.tasks.consistency import decode_logits
from less_exp.tasks.repetition import repetition
from less_exp.tasks.summarization import dataset, done_rows, prompt_texts, run_key
from less_exp.tracking import Tracker

ROWS = "stops.jsonl"
REPORT = ReportSpec(
    columns=("mean_p_end", "mean_log_p_end", "greedy_stop_share", "*_vs_plain*", "paired_samples", "num_samples", "num_skipped",
             "longest_prompt_tokens"),
    headline="mean_log_p_end", lower_is_better=False,
    paired=PairedRows(ROWS, ("log_p_end",), "mean_log_p_end"),
)
FORMAT = 2  # of the rows: 2 adds greedy_stop
SENTENCE_ENDS = (".", "!", "?")


def validate(cfg: DictConfig) -> None:
    task = cfg.task
    if not task.summaries or not Path(str(task.summaries)).expanduser().is_file():
        raise ConfigError(f"task.summaries={task.summaries} is not a file: give the summaries.jsonl of a task=xsum or "
                          "task=cnn_dailymail run (e.g. the plain run of less-study study=sink_generation: "
                          "outputs/studies/sink_generation/eval/xsum/plain/summaries.jsonl)")
    data.check_available(dataset(cfg), task.split)
    read_summaries(Path(str(task.summaries)).expanduser())  # a foreign file fails before the model loads


def read_summaries(path: Path) -> list[dict]:
    """The rows of a summarization run; a file without them is a user error named with its path. A row
    written before summaries carried their repetition gets it measured here."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            summary = str(row["summary"])
            share = row["repeated_3gram_share"] if "repeated_3gram_share" in row else repetition(summary)["repeated_3gram_share"]
            rows.append({"index": int(row["index"]), "summary": summary, "repeated_3gram_share": float(share)})
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"task.summaries={path}: line {number} is not a summaries.jsonl row "
                              f"({type(err).__name__}: {err}); give the file a task=xsum run wrote") from None
    return rows


def eligible(row: dict, task: DictConfig) -> bool:
    """A summary that ended at a sentence without repeating itself."""
    return row["summary"].endswith(SENTENCE_ENDS) and row["repeated_3gram_share"] <= task.max_repetition


@torch.no_grad()
def log_p_end(model, prompt: list[int], answer: list[int], ends: list[int]) -> tuple[float, bool]:
    """``log P(end token | prompt + answer)`` and whether an end token is the most likely next token, the
    prompt prefilled and the answer decoded one token at a time through the real evicting cache (one pass
    for the full cache)."""
    ids = torch.tensor([prompt + answer], device=next(model.parameters()).device)
    if compression_of(model) is None or not answer:
        logits = model(ids, use_cache=False).logits[0, -1]
    else:
        logits = decode_logits(model, ids, prefill=len(prompt))[0, -1]
    logp = logits.float().log_softmax(-1)
    return torch.logsumexp(logp[ends], dim=-1).item(), int(logp.argmax()) in ends


def run(model, tokenizer, cfg: DictConfig, tracker: Tracker) -> dict:
    task = cfg.task
    path = Path(str(task.summaries)).expanduser()
    records = data.load_records(dataset(cfg), task.split)
    ends = sorted(end_token_ids(model, tokenizer))
    if not ends:
        raise ConfigError(f"model {cfg.model.name}: neither its generation config nor its tokenizer names an end token")
    limit = max_positions(cfg.model)
    texts, chat = prompt_texts(cfg, tokenizer, records)
    chosen, skipped = [], 0
    for row in read_summaries(path):
        if not 0 <= row["index"] < len(records):
            raise ConfigError(f"task.summaries={path}: sample {row['index']} is not in {task.dataset.name} {task.split} "
                              f"({len(records)} records); give the summaries of a run on the same data")
        prompt = prompts.encode(tokenizer, texts[row["index"]], chat)["input_ids"]
        too_long = task.max_prompt_tokens is not None and len(prompt) > task.max_prompt_tokens
        if not eligible(row, task) or too_long:
            skipped += 1
            continue
        answer = tokenizer(row["summary"], add_special_tokens=False)["input_ids"]
        if len(prompt) + len(answer) > limit:
            skipped += 1
            continue
        chosen.append((row["index"], prompt, answer))
    if not chosen:
        raise ConfigError(f"task.summaries={path}: no summary ends a sentence with repetition <= "
                          f"task.max_repetition={task.max_repetition} within task.max_prompt_tokens={task.max_prompt_tokens}")
    key = hashlib.sha1(f"{FORMAT}:{run_key(cfg, records)}:{hashlib.sha1(path.read_bytes()).hexdigest()}".encode()).hexdigest()[:12]
    out = output_dir(cfg) / ROWS
    rows = done_rows(out, key, {index for index, _, _ in chosen})
    if rows:
        print(f"stop_probability: resuming, {len(rows)} of {len(chosen)} samples already in {out}")
    with out.open("a", encoding="utf-8") as sink:
        todo = [item for item in chosen if item[0] not in rows]
        for index, prompt, answer in tqdm(todo, desc="stop probability", unit="sample", total=len(chosen), initial=len(rows)):
            value, greedy = log_p_end(model, prompt, answer, ends)
            rows[index] = {"index": index, "run_key": key, "prompt_tokens": len(prompt), "p_end": math.exp(value),
                           "log_p_end": value, "greedy_stop": greedy}
            sink.write(json.dumps(rows[index]) + "\n")
            sink.flush()
    n = len(rows)
    return {"mean_p_end": sum(r["p_end"] for r in rows.values()) / n,
            "mean_log_p_end": sum(r["log_p_end"] for r in rows.values()) / n,
            "greedy_stop_share": sum(r["greedy_stop"] for r in rows.values()) / n,
            "num_samples": n, "num_skipped": skipped, "longest_prompt_tokens": max(r["prompt_tokens"] for r in rows.values()),
            "prompt_format": "chat" if chat else "raw"}
