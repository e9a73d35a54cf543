"""Per-task evaluation scores: which metric a task's rows carry, and the 95% CI of a mean over tasks.

Only numpy: every layer of the pipeline (the trainer, the jobs) and the benchmarks can import it.
"""

from __future__ import annotations

import math

import numpy as np


def task_metric(rows: list[dict]) -> str:
    """``"query_acc"`` for a classification task's per-task rows, ``"final_loss"`` for a learned optimizer's (the
    optimizee's loss after the unroll), ``"query_loss"`` (MSE) for a regression's."""
    for key in ("query_acc", "final_loss"):
        if key in rows[0]:
            return key
    return "query_loss"


def higher_is_better(key: str) -> bool:
    """Whether a larger mean of ``key`` (a :func:`task_metric`) is the better model."""
    return key == "query_acc"


def metric_label(key: str) -> str:
    """The name eval.json and the val/ and test/ metrics give a :func:`task_metric`."""
    return {"query_acc": "accuracy", "final_loss": "final_loss"}.get(key, "mse")


def ci95(values) -> float:
    """Half-width of the 95% normal CI of the mean: 1.96 * sample std / sqrt(n); NaN below two values."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    return float(1.96 * values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
