"""Fault injection: five ways to break a sync FOMAML run, and whether it finished with a clean run's parameters.

    python bench/faults.py [--steps 30]          # about 5 minutes on 2 cores (node removal: up to 15 more)
    python bench/faults.py --only-workers        # the clean run and the worker kill only

Each scenario trains FOMAML 5w1s on the prepared Omniglot store (Conv4, meta-batch 8, checkpoints every 5 steps,
2 workers) for --steps sync steps and injects one fault:

- worker killed: SIGKILL to a worker's process with its call of step 10 in flight;
- parameter server killed: SIGKILL to the parameter server just before step 12 is applied;
- driver killed: SIGKILL to a `metatrain train` process (and its process group) after checkpoint 10, then
  `metatrain train --resume RUN_ID`;
- node removed: a two-node `ray.cluster_utils.Cluster`, one worker per node (SPREAD), the worker node removed
  after step 10;
- MLflow server stopped: `metatrain train --tracking-uri http://...` against a real `mlflow server`, stopped after
  checkpoint 5 and started again 5 s later on the same store.

For each: did the run finish, are its final parameters bit-identical to a clean run's (the same seed, no fault),
how much was recomputed, and was anything lost (every step's train/loss in the tracking store, the run's status).
The same checks run as tests, at a smaller size: tests/test_engine.py, tests/test_engine_cluster.py,
tests/test_driver.py (resume), tests/test_tracking.py (an unreachable store).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import ray
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from metatrain.pipeline.checkpoint import load_checkpoint  # noqa: E402
from metatrain.pipeline.config import load_config  # noqa: E402
from metatrain.pipeline.distributed.engine import Engine  # noqa: E402
from metatrain.pipeline.distributed.trainer import Trainer  # noqa: E402

CONFIG = "configs/omniglot_fomaml_5w1s.yaml"


def overrides(data: str, steps: int) -> list[str]:
    return [f"data.path={data}", "train.meta_batch=8", f"train.steps={steps}", "train.val_every=0",
            "train.checkpoint_every=5", "train.eval_tasks=50", "workers.count=2", "tracking.system_metrics=false"]


class Recorder:
    def __init__(self):
        self.steps = []

    def log_metrics(self, metrics, step):
        if "train/loss" in metrics:
            self.steps.append(step)


def engine_run(cfg, folder: Path, hook=None) -> dict:
    """Engine + Trainer in this process (what `metatrain train` runs, minus MLflow); ``hook`` injects the fault."""
    t0 = time.monotonic()
    engine = Engine(cfg, str(folder), log=lambda s: None)
    try:
        rec = Recorder()
        trainer = Trainer(cfg, engine, rec, folder, quiet=True)
        if hook:
            hook(engine)
        last = trainer.run(1)
        return {"last": last, "params": ray.get(engine.get_weights()[1]), "faults": engine.faults,
                "logged": rec.steps, "wall": time.monotonic() - t0}
    finally:
        engine.shutdown()


def kill_worker_in_step(step: int):
    def hook(engine):
        pid = ray.get(engine.workers[0].handle.ping.remote())["pid"]
        original, done = engine.dispatch, []

        def dispatch(jobs, call, **kw):
            def call_and_kill(handle, job):
                refs = call(handle, job)
                if handle is engine.workers[0].handle and not done and engine.ps_status()["version"] == step - 1:
                    done.append(True)
                    os.kill(pid, signal.SIGKILL)  # dies with the call in flight
                return refs
            return original(jobs, call_and_kill, **kw)

        engine.dispatch = dispatch
    return hook


def kill_ps_before(step: int):
    """SIGKILL the parameter server as step ``step`` is sent to it; ``hook.applied`` lists every step it applied
    (a step applied twice was redone after the restart: the trainer logs it once)."""
    def hook(engine):
        original, done = engine.apply, []

        def apply(s, metas, grads):
            if s == step and not done:
                done.append(True)
                os.kill(engine.ps_status()["pid"], signal.SIGKILL)
            out = original(s, metas, grads)
            if out.get("applied"):
                hook.applied.append(s)
            return out

        engine.apply = apply
    hook.applied = []
    return hook


def remove_node_after(cluster, node, step: int):
    def hook(engine):
        original = engine.apply

        def apply(s, metas, grads):
            out = original(s, metas, grads)
            if s == step and node in cluster.worker_nodes:
                cluster.remove_node(node)
            return out

        engine.apply = apply
    return hook


def cli(args: list[str], log: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "metatrain.pipeline", *args], cwd=REPO, env=env,
                            stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True, **kw)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared (process exit {proc.poll()})")
        time.sleep(0.05)


def logged_steps(uri: str) -> tuple[str, list[int], str]:
    """(run id, the steps with a train/loss, status) of the only run in a tracking store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (run,) = runs
    history = client.get_metric_history(run.info.run_id, "train/loss")
    return run.info.run_id, sorted(m.step for m in history), run.info.status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server(root: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", f"sqlite:///{root}/server.db",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            stdout=open(root / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-1000:]}")
        time.sleep(0.5)


def same(a: dict, b: dict) -> str:
    if all(torch.equal(a[k], b[k]) for k in b):
        return "yes, bit-identical"
    if all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in b):
        return "allclose only"
    return "NO"


