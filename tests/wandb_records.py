"""Read an offline W&B run (``run-*.wandb``) back, so tests can check what a job logged.

The file is a LevelDB-style log of protobuf ``Record`` messages: a 7-byte header, then 32 KiB
blocks of chunks, each ``crc32 (4) | length (2, little-endian) | type (1) | data``; a record is one
FULL chunk or FIRST, MIDDLE..., LAST. W&B 0.31 has no Python reader of its own.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

HEADER = 7
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    """Every record in the ``.wandb`` file at ``path``."""
    raw = Path(path).read_bytes()
    if raw[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    out, pending, pos = [], b"", HEADER
    while pos + 7 <= len(raw):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, FIRST):
            pending = data
        elif kind in (MIDDLE, LAST):
            pending += data
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def read_run(run_dir: Path) -> dict:
    """``{"config", "summary", "history", "group", "job_type", "tags"}`` of the offline run in ``run_dir``.

    Config values are decoded dicts; summary and history keys of nested values are flattened
    with ``/`` (``"rows/_type"``), as W&B stores them.
    """
    (path,) = Path(run_dir).glob("run-*.wandb")
    config, summary, history, run = {}, {}, [], {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"group": record.run.run_group, "job_type": record.run.job_type, "tags": list(record.run.tags)}
            config.update(_items(record.run.config.update))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "history":
            history.append(_items(record.history.item))
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
    return {"config": config, "summary": summary, "history": history, **run}


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
