"""One schema for the composed configuration: every key of every config group, typed and bounded.

:func:`check` walks a composed ``train``/``eval`` config once, before anything heavy is imported or
loaded: an unknown or misspelt key, a value of the wrong type, a non-finite number, a value out of
range or not among a key's choices is one :class:`ConfigError` line naming the key. The YAML groups
keep their defaults and comments; this module says what each key may hold. :data:`RULES` are the
cross-key checks a per-key bound cannot express, in one place; the checks that need the model, the
data files or the engine's objects (a budget that fits, a split on disk) stay with the code that has them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from less_exp.errors import ConfigError
from less_exp.prompts import FORMATS
from less_exp.validation import number

SPLITS = ("train", "validation", "test")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Key:
    """What one key may hold: a kind (int, num, bool, str, list, any), bounds for numbers,
    choices for strings, the spec of a list's items, and whether null is allowed."""

    kind: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    items: "Key | None" = None
    nonempty: bool = False
    null: bool = False
    why: str = ""
    alt: "Key | None" = None  # a second form the value may take instead


    def problem(self, value) -> str | None:
        """Why ``value`` does not fit, as ``must be ...``; None when it fits."""
        if self.alt is not None and self.alt.problem(value) is None:
            return None
        if value is None:
            return None if self.null else f"must be {self.describe()}"
        if self.kind == "any":
            return None
        if not self._typed(value):
            return f"must be {self.describe()}"
        if self.kind in ("int", "num"):
            if not math.isfinite(value) or any(self._out_of_bounds(value)):
                return f"must be {self.describe()}"
        if self.choices is not None and value not in self.choices:
            return f"must be {self.describe()}"
        if self.kind == "list":
            if self.nonempty and not value:
                return f"must be {self.describe()}"
            for item in value:
                if self.items is not None and self.items.problem(item):
                    return f"must be {self.describe()} (not {item!r})"
        return None

    def _typed(self, value) -> bool:
        if self.kind == "int":
            return isinstance(value, int) and not isinstance(value, bool)
        if self.kind == "num":
            return number(value)
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str)
        return isinstance(value, (list, tuple, ListConfig))  # "list", the one kind left

    def _out_of_bounds(self, value):
        yield self.ge is not None and value < self.ge
        yield self.gt is not None and value <= self.gt
        yield self.le is not None and value > self.le
        yield self.lt is not None and value >= self.lt

    def describe(self) -> str:
        """``an integer >= 1``, ``a number in (0, 1]``, ``one of disjoint, rolling``, ... (``or null``)."""
        if self.kind in ("int", "num"):
            noun = "an integer" if self.kind == "int" else "a number"
            low = ("(", self.gt) if self.gt is not None else ("[", self.ge) if self.ge is not None else None
            high = (self.lt, ")") if self.lt is not None else (self.le, "]") if self.le is not None else None
            if self.kind == "int" and low == ("[", 1) and not high:
                text = "a positive integer"
            elif low and high:
                text = f"{noun} in {low[0]}{_fmt(low[1])}, {_fmt(high[0])}{high[1]}"
            elif low:
                text = f"{noun} {'>' if low[0] == '(' else '>='} {_fmt(low[1])}"
            elif high:
                text = f"{noun} {'<' if high[1] == ')' else '<='} {_fmt(high[0])}"
            else:
                text = "a finite number" if self.kind == "num" else noun
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "str":
            text = f"one of {', '.join(map(str, self.choices))}" if self.choices else "a string"
        elif self.kind == "list":
            text = f"a {'non-empty ' if self.nonempty else ''}list" + (f" of {_plural(self.items.describe())}" if self.items else "")
        else:
            text = "anything"
        text += f" or {self.alt.describe()}" if self.alt is not None else ""
        text += " or null" if self.null else ""
        return text + (f" ({self.why})" if self.why else "")


