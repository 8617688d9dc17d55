"""Data sets named by ``conf/data`` presets: the local copy when present, else the hub.

Local files live under ``paths.data_root`` (``$LESS_DATA_ROOT``, default ``../shared/data``) so
jobs and tests run with no network. Text sets (WikiText-2, C4) load as one string; prompt sets
(XSum, CNN/DailyMail) as records with ``input`` and ``target`` beside their original fields.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from omegaconf import DictConfig

from less_exp.errors import ConfigError, UnavailableError
from less_exp.hub import hub_reachable
from less_exp.validation import number

SPLITS = ("train", "validation", "test")


def local_file(data_cfg: DictConfig, split: str) -> Path | None:
    """The configured local file for ``split`` (absolute, or relative to ``local.dir``), if any."""
    _check_split(split)
    local = data_cfg.get("local") or {}
    name = (local.get("files") or {}).get(split)
    if not name:
        return None
    path = Path(str(name)).expanduser()
    return path if path.is_absolute() else Path(str(local.get("dir", "."))).expanduser() / path


def is_mixture(data_cfg: DictConfig) -> bool:
    """A training mixture (``mixture``: presets by name, ``weights``: their shares), such as ``data=c4_wikitext2``."""
    return bool(data_cfg.get("mixture"))


def is_answers(data_cfg: DictConfig) -> bool:
    """Answer windows (``answers``: instruction prompts on a ``source`` preset's documents followed by the
    full-cache model's own answers, :mod:`less_exp.training.answers`), such as ``data=c4_answers``."""
    return bool(data_cfg.get("answers"))


def _refuse_mixture(data_cfg: DictConfig) -> None:
    if is_answers(data_cfg):
        raise ConfigError(f"data={data_cfg.name} is training data (answer windows on data={data_cfg.source.name}); train with "
                          f"it (training=e2e or progressive) and evaluate on a text preset (less-eval data={data_cfg.source.name} ...)")
    raise ConfigError(f"data={data_cfg.name} is a training mixture of {', '.join(data_cfg.mixture)}; evaluate on one of "
                      f"them (less-eval data={next(iter(data_cfg.mixture))} checkpoint=...)")


def mixture_weights(data_cfg: DictConfig) -> dict[str, float]:
    """The mixture's weights, normalised; a missing, extra or non-positive weight is a ConfigError."""
    parts, weights = list(data_cfg.mixture), dict(data_cfg.get("weights") or {})
    if set(weights) != set(parts):
        raise ConfigError(f"data={data_cfg.name}: data.weights names {sorted(weights)} but the mixture holds {sorted(parts)}; "
                          "give one weight per part")
    for name, weight in weights.items():
        if not number(weight) or not weight > 0:
            raise ConfigError(f"data.weights.{name}={weight!r} must be a number > 0")
    total = sum(float(w) for w in weights.values())
    return {name: float(weights[name]) / total for name in parts}


def check_available(data_cfg: DictConfig, split: str, mixture: bool = False) -> None:
    """Fail fast, saying what to set, when ``split`` is neither on disk nor reachable on the hub (or is
    a training mixture where one data set is needed: ``mixture=True`` for training)."""
    if is_answers(data_cfg):
        if not mixture:
            _refuse_mixture(data_cfg)
        return check_available(data_cfg.source, split)
    if is_mixture(data_cfg):
        if not mixture:
            _refuse_mixture(data_cfg)
        mixture_weights(data_cfg)
        for part in data_cfg.mixture.values():
            check_available(part, split)
        return
    path = local_file(data_cfg, split)
    if path is not None and path.is_file():
        return
    if path is not None and path.exists():
        raise ConfigError(f"data={data_cfg.name} split={split}: {path} is a folder, not a file; "
                          f"set data.local.files.{split} to a file in it")
    if data_cfg.get("hub") and hub_reachable():
        return
    where = f"no local file {path.resolve()}" if path is not None else "no local file configured"
    raise UnavailableError(
        f"data={data_cfg.name} split={split}: {where} and the Hugging Face hub is not reachable. "
        f"Set LESS_DATA_ROOT (config paths.data_root) to the folder that holds the offline data "
        f"(../shared/data beside the checkout by default), or data.local.files.{split} to a file."
    )


def load_text(data_cfg: DictConfig, split: str) -> str:
    """The whole split as one string (a text file as is, or a text field's rows joined)."""
    if is_mixture(data_cfg) or is_answers(data_cfg):
        _refuse_mixture(data_cfg)
    field = data_cfg.get("text_field", "text")
    join = data_cfg.get("join", "\n\n")
    check_available(data_cfg, split)
    path = local_file(data_cfg, split)
    if path is not None and path.is_file():
        if path.suffix == ".jsonl":
            pattern = data_cfg.get("text_regex")
            texts = (_field(row, field, path, n) for n, row in _rows_of_split(data_cfg, split, _jsonl(path)))
            return join.join(_extract(text, pattern, path) for text in texts) if pattern else join.join(texts)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"data file {path} is not UTF-8 text ({err.reason} at byte {err.start}); point "
                              f"data.local.files.{split} at a text file") from None
        if not text.strip():
            raise ConfigError(f"data file {path} is empty; point data.local.files.{split} at a file with text")
        return text
    hub_field = data_cfg.hub.get("text_field") or field
    return join.join(row[hub_field] for row in _hub_rows(data_cfg, split))


