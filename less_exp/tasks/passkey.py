"""``task=passkey``: long-context recall, the ability LESS exists for.

For every context length, depth and trial a prompt of filler text hides a random passkey at that
depth (:mod:`less_exp.passkey`); the model completes "The pass key is" greedily with the real
evicting cache, and a prompt counts as correct when the first number it generates is the passkey.
Accuracy per (context length, depth) cell goes to ``results.json`` (``passkey_grid``), a text
table, ``passkey_heatmap.png`` and W&B; every prompt's answer goes to ``passkey.jsonl``.
"""

from __future__ import annotations

import json

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from less_exp import passkey
from less_exp.errors import ConfigError
from less_exp.report_plots import accuracy_heatmap
from less_exp.report_spec import ReportSpec
from less_exp.runtime import output_dir
from less_exp.adapter import cache_kwargs
from less_exp.tasks.generate import new_cache
from less_exp.tracking import Tracker

REPORT = ReportSpec(columns=("accuracy", "accuracy@*", "num_prompts"), headline="accuracy", lower_is_better=False, plots=("accuracy",))
ROWS_FILE = "passkey.jsonl"
HEATMAP_FILE = "passkey_heatmap.png"


def validate(cfg: DictConfig) -> None:
    """Nothing beyond :mod:`less_exp.schema` (the grid, the lengths against ``model.max_length``):
    whether the shortest length holds the instruction, needle and question needs the tokenizer, so
    :func:`run` checks that before it generates anything."""


def prompts(tokenizer, cfg: DictConfig) -> list[passkey.PasskeyPrompt]:
    """Every prompt of the grid, length-major, then depth, then trial; a too-short length fails."""
    task, out = cfg.task, []
    for length in task.context_lengths:
        for depth in map(float, task.depths):
            for trial in range(task.trials):
                key = passkey.draw_passkey(task.digits, cfg.seed, length, depth, trial)
                try:
                    out.append(passkey.build_prompt(tokenizer, length, depth, key))
                except ValueError as err:
                    raise ConfigError(f"task.context_lengths has {length}: {err}") from None
    return out


def run(model, tokenizer, cfg: DictConfig, tracker: Tracker) -> dict:
    task = cfg.task
    lengths, depths = list(task.context_lengths), [float(d) for d in task.depths]
    todo = prompts(tokenizer, cfg)
    device = next(model.parameters()).device
    per_cell = len(depths) * task.trials
    rows = []
    with tqdm(total=len(todo), desc="passkey", unit="prompt") as bar:
        for i, length in enumerate(lengths):  # batches never mix context lengths: little padding
            cell_prompts = todo[i * per_cell : (i + 1) * per_cell]
            for start in range(0, per_cell, task.batch_size):
                chunk = cell_prompts[start : start + task.batch_size]
                batch = tokenizer([p.text for p in chunk], return_tensors="pt", padding=True).to(device)
                with torch.inference_mode():
                    out = model.generate(**batch, **cache_kwargs(new_cache(model)), max_new_tokens=task.max_new_tokens,
                                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
                for prompt, ids in zip(chunk, out[:, batch.input_ids.shape[1] :]):
                    output = tokenizer.decode(ids, skip_special_tokens=True)
                    rows.append({"context_length": length, "depth": prompt.depth, "tokens": prompt.num_tokens,
                                 "passkey": prompt.passkey, "answer": passkey.answer_of(output), "output": output,
                                 "correct": passkey.is_correct(output, prompt.passkey)})
                bar.update(len(chunk))
    grid = [[_mean(r["correct"] for r in rows if r["context_length"] == n and r["depth"] == d) for d in depths] for n in lengths]
    out_dir = output_dir(cfg)
    with open(out_dir / ROWS_FILE, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    title = f"passkey retrieval: {cfg.model.name}, policy={cfg.policy.name}"
    heatmap = accuracy_heatmap(grid, lengths, depths, out_dir / HEATMAP_FILE, title)
    columns = list(rows[0])
    tracker.log_table("passkey", columns, [[r[c] for c in columns] for r in rows])
    tracker.log_table("passkey_grid", ["context_length", *map(str, depths)], [[n, *accs] for n, accs in zip(lengths, grid)])
    tracker.log_image("passkey_heatmap", str(heatmap), caption=title)
    print(format_table(grid, lengths, depths))
    metrics = {"accuracy": _mean(r["correct"] for r in rows), "num_prompts": len(rows)}
    metrics.update({f"accuracy@{n}": _mean(accs) for n, accs in zip(lengths, grid)})
    metrics["passkey_grid"] = {"context_lengths": lengths, "depths": depths, "accuracy": grid}
    metrics["budget_length"] = max(lengths)
    return metrics


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def format_table(grid: list[list[float]], lengths: list[int], depths: list[float]) -> str:
    """Accuracy per context length (rows) and depth (columns) as fixed-width text."""
    lines = [f"{'length':>8} | " + " ".join(f"{d:>6.2f}" for d in depths) + " |   mean"]
    lines.append("-" * len(lines[0]))
    for n, accs in zip(lengths, grid):
        lines.append(f"{n:>8} | " + " ".join(f"{a:>6.2f}" for a in accs) + f" | {_mean(accs):>6.2f}")
    return "\n".join(lines)