def _fmt(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _plural(text: str) -> str:
    for one, many in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings")):
        if text.startswith(one):
            return many + text[len(one):]
    return text


def Int(ge=None, le=None, gt=None, null=False, why="") -> Key:
    return Key("int", ge=ge, le=le, gt=gt, null=null, why=why)


def Num(ge=None, le=None, gt=None, lt=None, null=False, why="", alt=None) -> Key:
    return Key("num", ge=ge, le=le, gt=gt, lt=lt, null=null, why=why, alt=alt)


def Bool(why="") -> Key:
    return Key("bool", why=why)


def Str(*choices, null=False, why="") -> Key:
    return Key("str", choices=tuple(choices) or None, null=null, why=why)


def List(items: Key | None = None, nonempty=False, null=False, why="") -> Key:
    return Key("list", items=items, nonempty=nonempty, null=null, why=why)


ANY = Key("any", null=True)
POS = Int(ge=1)
SEED = Int(ge=0, le=2**32 - 1, why="a random seed; NumPy takes 0 to 2^32 - 1")
LABEL = Str()
TARGET = Str()
PROMPT_FORMAT = Str(*FORMATS)

# The sections: each maps a key to its spec, or to another section's name for a nested node
# (a data set inside a task or a mixture). "*" stands for any key of a mapping that the user names.
SECTIONS: dict[str, dict[str, Key | str]] = {
    "": {
        "seed": SEED,
        "device": Str(why="auto, cpu, cuda or cuda:N"),
        "checkpoint": Str(null=True, why="a less-train checkpoint folder"),
        "checkpoint_budget": Str("trained", "any"),
        "model": "model", "data": "data", "policy": "policy", "feature_map": "feature_map", "gating": "gating",
        "reweighting": "reweighting", "normalizer": "normalizer", "training": "training", "task": "task",
        "logger": "logger", "paths": "open", "hydra": "open", "optimized_metric": Str(null=True),
    },
    "model": {
        "name": LABEL, "source": Str("embedded", "hub", "tiny", "local"), "package": Str(), "gguf_file": Str(),
        "cache_name": Str(), "hub_id": Str(), "revision": Str(null=True), "path": Str(),
        "model_type": Str(), "seed": SEED, "dtype": Str(*DTYPES), "max_length": Int(ge=2, why="positions the model handles"),
        "shape": "model_shape", "config": "model_config", "trust_remote_code": Bool(),
        "instruct": Bool(),
    },
    "model_config": {  # a tiny model's transformers config: any key of it, the sizes positive
        "*": ANY, **{k: POS for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                      "head_dim", "vocab_size", "intermediate_size", "max_position_embeddings")},
    },
    "model_shape": {"layers": POS, "heads": POS, "kv_heads": POS, "head_dim": POS},
    "policy": {
        "_target_": TARGET, "name": LABEL,
        **{k: Num(ge=0, why="a token count, or a ratio with policy.ratio_of") for k in ("sink", "heavy", "recent")},
        "ratio_of": Str("max_positions", "length", null=True), "baseline_plus": Bool(),
        "prefill": Str("stepwise", "one_shot"),
    },
    "feature_map": {
        "_target_": TARGET, "name": LABEL, "features": Int(ge=1, null=True, why="the state's feature count"),
        "hidden": POS, "key_scale_init": Num(gt=0), "seed": SEED, "learn_projection": Bool(),
        "dropout": Num(ge=0, lt=1), "per_head": Bool(),
    },
    "gating": {
        "_target_": TARGET, "name": LABEL, "gamma": Num(gt=0, le=1, null=True, alt=List(Num(gt=0, le=1), nonempty=True),
                                                      why="the decay per step; a list: one per KV head; null: RetNet's"), "exponent": Num(ge=0),
        "learned": Bool(), "chunk_size": POS, "temperature": Num(gt=0), "bias": Num(), "rank": POS, "seed": SEED,
    },
    "reweighting": {"_target_": TARGET, "name": LABEL, "horizon": POS, "hidden": POS, "seed": SEED},
    "normalizer": {"_target_": TARGET, "name": LABEL, "eps": Num(gt=0, le=1)},
    "logger": {
        "name": Str("wandb", "none"), "mode": Str("offline", "online", "disabled", "shared"), "project": Str(),
        "entity": Str(null=True), "group": Str(null=True), "job_type": Str(null=True),
        "tags": List(Str()), "run_name": Str(null=True), "notes": Str(null=True),
    },
    "data": {
        "name": LABEL, "local": "data_local", "hub": "data_hub", "text_field": Str(), "text_regex": Str(null=True),
        "join": Str(), "source": "data", "mixture": "data_mixture", "weights": "data_weights", "answers": "data_answers",
    },
    "data_mixture": {"*": "data"},
    "data_weights": {"*": Num(gt=0, why="a share of the mixture")},
    "data_local": {"dir": Str(), "files": "data_files", "rows": "data_rows", "fields": "data_fields"},
    "data_files": {split: Str(null=True, why="null: read the split from the hub") for split in SPLITS},
    "data_rows": {split: List(Int(ge=0)) for split in SPLITS},
    "data_fields": {"input": Str(), "target": Str()},
    "data_hub": {
        "path": Str(), "name": Str(null=True), "streaming": Bool(), "max_rows": Int(ge=1, null=True),
        "splits": "data_hub_splits", "fields": "data_fields", "prompt": Str(), "text_field": Str(),
    },
    "data_hub_splits": {split: Str() for split in SPLITS},
    "data_answers": {
        "templates": List(Str(), nonempty=True, why="each with a {text} field for the document"),
        "max_doc_tokens": POS, "min_doc_tokens": POS, "max_new_tokens": POS, "stop": Str(null=True),
        "weight": Num(gt=0, why="1: answers weigh like document text"), "drop_unfinished": Bool(),
        "max_repetition": Num(ge=0, le=1, null=True, why="null keeps every answer"),
        "student_share": Num(ge=0, le=1, why="0: the teacher answers every prompt"),
        "prompt_format": PROMPT_FORMAT,
    },
    "training": {
        "mode": Str("layerwise", "e2e", "progressive", "interpolate"),
        "from_layer": Int(ge=0), "to_layer": Int(ge=1, null=True, why="null: through the last layer"),
        "split": Str(*SPLITS), "num_sequences": Int(ge=2, why="one to train on, one to validate"), "seq_len": Int(ge=2),
        "val_fraction": Num(gt=0, lt=1), "epochs": POS, "batch_size": POS, "lr": Num(gt=0), "lr_step_epochs": POS,
        "lr_gamma": Num(gt=0, le=1), "weight_decay": Num(ge=0),
        "scale_lr": Num(gt=0, null=True, why="null: training.lr"), "gate_lr": Num(gt=0, null=True, why="null: training.lr"),
        "record_dtype": Str(*DTYPES), "record_batch_size": POS,
        "layers_per_recording": Int(ge=1, null=True, why="null: every layer in one recording"),
        "record_dir": Str(), "keep_records": Bool(), "init_from": Str(null=True), "toward": Str(null=True),
        "alpha": Num(ge=0, le=1, why="the share of training.toward's states"),
        "unlikelihood": Num(ge=0, why="0: off"), "unlikelihood_ngram": Int(ge=1, why="tokens"),
        "no_repeat_ngram": Int(ge=2, null=True, why="tokens; null: the teacher's own targets"),
        "end_target": Num(gt=0, le=1, null=True, why="null: the teacher's own stops"),
        "end_weight": Num(gt=0, why="1: stops weigh like other answer tokens"), "top_k": POS,
        "gradient_checkpointing": Bool(), "save_every": Int(ge=1, null=True, why="null: progress saved every epoch only"),
        "after": Str("init", "plain", why="what the layers after a stage run"),
        "window": Int(ge=1, why="layers trained together"), "mse_weight": Num(ge=0),
    },
    "task": {
        "name": LABEL, "module": Str(null=True), "split": Str(*SPLITS), "dataset": "data",
        "seq_len": Int(ge=2), "max_windows": Int(ge=1, null=True, why="null: every window"), "batch_size": POS,
        "windows": Str("disjoint", "rolling"),
        "context_lengths": List(Int(ge=2), nonempty=True), "depths": List(Num(ge=0, le=1), nonempty=True, why="0 = start, 1 = end"),
        "trials": POS, "digits": POS, "max_new_tokens": POS, "decode_tokens": POS, "warmup_tokens": Int(ge=0),
        "prefill_chunk": Int(ge=1, null=True, why="null: the whole context in one forward"),
        "memory_cap_gb": Num(gt=0, null=True, why="null: no throughput measurement"), "max_batch": POS, "throughput_tokens": POS,
        "methods": List(Str("full", "policy", "less"), nonempty=True),
        "data_path": Str(null=True), "num_samples": Int(ge=1, null=True, why="null: every record"),
        "min_prompt_tokens": Int(ge=1, null=True, why="null: every prompt"), "do_sample": Bool(),
        "temperature": Num(ge=0), "top_p": Num(gt=0, le=1), "stop": Str(null=True),
        "prompts": List(Str(), null=True), "prompt_field": Str(null=True), "num_prompts": POS,
        "names": List(Str(), nonempty=True, null=True, why="lm-eval task names"), "limit": Int(ge=1, null=True, why="null: every document"),
        "num_fewshot": Int(ge=0, null=True), "include_path": Str(null=True),
        "prefill": POS, "chunk": POS, "pad": Int(ge=0, why="left padding of a second row"),
        "summaries": Str(null=True), "max_prompt_tokens": Int(ge=1, null=True, why="null: every prompt"),
        "max_repetition": Num(ge=0, le=1),
        "prompt_format": PROMPT_FORMAT, "instruction": Str(null=True, why="null: the prompt's own"),
    },
}


