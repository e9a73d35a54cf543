"""`metatrain study` killed and resumed, as a real process with its own local Ray: SIGKILL mid-way, then the same
command restores the Tune experiment without retraining a finished cell (the interrupted one continues its run from
its checkpoint); SIGTERM ends the study (parent and started cell runs KILLED, exit 130, no Ray process left); the
next run completes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from metatrain.pipeline.jobs.study import load_study, run_study

REPO = Path(__file__).resolve().parents[1]


def start(study: Path, out: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    cmd = [sys.executable, "-m", "metatrain.pipeline", "study", str(study), "--out", str(out)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(proc: subprocess.Popen, check, what: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"the study exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def family(proc: subprocess.Popen) -> list[psutil.Process]:
    """The study process and every process it started (Ray's GCS, raylet, workers, the trials' actors)."""
    me = psutil.Process(proc.pid)
    return [me, *me.children(recursive=True)]


def alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.data
def test_a_killed_study_resumes_and_sigterm_ends_it_cleanly(ray_module, omniglot_store, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "name": "signals", "config": "configs/omniglot_fomaml_5w1s.yaml", "max_concurrent_trials": 1,
        "set": [f"data.path={omniglot_store}", "model.hidden=8", "train.steps=6", "train.meta_batch=2",
                "train.val_every=0", "train.eval_tasks=10", "train.checkpoint_every=1", "workers.count=1",
                "tracking.system_metrics=false", "data.queries=2"],
        "grid": {"shots": [1, 2, 3]}}))
    ids = [c.id for c in load_study(path).cells]
    out, cells = tmp_path / "out", tmp_path / "out" / "cells"
    done = lambda i: (out / "results" / f"cell={ids[i]}" / "part-0.parquet").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")

    def runs(query: str = ""):
        exps = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(exps, "tags.`metatrain.study` = 'signals'" + query)

    # 1. SIGKILL once cell 0 is done and cell 1 has a checkpoint.
    proc = start(path, out, tmp_path / "kill.log")
    wait_for(proc, lambda: done(0) and any((cells / ids[1] / "checkpoints").glob("ckpt-*.pt")), "cell 1's checkpoint")
    procs = family(proc)
    proc.kill()
    proc.wait(30)
    for p in procs[1:]:  # whatever of its Ray outlived it (started by this test: ended here by pid)
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    first = (cells / ids[0] / "eval.json").stat().st_mtime_ns
    killed_run = next(r for r in runs() if r.data.tags.get("metatrain.cell") == ids[1]).info.run_id
    assert not done(1)

    # 2. The same command restores the experiment; SIGTERM once cell 1 is done and cell 2's run has started.
    proc = start(path, out, tmp_path / "term.log")
    wait_for(proc, lambda: done(1) and (cells / ids[2] / "config.yaml").is_file(), "cell 2's run")
    procs = family(proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 130, (tmp_path / "term.log").read_text()[-3000:]
    print(f"SIGTERM to exit: {time.monotonic() - t0:.1f} s")
    time.sleep(2)
    assert alive(procs) == [], "processes left after SIGTERM"
    log = (tmp_path / "term.log").read_text()
    assert "resuming the Tune experiment" in log and "Traceback" not in log, log[-3000:]
    assert (cells / ids[0] / "eval.json").stat().st_mtime_ns == first  # not retrained after the SIGKILL
    status = {r.data.tags.get("metatrain.cell", "parent"): r.info.status for r in runs()}
    assert status == {"parent": "KILLED", ids[0]: "FINISHED", ids[1]: "FINISHED", ids[2]: "KILLED"}, status
    # The cell killed mid-way continued its own run from its checkpoint: one run per cell.
    assert next(r for r in runs() if r.data.tags.get("metatrain.cell") == ids[1]).info.run_id == killed_run

    # 3. Run again (in this process's Ray): the study completes; nothing finished is trained again.
    second = (cells / ids[1] / "eval.json").stat().st_mtime_ns
    rows = run_study(path, out=str(out))
    assert sorted(r["cell"] for r in rows) == sorted(ids) and all(done(i) for i in range(3))
    assert [(cells / ids[i] / "eval.json").stat().st_mtime_ns for i in (0, 1)] == [first, second]
    status = {r.data.tags.get("metatrain.cell", "parent"): r.info.status for r in runs()}
    assert status == {"parent": "FINISHED", **{i: "FINISHED" for i in ids}}, status
    assert len(runs()) == 4  # the study's run and one per cell: no cell ran twice
