"""`metatrain study` stopped and resumed, as a real process with its own local Ray: SIGTERM ends the study (exit
130, the study's run and the started cell's KILLED, no process left) and the next run completes it, the stopped cell
continuing its run from its checkpoint; SIGKILL once one cell is done and the next mid-way, then the same command
restores the Tune experiment without retraining the finished cell (slow: two fresh Ray clusters)."""

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


def study_file(tmp_path: Path, store: Path, shots: list[int], steps: int) -> tuple[Path, list[str]]:
    """Cells one after the other, a checkpoint at every step (the last one mid-way when signalled)."""
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "name": "signals", "config": "configs/omniglot_fomaml_5w1s.yaml", "max_concurrent_trials": 1,
        "set": [f"data.path={store}", "model.hidden=8", f"train.steps={steps}", "train.meta_batch=2",
                "train.val_every=0", "train.eval_tasks=10", "train.checkpoint_every=1", "workers.count=1",
                "tracking.system_metrics=false", "data.queries=2"],
        "grid": {"shots": shots}}))
    return path, [c.id for c in load_study(path).cells]


class Study:
    def __init__(self, tmp_path: Path, store: Path, shots: list[int], steps: int):
        self.path, self.ids = study_file(tmp_path, store, shots, steps)
        self.out = tmp_path / "out"
        self.client = MlflowClient(tracking_uri=f"sqlite:///{self.out}/mlflow.db")

    def done(self, i: int) -> bool:
        return (self.out / "results" / f"cell={self.ids[i]}" / "part-0.parquet").is_file()

    def eval_mtime(self, i: int) -> int:
        return (self.out / "cells" / self.ids[i] / "eval.json").stat().st_mtime_ns

    def last_has_a_checkpoint(self) -> bool:
        *before, last = range(len(self.ids))
        return all(map(self.done, before)) and any((self.out / "cells" / self.ids[last] / "checkpoints").glob("ckpt-*"))

    def runs(self) -> tuple[dict[str, tuple[str, str]], int]:
        """({cell id or "parent": (run id, status)}, how many runs the study has)."""
        exps = [e.experiment_id for e in self.client.search_experiments()]
        runs = self.client.search_runs(exps, "tags.`metatrain.study` = 'signals'")
        return {r.data.tags.get("metatrain.cell", "parent"): (r.info.run_id, r.info.status) for r in runs}, len(runs)


@pytest.mark.data
def test_sigterm_ends_the_study_killed_with_no_process_left_and_the_next_run_resumes_it(
        ray_module, omniglot_store, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # One cell (the e2e test shows that a restore trains no finished one), of 200 steps: Tune's graceful stop (about
    # 10 s here) must not give it time to finish.
    st = Study(tmp_path, omniglot_store, [1], steps=200)
    proc = start(st.path, st.out, tmp_path / "term.log")
    wait_for(proc, st.last_has_a_checkpoint, "the cell's checkpoint")
    procs = family(proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 130, (tmp_path / "term.log").read_text()[-3000:]
    print(f"SIGTERM to exit: {time.monotonic() - t0:.1f} s")
    time.sleep(2)
    assert alive(procs) == [], "processes left after SIGTERM"
    assert "Traceback" not in (tmp_path / "term.log").read_text()
    runs, n = st.runs()
    assert {k: status for k, (_, status) in runs.items()} == {"parent": "KILLED", st.ids[0]: "KILLED"} and n == 2

    rows = run_study(st.path, out=str(st.out))  # in this process's Ray: the study completes
    assert [r["cell"] for r in rows] == st.ids and st.done(0)
    again, n = st.runs()
    assert {k: status for k, (_, status) in again.items()} == {k: "FINISHED" for k in runs} and n == 2
    assert again[st.ids[0]][0] == runs[st.ids[0]][0]  # the stopped cell continued its run from its checkpoint


@pytest.mark.slow
@pytest.mark.data
def test_a_sigkilled_study_resumes_without_retraining_finished_cells(ray_module, omniglot_store, tmp_path,
                                                                    monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    st = Study(tmp_path, omniglot_store, [1, 2], steps=40)
    proc = start(st.path, st.out, tmp_path / "kill.log")
    wait_for(proc, st.last_has_a_checkpoint, "cell 1's checkpoint")
    procs = family(proc)
    proc.kill()
    proc.wait(30)
    for p in procs[1:]:  # whatever of its Ray outlived it (started by this test: ended here by pid)
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    first, (runs, _) = st.eval_mtime(0), st.runs()
    assert not st.done(1) and runs["parent"][1] == "RUNNING"

    out = tmp_path / "rerun.log"
    proc = start(st.path, st.out, out)  # the same command: Tune's experiment restored
    assert proc.wait(600) == 0, out.read_text()[-3000:]
    assert "resuming the Tune experiment" in out.read_text()
    assert st.done(1) and st.eval_mtime(0) == first
    again, n = st.runs()
    assert {k: status for k, (_, status) in again.items()} == {k: "FINISHED" for k in runs} and n == 3
    assert again[st.ids[1]][0] == runs[st.ids[1]][0]
