"""`metatrain study` on Ray Tune: a grid of cells as trials that never oversubscribe the CPUs, nested MLflow runs,
one Parquet dataset partitioned by cell, a summary with plots, resumption (Tuner.restore), ASHA stopping a bad trial,
the trials' reservations, and bad study files. Killing and resuming a study: tests/test_study_signals.py."""

from __future__ import annotations

import re

import pyarrow.dataset as ds
import pytest
import yaml
from mlflow.tracking import MlflowClient

from metatrain.pipeline.jobs.study import StudyError, load_study, run_study

TINY = ["model.hidden=8", "train.meta_batch=2", "train.eval_tasks=10", "workers.count=1",
        "tracking.system_metrics=false", "data.queries=2"]

FOMAML = "configs/omniglot_fomaml_5w1s.yaml"


def write(tmp_path, body: dict) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


@pytest.mark.data
def actors_alive() -> list[str]:
    import ray

    return [a["ActorClassName"] for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"] in ("ParameterServer", "TaskWorker")]


def overlap(runs) -> int:
    """The most runs that were RUNNING at one time."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    most = now = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


@pytest.mark.data
def test_study_runs_cells_as_tune_trials_nests_them_and_resumes(ray_module, omniglot_store, tmp_path, monkeypatch,
                                                                capsys):
    import ray

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = write(tmp_path, {
        "name": "tiny", "config_template": "configs/omniglot_{algorithm}_5w1s.yaml",
        "set": [f"data.path={omniglot_store}", "train.steps=2", "train.val_every=0", *TINY],
        "grid": {"algorithm": ["fomaml", "protonet"], "shots": [1, 2]}, "max_concurrent_trials": 4})
    out = tmp_path / "out"
    rows = run_study(study, out=str(out))
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
    # Tune may start 4 trials at once, but each reserves its worker's CPU: never more than the 2 CPUs hold.
    assert overlap(children) <= 2
    assert actors_alive() == [] and ray.available_resources().get("CPU") == 2
    assert {c.data.tags["metatrain.axis.algorithm"] for c in children} == {"fomaml", "protonet"}
    assert {"summary.md", "accuracy_vs_shots.png"} <= {a.path for a in client.list_artifacts(parent[0].info.run_id)}

    capsys.readouterr()
    again = run_study(study, out=str(out))
    assert "4 of 4 trials already done" in capsys.readouterr().out  # restored from OUT/tune, nothing trained
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


@pytest.mark.data
def test_asha_stops_the_worse_trial_on_its_first_validation(ray_module, omniglot_store, tmp_path, monkeypatch):
    """Two trials in order: inner_lr 0.4 (adapts to each support set) then 1e-6 (does not: chance accuracy). ASHA
    (grace period 1, halving) stops the second at its first validation, below the first one's; its run ends KILLED.
    A drawn field (a negligible weight decay, from Tune's sampler) gives each trial a folder of its own."""
    import ray

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = write(tmp_path, {
        "name": "asha", "config": FOMAML, "max_concurrent_trials": 1,
        "set": [f"data.path={omniglot_store}", "train.steps=3", "train.val_every=1", "train.val_tasks=20",
                "algorithm.eval_inner_steps=5", *TINY],
        "search": {"algorithm.inner_lr": {"grid": [0.4, 1e-6]}, "optim.weight_decay": {"uniform": [0.0, 1e-9]}},
        "scheduler": {"name": "asha", "metric": "val/acc", "mode": "max", "grace_period": 1,
                      "reduction_factor": 2}})
    out = tmp_path / "out"
    rows = run_study(study, out=str(out))
    assert len(rows) == 1 and rows[0]["algorithm.inner_lr"] == 0.4 and 0 <= rows[0]["optim.weight_decay"] <= 1e-9
    folders = sorted(p.name for p in (out / "cells").iterdir())
    assert len(folders) == 2 and all(re.search(r"-[0-9a-f]{5}_0000[01]$", f) for f in folders)  # id-<trial id>
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = {r.data.params["algorithm.inner_lr"]: r for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`metatrain.study` = 'asha'")
        if "mlflow.parentRunId" in r.data.tags}
    assert runs["0.4"].info.status == "FINISHED" and len(client.get_metric_history(runs["0.4"].info.run_id,
                                                                                    "val/acc")) == 3
    stopped = runs["1e-06"]
    assert stopped.info.status == "KILLED" and "stopped early by the asha scheduler at step 1" in \
        stopped.data.tags["metatrain.ended_by"]
    first = client.get_metric_history(runs["0.4"].info.run_id, "val/acc")[0].value
    assert client.get_metric_history(stopped.info.run_id, "val/acc")[0].value < first
    assert not (out / "cells" / stopped.data.tags["metatrain.cell"] / "eval.json").exists()
    assert actors_alive() == [] and ray.available_resources().get("CPU") == 2


def test_a_trial_reserves_its_driver_and_workers_in_one_placement_group(tmp_path):
    from metatrain.pipeline.jobs.study_trial import param_space, trial_resources

    study = load_study(write(tmp_path, {"config": FOMAML, "grid": {"shots": [1, 5]},
                                        "set": ["workers.count=2", "workers.cpus=1.5", "workers.placement=SPREAD"],
                                        "search": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, "num_samples": 3}))
    pgf = trial_resources(study, {"shots": 5, "search": {"optim.lr": 1e-3}})
    # An empty head bundle: the trial's driver and its parameter server take no CPU, the workers one bundle each.
    assert pgf.head_bundle_is_empty and pgf.bundles == [{"CPU": 1.5}, {"CPU": 1.5}] and pgf.strategy == "SPREAD"
    assert pgf.required_resources == {"CPU": 3.0}
    space = param_space(study)
    assert space["shots"] == {"grid_search": [1, 5]} and set(space["search"]) == {"optim.lr"}
    assert study.trial_count == 6 and study.sampled
    cell = study.cell_of({"shots": 5}, {"optim.lr": 1e-3})
    assert cell.overrides[-2:] == ("data.shots=5", "optim.lr=0.001") and cell.id != study.cells[1].id


@pytest.mark.parametrize("body, message", [
    ({"config": FOMAML, "search": {"optim.lrr": {"uniform": [0.1, 1]}}}, "search optim.lrr = 0.1: unknown config key"),
    ({"config": FOMAML, "search": {"optim.lr": {"lognormal": [0.1, 1]}}}, "unknown distribution 'lognormal'"),
    ({"config": FOMAML, "search": {"optim.lr": {"loguniform": [0, 1]}}}, "loguniform needs low > 0"),
    ({"config": FOMAML, "search": {"optim.lr": {"uniform": [1, 0.1]}}}, "takes [low, high] with low < high"),
    ({"config": FOMAML, "search": {"data.shots": {"choice": [1, 1]}}}, "lists a value twice"),
    ({"config": FOMAML, "search": {"data.shots": {"randint": [0, 3]}}}, "search data.shots = 0: data.shots"),
    ({"config": FOMAML, "grid": {"shots": [1]}, "search": {"data.shots": {"grid": [2]}}}, "also set by"),
    ({"config": FOMAML, "grid": {"shots": [1]}, "num_samples": 2}, "num_samples 2 would train every cell"),
    ({"config": FOMAML, "grid": {"shots": [1]}, "max_concurrent_trials": 0}, "max_concurrent_trials must be"),
    ({"config": FOMAML, "grid": {"shots": [1]}, "parallel": 1, "max_concurrent_trials": 1}, "not both"),
    ({"config": FOMAML, "grid": {"shots": [1]}, "scheduler": {"name": "hyperband"}}, "name: asha"),
    ({"config": FOMAML, "grid": {"shots": [1]}, "scheduler": {"name": "asha", "metric": "acc", "mode": "max"}},
     "scheduler.metric must be a validation metric"),
    ({"config": FOMAML, "grid": {"shots": [1]}, "set": ["train.val_every=0"],
      "scheduler": {"name": "asha", "metric": "val/acc", "mode": "max"}}, "set train.val_every > 0"),
    ({"config": FOMAML, "grid": {"shots": [1]}, "scheduler": {"name": "asha", "metric": "val/acc", "mode": "up"}},
     "scheduler.mode must be max or min"),
    ({"config": FOMAML}, "or a 'search' over config fields"),
])
def test_bad_search_spaces_and_schedulers_are_named(tmp_path, body, message):
    with pytest.raises(StudyError, match=re.escape(message)):
        load_study(write(tmp_path, body))
