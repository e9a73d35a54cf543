"""bench/train_budget.py's paired comparison of two runs tested on the same episodes (MANN against its LSTM).

    pytest tests/test_train_budget.py -q
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

spec = importlib.util.spec_from_file_location("train_budget", Path(__file__).resolve().parents[1] / "bench"
                                              / "train_budget.py")
train_budget = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_budget)


def write(path: Path, slots: list[int], acc: list[float]) -> Path:
    pq.write_table(pa.table({"step": [0] * len(slots), "slot": slots, "query_acc": acc}), path)
    return path


def test_the_paired_difference_is_the_mean_and_ci_of_per_episode_differences_matched_by_slot(tmp_path):
    a = write(tmp_path / "a.parquet", [0, 1, 2, 3], [0.9, 0.8, 1.0, 0.6])
    # The same episodes in another order: rows are matched on (step, slot), not on position.
    b = write(tmp_path / "b.parquet", [3, 1, 0, 2], [0.5, 0.8, 0.7, 0.7])
    mean, ci = train_budget.paired_differences(a, b, ["query_acc"])["query_acc"]
    d = np.array([0.9 - 0.7, 0.8 - 0.8, 1.0 - 0.7, 0.6 - 0.5])
    assert mean == pytest.approx(d.mean())
    assert ci == pytest.approx(1.96 * d.std(ddof=1) / math.sqrt(4))
    # Pairing removes the episodes' shared difficulty: narrower than either run's own CI here.
    assert ci < 1.96 * np.std([0.9, 0.8, 1.0, 0.6], ddof=1) / 2


@pytest.mark.parametrize("b_slots", [[0, 1, 2, 4], [0, 1, 2], [0, 1, 2, 2]])
def test_runs_scored_on_different_episodes_are_refused(tmp_path, b_slots):
    a = write(tmp_path / "a.parquet", [0, 1, 2, 3], [1.0] * 4)
    b = write(tmp_path / "b.parquet", b_slots, [1.0] * len(b_slots))
    with pytest.raises(ValueError, match="different episodes"):
        train_budget.paired_differences(a, b, ["query_acc"])


def test_a_missing_column_names_the_file_and_the_column(tmp_path):
    a = write(tmp_path / "a.parquet", [0, 1], [1.0, 0.0])
    b = write(tmp_path / "b.parquet", [0, 1], [1.0, 0.0])
    with pytest.raises(ValueError, match=r"a\.parquet: no column inst2_acc"):
        train_budget.paired_differences(a, b, ["inst2_acc"])
