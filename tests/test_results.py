"""results.json: its fields, and the atomic write."""

from __future__ import annotations

import json

import less_exp
from less_exp.results import write_results


def test_results_json_fields(tmp_path):
    path = write_results(tmp_path, "eval", {"perplexity": 21.5}, {"model": {"name": "tiny_llama"}}, 1.23456)
    assert path == tmp_path / "results.json"
    record = json.loads(path.read_text())
    assert set(record) == {"job", "status", "metrics", "config", "versions", "duration_s"}
    assert record["status"] == "ok"
    assert record["job"] == "eval" and record["metrics"] == {"perplexity": 21.5}
    assert record["config"] == {"model": {"name": "tiny_llama"}} and record["duration_s"] == 1.235
    assert {"python", "torch", "transformers", "less_exp", "git_commit"} <= set(record["versions"])
    assert record["versions"]["less_exp"] == less_exp.__version__


def test_results_json_replaced_atomically(tmp_path):
    write_results(tmp_path, "eval", {"a": 1}, {}, 0.0)
    write_results(tmp_path, "eval", {"a": 2}, {}, 0.0)
    assert json.loads((tmp_path / "results.json").read_text())["metrics"] == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
