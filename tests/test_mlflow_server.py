"""Against a real MLflow tracking server (a subprocess on a loopback port with its own SQLite store and artifact
folder): `metatrain train --register`, `metatrain retrain`, then everything checked over HTTP, and the champion
loaded as the few-shot pyfunc and asked a task."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, wait_until_up
from mlflow.tracking import MlflowClient

from metatrain.pipeline.cli import main
from tests.test_serving import assert_serves_like_predict

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root}/server.db",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", proc, root / "server.log")
    except BaseException:
        proc.kill()
        raise
    yield url, root
    proc.terminate()
    proc.wait(timeout=30)


def test_train_register_retrain_and_load_the_champion_over_http(server, ray_module, omniglot_store, omniglot_dir,
                                                                tmp_path, monkeypatch, capsys):
    url, root = server
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    quick = ["--set", f"data.path={omniglot_store}", "--set", "model.hidden=8", "--set", "train.meta_batch=4",
             "--set", "train.val_every=0", "--set", "train.checkpoint_every=5", "--set", "workers.count=2",
             "--set", "tracking.system_metrics=false", "--quiet"]
    assert main(["train", "configs/omniglot_fomaml_5w1s.yaml", "--tracking-uri", url, "--register", "srv",
                 "--out", str(tmp_path / "train"), "--set", "train.steps=5", "--set", "train.eval_tasks=20",
                 *quick]) == 0
    assert main(["retrain", "configs/omniglot_fomaml_5w1s.yaml", "--model", "srv", "--budget-steps", "5",
                 "--tracking-uri", url, "--out", str(tmp_path / "retrain"), *quick]) == 0
    assert "srv: promoted" in capsys.readouterr().out

    client = MlflowClient(tracking_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("metatrain").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [1, 2, 3, 4, 5]
        paths = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"eval.json", "eval_tasks.parquet", "config.yaml", "checkpoints"} <= paths
    # The artifacts went to the server's artifact store, not to the client's folders.
    assert any((root / "artifacts").rglob("final.pt"))
    versions = sorted(int(v.version) for v in client.search_model_versions("name='srv'"))
    assert versions == [1, 2]
    champion = client.get_model_version_by_alias("srv", "champion")
    assert str(champion.version) == "2"
    assert champion.tags["metatrain.retrain.decision"] == "promoted"

    # The champion is the few-shot pyfunc: loaded over HTTP, it labels a task as `predict` does with its checkpoint.
    from metatrain.pipeline.jobs.runs import checkpoint_of

    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # not mlflow.set_tracking_uri: it is process-global
    state, _ = checkpoint_of(None, "models:/srv@champion", url)
    assert_serves_like_predict("models:/srv@champion", state, omniglot_dir, tmp_path / "task")
