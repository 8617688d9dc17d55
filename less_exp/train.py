"""``less-train``: fit the LESS state parameters of a frozen model (``conf/train.yaml``).

Training modes (``conf/training/``: layerwise, progressive, e2e) arrive with issue 4; until then
the job validates its config and stops with a clear message.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from less_exp import paths, runtime


def train(cfg: DictConfig) -> dict:
    """Validate the config; training itself is not implemented yet."""
    runtime.validate(cfg)
    raise NotImplementedError(
        "less-train: no training modes yet; they arrive with issue 4 (conf/training/). "
        "Use less-eval to evaluate a policy meanwhile."
    )


@hydra.main(config_path=paths.conf_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command line: ``less-train [overrides]``, ``-m`` to sweep."""
    train(cfg)


if __name__ == "__main__":
    main()