def check(cfg: DictConfig) -> None:
    """Refuse the first key of ``cfg`` that the schema does not know or whose value does not fit, then
    the first broken cross-key rule; one line each, before anything heavy runs."""
    values = _resolved(cfg, OmegaConf.to_container(cfg, resolve=False), "")
    _walk(values, "", "")
    for rule in RULES:
        rule(values)


def _resolved(cfg: DictConfig, node, path: str):
    """``node`` (the unresolved container) with each interpolation resolved where it can be; one that
    needs Hydra's run (``${hydra:...}`` outside a job) stays as written, a string."""
    if isinstance(node, dict):
        return {k: node[k] if path == "" and k in ("hydra", "paths") else _resolved(cfg, v, f"{path}{k}.")
                for k, v in node.items()}
    if isinstance(node, list):
        return [_resolved(cfg, v, f"{path}{i}.") for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        try:
            value = OmegaConf.select(cfg, path.rstrip("."), throw_on_resolution_failure=True)
        except (OmegaConfBaseException, ValueError):
            return node
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return node


def _walk(node: Mapping, section: str, prefix: str) -> None:
    spec_of = SECTIONS[section]
    for key, value in node.items():
        path = f"{prefix}{key}"
        spec = spec_of.get(str(key), spec_of.get("*"))
        if spec is None:
            known = [k for k in spec_of if k != "*"]
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known: {', '.join(known[:15])}"
            raise ConfigError(f"{path} is not a setting ({hint})")
        if spec == "open":
            continue
        if isinstance(spec, str):
            if value is None and section == "" and key == "task":
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}={value!r} must be a mapping of settings (choose a preset: {key}=<name>)")
            _walk(value, spec, f"{path}.")
            continue
        problem = spec.problem(value)
        if problem:
            raise ConfigError(f"{path}={value!r} {problem}")


