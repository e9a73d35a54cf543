"""Soak: thousands of sync FOMAML steps through the real engine and MLflow; memory sampled every 100 steps.

    python bench/soak.py [--steps 2000] [--meta-batch 4] [--every 100]

Runs what ``metatrain train`` runs (local Ray, two TaskWorkers, the ParameterServer actor, a SQLite MLflow run with
system metrics, checkpoints every 100 steps) for --steps steps, and every --every steps samples the resident memory
(RSS) of the driver, each worker and the parameter server, and the Ray object store's usage (bytes and objects).
The meta-batch is small by default (4 tasks a step) so that 2,000 steps take minutes: a leak grows per step or
per call (an object reference kept, a metric buffered, a checkpoint held), not per task, so more steps per minute
find it sooner. Prints the table and the growth of each series from the first sample after warm-up (step 200) to
the last; target: no series grows by more than 10%.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import psutil
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metatrain.pipeline.components import build_sampler, open_store  # noqa: E402
from metatrain.pipeline.config import load_config  # noqa: E402
from metatrain.pipeline.distributed.engine import Engine  # noqa: E402
from metatrain.pipeline.distributed.trainer import Trainer  # noqa: E402
from metatrain.pipeline.tracking import RunTracker, flatten_config  # noqa: E402

MIB = 2 ** 20


def object_store(gcs_address: str) -> tuple[float, int]:
    """(MiB used, objects) of the Ray object store, from Ray's own memory summary."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    return (float(m.group(1)), int(m.group(2))) if m else (float("nan"), -1)


class Sampling:
    """Wraps the MLflow tracker: passes every call through and samples memory every ``every`` steps."""

    def __init__(self, tracker: RunTracker, engine: Engine, gcs: str, every: int):
        self.tracker, self.engine, self.gcs, self.every = tracker, engine, gcs, every
        self.pids = engine.pids()
        self.rows = []
        self.t0 = time.monotonic()

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.tracker.log_metrics(metrics, step=step)
        if step % self.every == 0 and "train/loss" in metrics:
            row = {"step": step, "s": time.monotonic() - self.t0, "driver": psutil.Process().memory_info().rss / MIB}
            for name, pid in self.pids.items():
                row[name] = psutil.Process(pid).memory_info().rss / MIB
            row["store MiB"], row["store objects"] = object_store(self.gcs)
            row["loss"] = metrics["train/loss"]
            self.rows.append(row)
            print(" | ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--meta-batch", type=int, default=4)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=200, help="growth is measured from this step's sample")
    ap.add_argument("--data", default="data/omniglot")
    args = ap.parse_args()
    cfg = load_config("configs/omniglot_fomaml_5w1s.yaml", [
        f"data.path={args.data}", f"train.steps={args.steps}", f"train.meta_batch={args.meta_batch}",
        "train.val_every=0", "train.checkpoint_every=100", "workers.count=2"])
    build_sampler(cfg, open_store(cfg), "train")  # fail fast on a missing store
    ctx = ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as d:
        tracker = RunTracker(f"sqlite:///{d}/mlflow.db", experiment="soak", artifact_root=f"{d}/artifacts",
                             system_metrics=True, spill_dir=Path(d) / "spill")
        tracker.start(flatten_config(cfg.to_dict()), tags={})
        engine = Engine(cfg, f"{d}/checkpoints", log=lambda s: print(f"soak: {s}", file=sys.stderr))
        try:
            with tracker:
                sampling = Sampling(tracker, engine, ctx.address_info["gcs_address"], args.every)
                t0 = time.monotonic()
                last = Trainer(cfg, engine, sampling, Path(d), quiet=True).run(1)
                wall = time.monotonic() - t0
        finally:
            engine.shutdown()
    ray.shutdown()
    rows = sampling.rows
    series = ["driver", *[k for k in rows[0] if k.startswith("worker")], "parameter server", "store MiB",
              "store objects"]
    print(f"\n{psutil.cpu_count()} cores; FOMAML 5w1s15q, meta-batch {args.meta_batch}, 2 workers, sync; {last} steps "
          f"in {wall:.0f} s; MLflow (SQLite, system metrics on), checkpoints every 100 steps\n")
    print("| step | " + " | ".join(f"{s} RSS MiB" if not s.startswith("store") else s for s in series) + " |")
    print("|---:|" + "---:|" * len(series))
    for r in rows:
        print(f"| {r['step']} | " + " | ".join(f"{r[s]:.0f}" if s != "store MiB" else f"{r[s]:.0f}"
                                           for s in series) + " |")
    base = next((r for r in rows if r["step"] >= args.warmup), rows[0])
    end = rows[-1]
    print(f"\nGrowth from step {base['step']} to step {end['step']} (target: at most 10% each):\n")
    print("| series | at warm-up | at the end | growth |")
    print("|---|---:|---:|---:|")
    worst = 0.0
    for s in series:
        growth = (end[s] - base[s]) / base[s] if base[s] else (0.0 if end[s] == base[s] else float("inf"))
        worst = max(worst, growth)
        print(f"| {s} | {base[s]:.0f} | {end[s]:.0f} | {100 * growth:+.1f}% |")
    print(f"\nlargest growth {100 * worst:+.1f}% ({'within' if worst <= 0.10 else 'ABOVE'} the 10% target)")


if __name__ == "__main__":
    main()
