"""`metatrain train` / `eval` end to end on a real local Ray and a real SQLite MLflow store.

The headline test trains FOMAML 5-way 1-shot with 2 workers until it is clearly above chance on 600 evaluation
tasks and checks the MLflow run through MlflowClient. The others check resume (same parameters as an uninterrupted
run), run statuses, and bad input before anything starts.
"""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import ray
import torch
from metatrain.tasks.errors import DataError
from mlflow.tracking import MlflowClient

from metatrain.pipeline.checkpoint import load_checkpoint
from metatrain.pipeline.config import ConfigError
from metatrain.pipeline.distributed.engine import Engine
from metatrain.pipeline.jobs.runs import RunError
from metatrain.pipeline.jobs.train import evaluate, train
from tests.test_serving import assert_serves_like_predict

pytestmark = pytest.mark.data

CONFIG = "configs/omniglot_fomaml_5w1s.yaml"


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def no_env_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")


def quick(store, *extra):
    return [f"data.path={store}", "model.hidden=8", "algorithm.inner_steps=2", "train.meta_batch=4",
            "train.val_every=0", "train.eval_tasks=20", "train.checkpoint_every=2", *extra]


def test_fomaml_5w1s_two_workers_learns_and_is_tracked(omniglot_store, omniglot_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # A CI-sized run: 32 filters, 5 inner steps of 0.1 (10 at test), 100 steps of 8 tasks (about 30 s here).
    result = train(CONFIG, [f"data.path={omniglot_store}", "model.hidden=32", "algorithm.inner_lr=0.1",
                            "algorithm.inner_steps=5", "algorithm.eval_inner_steps=10", "train.steps=100",
                            "train.meta_batch=8", "train.val_every=40", "train.val_tasks=50", "train.eval_tasks=600",
                            "workers.count=2", "optim.lr=0.003"],
                   out=str(out), register="omniglot-fomaml", quiet=True)
    summary = json.loads((out / "eval.json").read_text())
    assert summary == result.summary
    assert summary["tasks"] == 600 and summary["ways"] == 5 and summary["shots"] == 1
    assert summary["accuracy"] >= 0.60, summary  # chance is 0.20
    assert math.isclose(summary["ci95"], summary["ci95"]) and 0 < summary["ci95"] < 0.05
    rows = pq.read_table(out / "eval_tasks.parquet").to_pylist()
    assert len(rows) == 600 and [r["slot"] for r in rows] == list(range(600))
    assert math.isclose(sum(r["query_acc"] for r in rows) / 600, summary["accuracy"], rel_tol=1e-9)

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm.name"] == "fomaml" and run.data.params["train.steps"] == "100"
    assert run.data.params["workers.count"] == "2"
    assert [m.step for m in client.get_metric_history(result.run_id, "train/loss")] == list(range(1, 101))
    for key in ("train/acc", "val/acc", "ps/staleness", "ps/rejected", "time/step_s", "time/tasks_per_s"):
        assert client.get_metric_history(result.run_id, key), key
    assert [m.step for m in client.get_metric_history(result.run_id, "val/acc")] == [40, 80, 100]
    assert run.data.metrics["test/accuracy"] == pytest.approx(summary["accuracy"])
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "eval.json", "eval_tasks.parquet", "learning_curve.png", "checkpoints"} <= artifacts
    assert {a.path for a in client.list_artifacts(result.run_id, "checkpoints")} >= {"checkpoints/final.pt",
                                                                                      "checkpoints/best.pt"}
    versions = client.search_model_versions("name='omniglot-fomaml'")
    assert len(versions) == 1 and versions[0].run_id == result.run_id
    # Provenance: the code (package version, the checkout's commit) and the data (the store's splits, digest).
    import hashlib
    import importlib.metadata
    import subprocess

    assert run.data.tags["metatrain.version"] == importlib.metadata.version("metatrain")
    assert run.data.tags["mlflow.source.name"] == f"metatrain train {CONFIG}"
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    assert run.data.tags.get("mlflow.source.git.commit") == (git.stdout.strip() if git.returncode == 0 else None)
    digest = hashlib.sha256((omniglot_store / "_manifest.json").read_bytes()).hexdigest()[:16]
    inputs = {(d.dataset.name, d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
              for d in run.inputs.dataset_inputs}
    assert inputs == {("omniglot:background/train", digest, "training"), ("omniglot:background/val", digest,
                      "validation"), ("omniglot:evaluation", digest, "test")}
    assert json.loads(run.inputs.dataset_inputs[0].dataset.source)["uri"] == str(omniglot_store.resolve())
    spec = json.loads(run.inputs.dataset_inputs[0].dataset.schema)["mlflow_colspec"][0]["tensor-spec"]
    assert spec == {"dtype": "uint8", "shape": [-1, 1, 28, 28]}

    final = load_checkpoint(out / "checkpoints" / "final.pt")
    assert final["step"] == 100 and final["extra"]["run_id"] == result.run_id
    # The logged model is the few-shot pyfunc over the final checkpoint: it labels a task as `predict` does.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out}/mlflow.db")  # not mlflow.set_tracking_uri: global
    assert_serves_like_predict(run.data.tags["metatrain.model_uri"], final, omniglot_dir, tmp_path / "task")

    # `metatrain eval --run` reproduces the test result from the checkpoint alone (same tasks, same numbers: its
    # first 200 tasks are the run's first 200) ...
    again = evaluate(run=result.run_id, tracking_uri=f"sqlite:///{out}/mlflow.db", tasks=200, out=str(tmp_path / "ev"))
    assert again["accuracy"] == pytest.approx(sum(r["query_acc"] for r in rows[:200]) / 200, abs=1e-6)
    # ... and so does `--model models:/NAME/1`, read from the registry's run with weights_only=True.
    by_model = evaluate(model_uri="models:/omniglot-fomaml/1", tracking_uri=f"sqlite:///{out}/mlflow.db",
                        tasks=50, out=str(tmp_path / "ev2"))
    assert by_model["tasks"] == 50


def test_resume_continues_the_same_run_to_the_same_parameters(omniglot_store, tmp_path, monkeypatch):
    uninterrupted = train(CONFIG, quick(omniglot_store, "train.steps=6"), out=str(tmp_path / "full"), quiet=True)

    real_apply = Engine.apply

    def stop_at_step_5(self, step, metas, grads):
        if step == 5:
            raise KeyboardInterrupt
        return real_apply(self, step, metas, grads)

    monkeypatch.setattr(Engine, "apply", stop_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(CONFIG, quick(omniglot_store, "train.steps=6"), out=str(tmp_path / "part"), quiet=True)
    monkeypatch.setattr(Engine, "apply", real_apply)
    uri = f"sqlite:///{tmp_path / 'part'}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    (killed,) = client.search_runs([client.get_experiment_by_name("metatrain").experiment_id])
    assert killed.info.status == "KILLED"
    assert load_checkpoint(sorted((tmp_path / "part" / "checkpoints").glob("ckpt-*.pt"))[-1])["step"] == 4
    # As if the driver had died between its checkpoints: the newest is step 2, so steps 3-4 are redone, but they
    # reach the run once.
    (tmp_path / "part" / "checkpoints" / "ckpt-00000004.pt").unlink()

    resumed = train(None, out=str(tmp_path / "part"), resume=killed.info.run_id, quiet=True)
    assert resumed.run_id == killed.info.run_id and resumed.final_step == 6
    run = client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(resumed.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "final.pt")["params"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "final.pt")["params"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert uninterrupted.summary["accuracy"] == pytest.approx(resumed.summary["accuracy"], abs=1e-6)
    # Resuming with another architecture is refused before anything starts, naming the checkpoint.
    from metatrain.pipeline.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="ckpt-00000006.pt was written for a different model or config"):
        train(None, ["model.hidden=16", "train.steps=8"], out=str(tmp_path / "part"), resume=resumed.run_id,
              quiet=True)
    assert client.get_run(resumed.run_id).info.status == "FINISHED"


def test_a_failing_run_ends_failed_and_a_fresh_run_refuses_an_occupied_folder(omniglot_store, tmp_path, monkeypatch):
    def boom(self, step, metas, grads):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Engine, "apply", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(CONFIG, quick(omniglot_store, "train.steps=2"), out=str(tmp_path / "run"), quiet=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run'}/mlflow.db")
    (failed,) = client.search_runs([client.get_experiment_by_name("metatrain").experiment_id])
    assert failed.info.status == "FAILED"
    monkeypatch.undo()
    # A new run into a folder that holds another run's checkpoints would silently continue it: refused.
    (tmp_path / "run" / "checkpoints").mkdir(exist_ok=True)
    import shutil

    src = tmp_path / "src"
    train(CONFIG, quick(omniglot_store, "train.steps=2"), out=str(src), quiet=True)
    shutil.copy(src / "checkpoints" / "ckpt-00000002.pt", tmp_path / "run" / "checkpoints")
    with pytest.raises(RunError, match="already holds checkpoints of another run"):
        train(CONFIG, quick(omniglot_store, "train.steps=2"), out=str(tmp_path / "run"), quiet=True)


@pytest.mark.parametrize("overrides, error, message", [
    (["data.path=/nonexistent/store"], DataError, "no prepared store at /nonexistent/store; make it with `metatrain "
                                                  "prepare omniglot"),
    (["data.ways=700"], Exception, "ways = 700 exceeds the 100 classes of split 'background/val'"),
    (["workers.gpus=1"], ConfigError, "workers.gpus = 1 x 2 workers needs 2 GPUs; the Ray cluster has 0"),
    (["workers.count=3"], ConfigError, "workers.cpus = 1 x 3 workers needs 3 CPUs; the Ray cluster has 2"),
    (["train.stesp=3"], ConfigError, "did you mean 'train.steps'"),
])
def test_bad_input_fails_before_a_run_starts(omniglot_store, tmp_path, overrides, error, message):
    out = tmp_path / "run"
    args = [f"data.path={omniglot_store}", *overrides]
    with pytest.raises(error, match=message):
        train(CONFIG, args, out=str(out), quiet=True)
    db = out / "mlflow.db"
    if db.exists():  # if the store was made, it holds no half-made run
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        exp = client.get_experiment_by_name("metatrain")
        assert exp is None or not client.search_runs([exp.experiment_id])


def test_unknown_resume_run_and_unreachable_tracking_server(omniglot_store, tmp_path):
    with pytest.raises(RunError, match="--resume 0123abc: no such metatrain run"):
        train(CONFIG, [f"data.path={omniglot_store}"], out=str(tmp_path / "r"), resume="0123abc", quiet=True)
    from metatrain.pipeline.tracking import TrackingError

    with pytest.raises(TrackingError, match="unreachable"):
        train(CONFIG, [f"data.path={omniglot_store}"], out=str(tmp_path / "r2"), quiet=True,
              tracking_uri="http://127.0.0.1:9")


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs at tmp_path/disk (root only: mount(8)); unmounted afterwards."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk check did not run")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_ends_the_run_failed_in_one_line_and_the_run_resumes(omniglot_store, small_disk, tmp_path,
                                                                          capsys):
    """Checkpoints on a disk that fills mid-run: exit 1 with one line naming the path, the run FAILED, every
    checkpoint on disk whole (no temporary file left), and --resume finishes the run once there is space again."""
    import threading
    import time

    from metatrain.pipeline.cli import main

    out, uri = small_disk / "run", f"sqlite:///{tmp_path}/mlflow.db"  # the store off the small disk: it records
    filler = small_disk / "filler"

    def fill_after_checkpoint_2():
        while not (out / "checkpoints" / "ckpt-00000002.pt").exists():
            time.sleep(0.02)
        try:
            with open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * (1 << 20))
        except OSError:
            pass

    sets = [x for o in quick(omniglot_store, "train.steps=60", "train.checkpoint_every=1",
                             "train.keep_checkpoints=3", "tracking.system_metrics=false") for x in ("--set", o)]
    thread = threading.Thread(target=fill_after_checkpoint_2, daemon=True)
    thread.start()
    capsys.readouterr()
    code = main(["train", CONFIG, *sets, "--out", str(out), "--tracking-uri", uri, "--quiet"])
    thread.join(timeout=60)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("metatrain: error: ")]
    assert code == 1, err[-3000:]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "the disk is full" in errors[0], err
    assert str(small_disk) in errors[0] and "Traceback" not in err
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("metatrain").experiment_id])
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["error"]
    kept = sorted((out / "checkpoints").glob("*.pt"))
    assert kept and not [p for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]
    for path in kept:
        load_checkpoint(path)
    filler.unlink()
    assert main(["train", "--resume", run.info.run_id, "--out", str(out), "--tracking-uri", uri, "--quiet"]) == 0
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert load_checkpoint(out / "checkpoints" / "final.pt")["step"] == 60