def _rule_lengths(cfg: dict) -> None:
    """Sequence and decode lengths fit the model's positions; a prefill fits its sequence."""
    limit = cfg["model"]["max_length"]
    task, training = cfg.get("task") or {}, cfg.get("training") or {}
    for section, node in (("task", task), ("training", training)):
        if isinstance(node.get("seq_len"), int) and node["seq_len"] > limit:
            raise ConfigError(f"{section}.seq_len={node['seq_len']} must be an integer in [2, {limit}] (model.max_length)")
    if "max_new_tokens" in task and task["max_new_tokens"] >= limit:
        raise ConfigError(f"task.max_new_tokens={task['max_new_tokens']} leaves no room for a prompt in model.max_length={limit}")
    lengths = task.get("context_lengths") or []
    extra = task.get("max_new_tokens", task.get("decode_tokens", 0))
    if lengths and max(lengths) + extra > limit:
        raise ConfigError(f"task.context_lengths up to {max(lengths)} + {extra} decoded tokens exceed model.max_length={limit}; "
                          f"use context lengths <= {limit - extra}")
    if "prefill" in task and "seq_len" in task and task["prefill"] >= task["seq_len"]:
        raise ConfigError(f"task.prefill={task['prefill']} must be in [1, task.seq_len={task['seq_len']})")
    if "pad" in task and "seq_len" in task and task["pad"] >= task["seq_len"]:
        raise ConfigError(f"task.pad={task['pad']} must be smaller than task.seq_len={task['seq_len']}")
    if "decode_tokens" in task and task["decode_tokens"] <= task.get("warmup_tokens", 0):
        raise ConfigError(f"task.decode_tokens={task['decode_tokens']} must be larger than task.warmup_tokens={task['warmup_tokens']}")


SCORES_EVERY_TOKEN = ("perplexity", "consistency", "wikitext_harness")


def _rule_prefill(cfg: dict) -> None:
    """A one-shot prefill only exists where a cache takes a prompt: perplexity, the consistency check and
    training score every token under the policy, which one-shot would leave unevicted."""
    if (cfg.get("policy") or {}).get("prefill") != "one_shot":
        return
    task = (cfg.get("task") or {}).get("name")
    if cfg.get("training") and cfg["training"].get("mode") != "interpolate":
        raise ConfigError("policy.prefill=one_shot is a way to serve a prompt; training scores every token under "
                          "the policy: train with policy.prefill=stepwise (its state serves one-shot as well)")
    if task in SCORES_EVERY_TOKEN:
        raise ConfigError(f"task={task} scores every token under the policy, and policy.prefill=one_shot would let "
                          "them all attend fully; use policy.prefill=stepwise (one_shot is for generating tasks)")


def _rule_distinct(cfg: dict) -> None:
    """A grid's lengths and depths are each listed once."""
    task = cfg.get("task") or {}
    for key in ("context_lengths", "depths"):
        values = task.get(key) or []
        if len(set(values)) != len(values):
            raise ConfigError(f"task.{key}={values} lists a value twice; list each once")


