"""Per-task evaluation scores: which metric a task's rows carry, and the 95% CI of a mean over tasks.

Only numpy: every layer of the pipeline (the trainer, the jobs) and the benchmarks can import it.
"""

from __future__ import annotations

import math

import numpy as np


def task_metric(rows: list[dict]) -> str:
    """``"query_acc"`` for a classification task's per-task rows, ``"query_loss"`` (MSE) for a regression's."""
    return "query_acc" if "query_acc" in rows[0] else "query_loss"


def ci95(values) -> float:
    """Half-width of the 95% normal CI of the mean: 1.96 * sample std / sqrt(n); NaN below two values."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    return float(1.96 * values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
