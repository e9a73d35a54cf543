"""`metatrain study`: a grid of cells run as parallel Ray tasks, nested MLflow runs, one Parquet dataset partitioned
by cell, a summary with plots, resumption, and bad study files."""

from __future__ import annotations

import re

import pyarrow.dataset as ds
import pytest
import yaml
from mlflow.tracking import MlflowClient

from metatrain.pipeline.jobs.study import StudyError, load_study, run_study

FOMAML = "configs/omniglot_fomaml_5w1s.yaml"


def write(tmp_path, body: dict) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


@pytest.mark.data
def test_study_runs_cells_in_parallel_nests_them_and_resumes(ray_module, omniglot_store, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = write(tmp_path, {
        "name": "tiny", "config_template": "configs/omniglot_{algorithm}_5w1s.yaml",
        "set": [f"data.path={omniglot_store}", "model.hidden=8", "train.steps=2", "train.meta_batch=2",
                "train.val_every=0", "train.eval_tasks=10", "workers.count=1", "tracking.system_metrics=false",
                "data.queries=2"],
        "grid": {"algorithm": ["fomaml", "protonet"], "shots": [1, 2]}})
    out = tmp_path / "out"
    rows = run_study(study, out=str(out), parallel=2)
    assert len(rows) == 4 and all(0 <= r["accuracy"] <= 1 and r["tasks"] == 10 for r in rows)
    table = ds.dataset(out / "results", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 40 and {"cell", "algorithm", "shots", "query_acc", "slot"} <= set(table.column_names)
    assert sorted(set(table.column("cell").to_pylist())) == sorted(r["cell"] for r in rows)
    import pandas as pd

    assert len(pd.read_parquet(out / "results")) == 40  # and pandas reads the results folder as it is
    assert (out / "summary.md").read_text().count("\n") == 6  # header, rule, 4 cells
    assert (out / "accuracy_vs_shots.png").stat().st_size > 1000

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`metatrain.study` = 'tiny' and attributes.run_name = 'tiny'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["metatrain.axis.algorithm"] for c in children} == {"fomaml", "protonet"}
    assert {"summary.md", "accuracy_vs_shots.png"} <= {a.path for a in client.list_artifacts(parent[0].info.run_id)}

    capsys.readouterr()
    again = run_study(study, out=str(out), parallel=2)
    assert "4 of 4 trials already done" in capsys.readouterr().out
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")) == 4


@pytest.mark.parametrize("body, message", [
    ({"config": FOMAML, "grid": {"wayz": [5]}}, "unknown axis 'wayz' (did you mean 'ways'?)"),
    ({"config": FOMAML, "grid": {}}, "grid must map each axis to a non-empty list"),
    ({"config": FOMAML, "grid": {"shots": []}}, "non-empty list"),
    ({"config": FOMAML, "cells": [{"shots": 1}], "grid": {"shots": [1]}},
     "exactly one of 'grid'"),
    ({"config": FOMAML, "grid": {"shots": [1]}, "colour": 1}, "unknown key 'colour'"),
    ({"grid": {"algorithm": ["nope"]}}, "config configs/omniglot_nope_5w1s.yaml"),
    ({"config": FOMAML, "grid": {"shots": [0]}}, "data.shots"),
    ({"config": FOMAML, "cells": [{"shots": 1}, {"ways": 5}, {"shots": 1}]},
     "cells 1 and 3 are the same cell {'shots': 1}"),
    ({"config": FOMAML, "grid": {"shots": [1, 1]}}, "cells 1 and 2 are the same cell {'shots': 1}"),
])
def test_bad_study_files_are_named(tmp_path, body, message):
    with pytest.raises(StudyError, match=re.escape(message)):
        load_study(write(tmp_path, body))