def _rule_sampling(cfg: dict) -> None:
    """Sampling needs a temperature above 0."""
    task = cfg.get("task") or {}
    if task.get("do_sample") and not task.get("temperature", 1.0) > 0:
        raise ConfigError(f"task.temperature={task['temperature']} must be > 0 when task.do_sample=true")


def _rule_layers(cfg: dict) -> None:
    """A layer range is not empty."""
    t = cfg.get("training") or {}
    if t.get("to_layer") is not None and "from_layer" in t and t["from_layer"] >= t["to_layer"]:
        raise ConfigError(f"training.from_layer={t['from_layer']} must be smaller than training.to_layer={t['to_layer']}")


def _rule_answers(cfg: dict) -> None:
    """Answer windows fit their documents and the training length."""
    answers = (cfg.get("data") or {}).get("answers")
    if not answers:
        return
    if any("{text}" not in t for t in answers.get("templates", [])):
        raise ConfigError("data.answers.templates must each have a {text} field for the document")
    if answers["min_doc_tokens"] > answers["max_doc_tokens"]:
        raise ConfigError(f"data.answers.min_doc_tokens={answers['min_doc_tokens']} exceeds max_doc_tokens={answers['max_doc_tokens']}")
    seq_len = (cfg.get("training") or {}).get("seq_len")
    if seq_len and answers["min_doc_tokens"] + answers["max_new_tokens"] >= seq_len:
        raise ConfigError(f"data.answers.min_doc_tokens + max_new_tokens = {answers['min_doc_tokens'] + answers['max_new_tokens']} "
                          f"leave no room in training.seq_len={seq_len}; lower them or raise seq_len")


def _rule_state(cfg: dict) -> None:
    """What shapes a LESS state needs one; a cosFormer horizon covers the sequence."""
    has_state = cfg["feature_map"].get("name", "none") != "none"
    if cfg["policy"].get("baseline_plus") and not has_state:
        raise ConfigError("policy.baseline_plus=true needs a feature_map to size the state it stands in for")
    if not has_state and not cfg.get("checkpoint"):
        for group, default in (("reweighting", "none"), ("normalizer", "joint"), ("gating", "none")):
            if cfg[group].get("name", default) != default:
                raise ConfigError(f"{group}={cfg[group]['name']} shapes a LESS state, but feature_map=none has none; "
                                  f"pick a feature_map or drop {group}=")
    rw = cfg["reweighting"]
    if rw.get("name") == "cosformer":
        for setting in ("task", "training"):
            longest = (cfg.get(setting) or {}).get("seq_len")
            if longest and longest > rw["horizon"]:
                raise ConfigError(f"reweighting.horizon={rw['horizon']} is shorter than {setting}.seq_len={longest}: every "
                                  "position past the horizon gets the same proportion; raise reweighting.horizon")


def _rule_training(cfg: dict) -> None:
    """A training (but interpolation, which mixes two checkpoints) has a state to train, no Baseline+,
    and the data its losses need: answer windows only for the output modes, and the answer-only
    losses only on them."""
    t = cfg.get("training")
    if not t or t.get("mode") == "interpolate":
        return
    if cfg["feature_map"].get("name", "none") == "none":
        raise ConfigError("training needs a state to train: set feature_map (e.g. feature_map=less_mlp)")
    if cfg["policy"].get("baseline_plus"):
        raise ConfigError("policy.baseline_plus=true is an evaluation baseline; train with baseline_plus=false")
    answers = bool((cfg.get("data") or {}).get("answers"))
    if answers and t.get("mode") == "layerwise":
        raise ConfigError(f"data={cfg['data']['name']} (answer windows) trains on the model's output: use training=e2e or "
                          "training=progressive, or a text preset (data=c4) for layer-wise training")
    for key, active, off in (("unlikelihood", lambda v: v > 0, "set it to 0"),
                             ("no_repeat_ngram", lambda v: v is not None, "set it to null"),
                             ("end_target", lambda v: v is not None, "set it to null"),
                             ("end_weight", lambda v: v != 1, "set it to 1")):
        if key in t and active(t[key]) and not answers:
            raise ConfigError(f"training.{key}={t[key]} works on the answers of answer windows; use data=c4_answers "
                              f"(with data.answers.student_share > 0 for the student's own loops) or {off}")


RULES: tuple[Callable[[dict], None], ...] = (_rule_lengths, _rule_prefill, _rule_distinct, _rule_sampling, _rule_layers, _rule_answers,
                                             _rule_state, _rule_training)
