"""``task=wikitext_harness`` and ``task=harness``: EleutherAI's lm-eval on the in-memory model.

The model goes to lm-eval as an instance with its policy and state attached, so every harness task
scores the compressed model. ``task.names=null`` (``wikitext_harness``) runs a task YAML of the
project's own over the local WikiText text: one document, the text the perplexity task scores,
rolling log-likelihood, lm-eval's word perplexity, byte perplexity and bits per byte. Otherwise
``task.names`` are any installed harness tasks (or YAMLs of your own under ``task.include_path``),
whose data must be reachable.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path

from omegaconf import DictConfig

from less_exp import data, hub
from less_exp.adapter import CACHE_ARG, LessCache, compression_of
from less_exp.errors import ConfigError, UnavailableError
from less_exp.report_spec import ReportSpec
from less_exp.runtime import output_dir
from less_exp.tasks import perplexity
from less_exp.tracking import Tracker

REPORT = ReportSpec(  # lm-eval's own tasks as <task>/<metric>; the project's WikiText task as rolling numbers
    columns=("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "num_tokens", "*/*"),
    headline="word_perplexity", plots=("word_perplexity",),
)
LOCAL_TASK = "less_wikitext"
ROLLING_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def validate(cfg: DictConfig) -> None:
    """The lm-eval task names exist and their data is reachable (the schema bounds the values)."""
    task = cfg.task
    if task.names is None:
        perplexity.validate_text(cfg)
        return
    names = list(task.names)
    include = task.get("include_path")
    if include and not Path(str(include)).expanduser().is_dir():
        raise ConfigError(f"task.include_path={include} is not a folder of lm-eval task YAMLs")
    installed = set(_task_manager(None).all_tasks)
    known = set(_task_manager(_include(task)).all_tasks) if include else installed
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5)
            raise ConfigError(f"task.names: {name!r} is not an installed lm-eval task" + (f"; did you mean {close}?" if close else ""))
    from_hub = [n for n in names if n in installed]
    if from_hub and not hub.env_flag("HF_DATASETS_OFFLINE") and not hub.hub_reachable():
        raise UnavailableError(
            f"task.names {from_hub} read their data from the Hugging Face hub, which is not reachable. Use "
            "task=wikitext_harness (offline), task YAMLs of your own over local files (task.include_path), or "
            "HF_DATASETS_OFFLINE=1 when the data sets are already in the local datasets cache."
        )


def _include(task: DictConfig) -> Path | None:
    include = task.get("include_path")
    return Path(str(include)).expanduser().resolve() if include else None


def _task_manager(include_path: Path | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None, verbosity="ERROR")


def harness_lm(model, tokenizer, task: DictConfig):
    """lm-eval's HF wrapper around the in-memory model; generation uses the real evicting cache."""
    from lm_eval.models.huggingface import HFLM

    class CompressedHFLM(HFLM):
        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if compression_of(self.model) is not None:
                generation_kwargs[CACHE_ARG] = LessCache(self.model)
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    device = next(model.parameters()).device
    return CompressedHFLM(pretrained=model, tokenizer=tokenizer, max_length=task.seq_len, batch_size=task.batch_size, device=str(device))


def write_local_task(folder: Path, text: str) -> Path:
    """A task YAML and its one-document jsonl under ``folder``: rolling log-likelihood of ``text``."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = folder / f"{LOCAL_TASK}.jsonl"
    docs.write_text(json.dumps({"page": text}) + "\n", encoding="utf-8")
    lines = [
        f"task: {LOCAL_TASK}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(docs.resolve()))}}}}}",
        "test_split: test",
        "output_type: loglikelihood_rolling",
        'doc_to_text: ""',
        "doc_to_target: page",
        "metric_list:",
        *[f"  - {{metric: {m}, aggregation: {'bits_per_byte' if m == 'bits_per_byte' else 'weighted_perplexity'}, higher_is_better: false}}"
          for m in ROLLING_METRICS],
    ]
    (folder / f"{LOCAL_TASK}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def flatten(results: dict) -> dict:
    """``{task/metric: value}`` for the numeric metrics of lm-eval's ``results`` (filters dropped
    when ``none``)."""
    metrics = {}
    for name, values in results.items():
        for key, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key:
                continue
            metric, _, flt = key.partition(",")
            metrics[f"{name}/{metric}" + ("" if flt in ("", "none") else f"/{flt}")] = float(value)
    return metrics


def run(model, tokenizer, cfg: DictConfig, tracker: Tracker) -> dict:
    from lm_eval import simple_evaluate

    task = cfg.task
    out = output_dir(cfg)
    lm = harness_lm(model, tokenizer, task)
    text = None
    if task.names is None:  # a json file of our own: lm-eval's json builder reads it with no network
        _, text = data.scored_windows(tokenizer, data.load_text(cfg.data, task.split), task.seq_len, task.max_windows)
        names, manager = [LOCAL_TASK], _task_manager(write_local_task(out / "harness_tasks", text))
    else:
        names, manager = list(task.names), _task_manager(_include(task))
    output = simple_evaluate(
        model=lm, tasks=names, task_manager=manager, limit=task.get("limit"), num_fewshot=task.get("num_fewshot"),
        bootstrap_iters=0, random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )
    (out / "harness_results.json").write_text(json.dumps(output["results"], indent=2, default=str) + "\n", encoding="utf-8")
    metrics = flatten(output["results"])
    tracker.log_table("harness", ["metric", "value"], [[k, v] for k, v in metrics.items()])
    if text is None:
        return metrics
    return _rolling_summary(metrics, tokenizer, text)


def _rolling_summary(metrics: dict, tokenizer, text: str) -> dict:
    """lm-eval's three numbers plus the counts and the token perplexity they imply."""
    words = data.count_words(text)
    tokens = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    word_ppl = metrics[f"{LOCAL_TASK}/word_perplexity"]
    total_nll = math.log(word_ppl) * words
    return {
        "word_perplexity": word_ppl,
        "byte_perplexity": metrics[f"{LOCAL_TASK}/byte_perplexity"],
        "bits_per_byte": metrics[f"{LOCAL_TASK}/bits_per_byte"],
        "perplexity": math.exp(total_nll / tokens),
        "num_tokens": tokens,
        "num_words": words,
        "num_bytes": data.count_bytes(text),
    }