def load_documents(data_cfg: DictConfig, split: str) -> list[str]:
    """The split's documents, one string each: a jsonl file's rows (its text field), a text file's
    non-blank lines, or the hub split's rows."""
    check_available(data_cfg, split)
    field = data_cfg.get("text_field", "text")
    path = local_file(data_cfg, split)
    if path is not None and path.is_file():
        if path.suffix == ".jsonl":
            docs = [_field(row, field, path, n) for n, row in _rows_of_split(data_cfg, split, _jsonl(path))]
        else:
            docs = [line for line in load_text(data_cfg, split).splitlines() if line.strip()]
    else:
        hub_field = data_cfg.hub.get("text_field") or field
        docs = [row[hub_field] for row in _hub_rows(data_cfg, split)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ConfigError(f"data={data_cfg.name} split={split} holds no documents")
    return docs


def load_records(data_cfg: DictConfig, split: str) -> list[dict]:
    """The split's records, each with ``input`` (the prompt) and ``target`` added."""
    check_available(data_cfg, split)
    path = local_file(data_cfg, split)
    on_disk = path is not None and path.is_file()
    source = data_cfg.local if on_disk else data_cfg.hub
    fields, prompt = source.get("fields"), source.get("prompt")
    if not fields:
        raise ConfigError(f"data={data_cfg.name} has no input/target fields; it is a text set, use load_text")
    records = []
    rows = _rows_of_split(data_cfg, split, _jsonl(path)) if on_disk else enumerate(_hub_rows(data_cfg, split), 1)
    for n, row in rows:
        record = dict(row)
        text = _field(row, fields.input, path, n)
        record["input"] = prompt.format(input=text) if prompt else text
        record["target"] = _field(row, fields.target, path, n)
        records.append(record)
    if not records:
        raise ConfigError(f"data={data_cfg.name} split={split}: {path or 'the hub split'} holds no records")
    return records


def _rows_of_split(data_cfg: DictConfig, split: str, rows: list) -> list:
    """The split's documents when one local file holds several splits (``local.rows.<split>: [start, stop)``)."""
    bounds = ((data_cfg.get("local") or {}).get("rows") or {}).get(split)
    if bounds is None:
        return rows
    start, stop = (int(x) for x in bounds)
    if not 0 <= start < stop <= len(rows):
        raise ConfigError(f"data.local.rows.{split}=[{start}, {stop}) does not fit the {len(rows)} documents of the file")
    return rows[start:stop]


def _extract(text: str, pattern: str, path: Path) -> str:
    """``text_regex``'s first group in ``text`` (the article inside a prompt), or the text when it does not match."""
    match = re.search(pattern, text, re.S)
    return match.group(1) if match else text


def _field(row, name: str, path: Path | None, line: int) -> str:
    """``row[name]`` as a string, or a ConfigError naming the file, line and field."""
    where = f"{path} line {line}" if path is not None else f"hub row {line}"
    if not isinstance(row, dict) or name not in row:
        raise ConfigError(f"{where} has no field {name!r}; every line needs it (data.local.fields names the fields)")
    if not isinstance(row[name], str):
        raise ConfigError(f"{where}: field {name!r} is {type(row[name]).__name__}, not text")
    return row[name]


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Disjoint ``seq_len``-token windows ``[n, seq_len]`` of ``text`` tokenized as one string.

    No special tokens are added; the tail shorter than ``seq_len`` is dropped; ``max_windows``
    (``None`` for all) keeps the first ones.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return _windows(ids, seq_len, max_windows)


def training_windows(data_cfg: DictConfig, tokenizer, split: str, seq_len: int, count: int) -> tuple[torch.Tensor, list[str]]:
    """Up to ``count`` training windows and the preset each came from.

    A mixture gives each part its share of ``count`` (largest remainders, at least one window a part)
    and interleaves the parts, so that any prefix of the windows holds every domain in proportion.
    """
    if not is_mixture(data_cfg):
        windows = token_windows(tokenizer, load_text(data_cfg, split), seq_len, count)
        return windows, [str(data_cfg.name)] * len(windows)
    weights = mixture_weights(data_cfg)
    quotas = {name: max(1, int(count * w)) for name, w in weights.items()}
    by_remainder = sorted(weights, key=lambda name: count * weights[name] - int(count * weights[name]), reverse=True)
    for name in by_remainder[: max(0, count - sum(quotas.values()))]:
        quotas[name] += 1
    parts = {}
    for name, part in data_cfg.mixture.items():
        parts[name] = token_windows(tokenizer, load_text(part, split), seq_len, quotas[name])
        if len(parts[name]) < quotas[name]:
            print(f"less-train: data={data_cfg.name}: {name} split={split} holds {len(parts[name])} of its {quotas[name]} windows")
    rows, names = [], []
    for i in range(max(len(w) for w in parts.values())):
        for name, windows in parts.items():
            if i < len(windows):
                rows.append(windows[i])
                names.append(name)
    return torch.stack(rows), names


def scored_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> tuple[torch.Tensor, str]:
    """:func:`token_windows` and the prefix of ``text`` they cover (the characters of their tokens),
    from one tokenization. The harness and the perplexity task's word and byte counts read that
    prefix, so both score the same text."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    windows = _windows(encoding["input_ids"], seq_len, max_windows)
    return windows, text[: encoding["offset_mapping"][windows.numel() - 1][1]]


def _windows(ids: list[int], seq_len: int, max_windows: int | None) -> torch.Tensor:
    if seq_len < 2:
        raise ConfigError(f"seq_len={seq_len} must be at least 2")
    count = len(ids) // seq_len
    if max_windows is not None:
        count = min(count, int(max_windows))
    if count < 1:
        raise ConfigError(f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def count_words(text: str) -> int:
    """Words as lm-eval counts them for word perplexity (whitespace-separated pieces)."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    """UTF-8 bytes, lm-eval's denominator for byte perplexity and bits per byte."""
    return len(text.encode("utf-8"))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not one of {SPLITS}")


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line; a line that is not JSON is named in the error."""
    rows = []
    try:
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ConfigError(f"{path} line {n} is a JSON {type(row).__name__}, not an object of fields; "
                                          "each line must be one record {\"field\": ...}")
                    rows.append((n, row))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} line {n} is not JSON ({err.msg}); fix or remove that line") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text ({err.reason}); point the data config at a jsonl file") from None
    return rows


def _hub_rows(data_cfg: DictConfig, split: str) -> Iterable[dict]:
    import datasets

    hub = data_cfg.hub
    hub_split = (hub.get("splits") or {}).get(split, split)
    rows = datasets.load_dataset(hub.path, hub.get("name"), split=hub_split, streaming=bool(hub.get("streaming")))
    max_rows = hub.get("max_rows")
    return itertools.islice(rows, max_rows) if max_rows else rows
