"""The value a hyper-parameter search optimises: ``optimized_metric`` of a job's metrics.

Hydra's sweepers (``conf/hparams_search/``, the Optuna sweeper) read what the job's entry point
returns; a config without ``optimized_metric`` returns nothing, as before.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

from omegaconf import DictConfig

from less_exp.validation import number


def objective(cfg: DictConfig, metrics: Mapping | None) -> float | None:
    """``metrics[optimized_metric]`` (or that of the evaluation a train job nests) as a float; NaN, with
    one line on stderr, when the job failed or has no such metric, so the sweeper counts a failed trial."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    metrics = metrics if isinstance(metrics, Mapping) else {}
    nested = metrics.get("evaluation") if isinstance(metrics.get("evaluation"), Mapping) else {}
    value = metrics.get(name, nested.get(name))
    if number(value):
        return float(value)
    if metrics:
        known = sorted(k for k, v in {**metrics, **nested}.items() if number(v))
        print(f"optimized_metric={name} is not a metric of this job (it has {', '.join(known)}); "
              "set optimized_metric to one of them", file=sys.stderr)
    return math.nan
