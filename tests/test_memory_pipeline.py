"""The memory models through the whole pipeline: `metatrain train` with Ray workers, the parameter server and MLflow,
for MANN (sequence episodes, per-instance accuracies and plot) and the key-value memory module (N-way accuracy)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from metatrain.pipeline.jobs.train import evaluate, train
from tests.test_serving import assert_serves_like_predict

pytestmark = [pytest.mark.data, pytest.mark.usefixtures("ray_module", "no_env_tracking")]


SMALL = ["train.steps=4", "train.val_every=2", "train.val_tasks=8", "train.eval_tasks=12",
         "train.checkpoint_every=2", "workers.count=2", "tracking.system_metrics=false"]


def test_mann_trains_through_the_parameter_server_and_reports_by_instance(omniglot_store, omniglot_dir, tmp_path,
                                                                          monkeypatch):
    out = tmp_path / "mann"
    result = train("configs/omniglot_mann_5class.yaml",
                   [f"data.path={omniglot_store}", "model.controller=16", "model.memory_slots=16",
                    "model.memory_width=8", "train.meta_batch=4", *SMALL], out=str(out), quiet=True)
    summary = json.loads((out / "eval.json").read_text())
    assert summary["algorithm"] == "mann" and summary["tasks"] == 12 and summary["instances"] == 10
    assert sorted(summary["instance_accuracy"], key=int) == [str(k) for k in range(1, 11)]
    assert all(0 <= v <= 1 for v in summary["instance_accuracy"].values())
    rows = pq.read_table(out / "eval_tasks.parquet").to_pylist()
    assert len(rows) == 12 and {"inst1_acc", "inst10_acc", "query_acc"} <= set(rows[0])
    assert summary["instance_accuracy"]["2"] == pytest.approx(sum(r["inst2_acc"] for r in rows) / 12)
    assert (out / "instance_accuracy.png").stat().st_size > 1000

    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["algorithm.name"] == "mann"
    assert [m.step for m in client.get_metric_history(result.run_id, "train/inst2_acc")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(result.run_id, "val/inst2_acc")] == [2, 4]
    assert run.data.metrics["test/inst2_acc"] == pytest.approx(summary["instance_accuracy"]["2"])
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"instance_accuracy.png", "eval.json"} <= artifacts

    # The logged model is the few-shot pyfunc over the final checkpoint: a task's sequence labelled as `predict` does.
    from metatrain.pipeline.checkpoint import load_checkpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", result.tracking_uri)  # not mlflow.set_tracking_uri: process-global
    assert_serves_like_predict(run.data.tags["metatrain.model_uri"], load_checkpoint(out / "checkpoints" / "final.pt"),
                               omniglot_dir, tmp_path / "task")

    # `metatrain eval --run` rebuilds the same sequence episodes from the final checkpoint: the same numbers.
    again = evaluate(run=result.run_id, tasks=12, out=str(tmp_path / "eval"), tracking_uri=result.tracking_uri)
    assert again["instance_accuracy"] == summary["instance_accuracy"]


def test_the_lstm_baseline_runs_with_the_same_config(omniglot_store, tmp_path):
    result = train("configs/omniglot_mann_5class.yaml",
                   [f"data.path={omniglot_store}", "model.name=lstm", "model.controller=16", "train.meta_batch=4",
                    *SMALL], out=str(tmp_path / "lstm"), quiet=True)
    assert result.summary["algorithm"] == "mann" and "instance_accuracy" in result.summary
    params = MlflowClient(tracking_uri=result.tracking_uri).get_run(result.run_id).data.params
    assert params["model.name"] == "lstm"


def test_memory_module_trains_and_reports_n_way_accuracy(omniglot_store, tmp_path):
    out = tmp_path / "memory"
    result = train("configs/omniglot_memory_5w1s.yaml",
                   [f"data.path={omniglot_store}", "model.hidden=8", "model.key_size=16", "train.meta_batch=4",
                    *SMALL], out=str(out), quiet=True)
    summary = json.loads((out / "eval.json").read_text())
    assert summary["algorithm"] == "memory" and summary["ways"] == 5 and summary["shots"] == 1
    assert 0 <= summary["accuracy"] <= 1 and summary["ci95"] > 0 and summary["inner_steps"] is None
    run = MlflowClient(tracking_uri=result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["test/accuracy"] == pytest.approx(summary["accuracy"])
    assert "train/loss" in run.data.metrics and "val/acc" in run.data.metrics
