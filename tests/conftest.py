"""Shared test set-up: no network, W&B offline in temporary folders, Hydra compose helper."""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
    }
)
torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation, worst on a busy machine

from less_exp import paths  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_dirs(tmp_path_factory):
    """W&B's and Hydra's folders go to a temporary folder, never the user's home or outputs/."""
    root = tmp_path_factory.mktemp("env")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(root / var.lower()))
        mp.setenv("LESS_OUTPUT_DIR", str(root / "outputs"))
        yield


@pytest.fixture
def compose_config(tmp_path):
    """``compose_config("eval", ["model=tiny_llama"])``: a config as the job would see it.

    ``paths.output_dir`` (Hydra's run folder in a real job) is the test's ``tmp_path`` for the first
    config and ``tmp_path/run<k>`` for the k-th after it, as separate runs get separate folders.
    """
    count = []

    def _compose(config_name: str = "eval", overrides: list[str] | tuple = ()):
        out = tmp_path if not count else tmp_path / f"run{len(count) + 1}"
        count.append(1)
        with initialize_config_dir(config_dir=paths.conf_dir(), version_base="1.3", job_name=config_name):
            return compose(config_name, overrides=[f"paths.output_dir={out}", *overrides])

    return _compose


@pytest.fixture
def one_thread():
    """Tiny tensors run several times faster on one thread when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_train(compose_config, tmp_path):
    """``run_train(*overrides, checkpoint=None)``: the tiny layer-wise training (tests/tiny_training.py)."""
    from tiny_training import TINY

    from less_exp import train as train_job

    def _run(*overrides, checkpoint=None):
        ckpt = checkpoint or tmp_path / "ckpt"
        return train_job.train(compose_config("train", [*TINY, f"checkpoint={ckpt}", *overrides]))

    return _run