def _ranges(values: list[int]) -> str:
    runs, start = [], values[0]  # compact ranges: 2-10, 14
    for a, b in zip(values, values[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}-{a}" if a > start else f"{a}")
            start = b
    return ", ".join(runs)


def lost(logged: list[int], steps: int, twice: bool = False) -> str:
    """What the run's train/loss history lacks of steps 1..steps (with ``twice``: and what it holds twice)."""
    missing = sorted(set(range(1, steps + 1)) - set(logged))
    doubled = sorted({s for s in logged if logged.count(s) > 1}) if twice else []
    out = [f"train/loss of steps {_ranges(missing)}"] if missing else []
    out += [f"train/loss of steps {_ranges(doubled)} logged twice"] if doubled else []
    return "; ".join(out) or "nothing"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--data", default="data/omniglot")
    ap.add_argument("--only-workers", action="store_true", help="only the clean run and the worker kill")
    args = ap.parse_args()
    steps = args.steps
    os.chdir(REPO)
    cfg = load_config(CONFIG, overrides(args.data, steps))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        clean = engine_run(cfg, d / "clean")
        rows.append(("none (the clean reference)", clean["last"] == steps, "-", "-", lost(clean["logged"], steps),
                     clean["wall"]))
        r = engine_run(cfg, d / "worker", kill_worker_in_step(10))
        back = [e.split(" after ")[1] for e in r["faults"].events if "worker 0 is back in service" in e]
        rows.append(("worker killed (SIGKILL, call in flight)", r["last"] == steps, same(r["params"], clean["params"]),
                     f"{r['faults'].recomputed_slots} slots; {r['faults'].worker_failures} failure counted; "
                     + (f"worker 0 back in service after {back[0]}" if back else "worker 0 not back"),
                     lost(r["logged"], steps), r["wall"]))
        if args.only_workers:
            ray.shutdown()
            return print_table(rows, steps)
        kill_ps = kill_ps_before(12)
        r = engine_run(cfg, d / "ps", kill_ps)
        redone = sorted(s for s in set(kill_ps.applied) if kill_ps.applied.count(s) > 1)
        rows.append(("parameter server killed (SIGKILL)", r["last"] == steps, same(r["params"], clean["params"]),
                     f"steps {redone} ({r['faults'].ps_restarts} restart)", lost(r["logged"], steps, twice=True),
                     r["wall"]))
        ray.shutdown()

        # The driver: a real `metatrain train`, killed after checkpoint 10, then --resume.
        out, log = d / "driver", d / "driver.log"
        flags = [x for o in overrides(args.data, steps) for x in ("--set", o)]
        t0 = time.monotonic()
        proc = cli(["train", CONFIG, *flags, "--out", str(out), "--quiet"], log)
        wait_for(out / "checkpoints" / "ckpt-00000010.pt", proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        uri = f"sqlite:///{out}/mlflow.db"
        run_id, _, status_killed = logged_steps(uri)
        resumed = cli(["train", "--resume", run_id, "--out", str(out), "--quiet"], log)
        rc = resumed.wait()
        run_id, after, status = logged_steps(uri)
        text = log.read_text()
        start = int(text.split("resuming run")[1].split("at step")[1].split()[0]) if "resuming run" in text else 0
        final = load_checkpoint(out / "checkpoints" / "final.pt")["params"]
        rows.append(("driver killed (SIGKILL), then --resume", rc == 0 and status == "FINISHED",
                     same(final, clean["params"]), f"resumed at step {start} (killed after checkpoint 10)",
                     lost(after, steps, twice=True) + f"; run {status_killed} until resumed, then {status}",
                     time.monotonic() - t0))

        # A whole node of a two-node cluster.
        from ray.cluster_utils import Cluster

        c = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        node = c.add_node(num_cpus=1)
        c.wait_for_nodes()
        try:
            spread = load_config(CONFIG, [*overrides(args.data, steps), "workers.placement=SPREAD",
                                          "workers.max_restarts=0", "workers.task_timeout_s=60"])
            r = engine_run(spread, d / "node", remove_node_after(c, node, 10))
            rows.append(("node removed (2-node Cluster)", r["last"] == steps, same(r["params"], clean["params"]),
                         f"{r['faults'].recomputed_slots} slots", lost(r["logged"], steps), r["wall"]))
        finally:
            ray.shutdown()
            c.shutdown()

        # The tracking server goes away mid-run and comes back.
        root, port = d / "mlflow", free_port()
        root.mkdir()
        server = mlflow_server(root, port)
        out, log = d / "server-run", d / "server-run.log"
        t0 = time.monotonic()
        proc = cli(["train", CONFIG, *flags, "--out", str(out), "--quiet", "--tracking-uri",
                    f"http://127.0.0.1:{port}"], log)
        wait_for(out / "checkpoints" / "ckpt-00000005.pt", proc)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
        time.sleep(5)
        server = mlflow_server(root, port)
        rc = proc.wait()
        try:
            _, logged, status = logged_steps(f"http://127.0.0.1:{port}")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
        warned = "warning" in log.read_text().lower()
        final = load_checkpoint(out / "checkpoints" / "final.pt")["params"]
        rows.append(("MLflow server stopped after checkpoint 5, back 5 s later",
                     rc == 0 and status == "FINISHED", same(final, clean["params"]), "nothing (training went on)",
                     lost(logged, steps) + f"; status {status}" + ("; a warning was printed" if warned else ""),
                     time.monotonic() - t0))

    print_table(rows, steps)


def print_table(rows: list[tuple], steps: int) -> None:
    print(f"\nFOMAML 5w1s, Conv4, meta-batch 8, {steps} sync steps, checkpoints every 5, 2 workers; "
          f"{os.cpu_count()} cores\n")
    print("| fault | run finished | final parameters = clean run's | recomputed | lost | wall s |")
    print("|---|---|---|---|---|---:|")
    for name, finished, identical, redone, what, wall in rows:
        print(f"| {name} | {'yes' if finished else 'NO'} | {identical} | {redone} | {what} | {wall:.0f} |")


if __name__ == "__main__":
    main()
