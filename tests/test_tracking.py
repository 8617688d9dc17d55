"""Trackers: logger=none accepts everything; logger=wandb keeps its files in the output folder."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from less_exp import tracking  # noqa: E402
from less_exp.errors import ConfigError  # noqa: E402
from wandb_records import read_run  # noqa: E402


def test_none_tracker_accepts_everything(compose_config, tmp_path):
    cfg = compose_config("eval", ["logger=none"])
    with tracking.make_tracker(cfg.logger, {}, tmp_path, "eval") as tracker:
        tracker.log({"a": 1}, step=0)
        tracker.log_table("t", ["x"], [[1]])
        tracker.log_image("i", None)
        tracker.summary({"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_unknown_logger_is_rejected(compose_config, tmp_path):
    cfg = compose_config("eval", ["logger=none", "logger.name=tensorboard"])
    with pytest.raises(ConfigError, match="logger"):
        tracking.make_tracker(cfg.logger, {}, tmp_path, "eval")


def test_wandb_tracker_logs_tables_images_and_summary(compose_config, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_CACHE_DIR")
    cfg = compose_config("eval", ["logger=wandb", "logger.group=g", "logger.run_name=r"])
    figure, axes = plt.subplots()
    axes.plot([1, 2, 3])
    with tracking.make_tracker(cfg.logger, {"k": {"v": 1}}, tmp_path, "eval") as tracker:
        assert tracker.run_dir.parent == tmp_path / "wandb"
        tracker.log({"loss": 0.5}, step=1)
        tracker.log_table("rows", ["x", "y"], [[1, 2], [3, 4]])
        tracker.log_image("curve", figure, caption="c")
        tracker.summary({"score": 7})
    plt.close(figure)
    run = read_run(tracker.run_dir)
    assert run["config"]["k"] == {"v": 1}
    assert run["summary"]["score"] == 7 and run["summary"]["rows/_type"] == "table-file"
    assert run["summary"]["curve/_type"] == "image-file"
    assert list(tracker.run_dir.glob("files/media/images/curve*.png"))
    assert (tmp_path / "wandb" / "cache").is_dir()
