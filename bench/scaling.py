"""Scaling of the distributed engine: tasks/s with 1 and 2 workers, and the parameter server's share of a step.

    python bench/scaling.py [--steps 20] [--algo fomaml] [--meta-batch 32]

Part 1 runs the real engine (local Ray, a TaskWorker per core at one torch thread each, the ParameterServer actor)
for --steps sync steps after two warm-up steps, with 1 and then 2 workers, and prints tasks/s, the speed-up and the
parameter server's share of the step time (its apply time plus the driver's round trips, over the step time).
In the same run, the peer: the same FOMAML tasks computed by 1 and then 2 plain processes at once (no Ray, no
parameter server), which is what this machine's cores allow; the engine's efficiency is its speed-up over the peer's.
Part 2 simulates what the parameter server does per step as the worker count grows to 64 (no Ray: the cost is
its own): bytes of gradients it receives and its apply time, for Conv4 (Omniglot, 64 filters) gradients.
Targets: >= 1.8x at 2 workers; parameter-server share < 5%.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.components import build_model, image_shape, initial_params  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.engine import Engine  # noqa: E402
from pipeline.parameter_server import ParameterServerCore  # noqa: E402
from pipeline.trainer import Trainer  # noqa: E402


class Recorder:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append(dict(metrics, step=step))


def measure(cfg, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        engine = Engine(cfg, d, log=lambda s: None)
        try:
            rec = Recorder()
            trainer = Trainer(cfg, engine, rec, Path(d), quiet=True)
            trainer.run(1)
            rows = [r for r in rec.rows if r["step"] > 2]  # the first steps pay for warm-up
            step_s = np.array([r["time/step_s"] for r in rows])
            compute_s = np.array([r["time/compute_s"] for r in rows])
            apply_s = np.array([r["ps/apply_s"] for r in rows])
            return {"tasks_per_s": cfg.train.meta_batch / np.median(step_s), "step_s": np.median(step_s),
                    "compute_s": np.median(compute_s), "apply_s": np.median(apply_s),
                    # Everything in a step that is not the slowest worker computing: PS apply, weights fetch,
                    # scheduling and transfers.
                    "overhead": float(np.median((step_s - compute_s) / step_s))}
        finally:
            engine.shutdown()


def _plain_worker(config: str, overrides: list[str], repeats: int, queue) -> None:
    """One plain process: the engine's per-task work (sample + meta-gradient) on 16 tasks, ``repeats`` times."""
    torch.set_num_threads(1)
    from pipeline.worker import TaskWorkerCore

    core = TaskWorkerCore(load_config(config, overrides))
    weights = initial_params(core.cfg, core.model)
    core.compute(0, 0, weights, [[0], [1]])  # warm-up
    t0 = time.perf_counter()
    for r in range(repeats):
        core.compute(r + 1, 0, weights, [[s] for s in range(16)])
    queue.put(16 * repeats / (time.perf_counter() - t0))


def plain_processes(config: str, overrides: list[str], procs: int, repeats: int = 4) -> float:
    """Total tasks/s of ``procs`` plain processes computing at the same time."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    jobs = [ctx.Process(target=_plain_worker, args=(config, overrides, repeats, queue)) for _ in range(procs)]
    for j in jobs:
        j.start()
    rates = [queue.get() for _ in jobs]
    for j in jobs:
        j.join()
    return sum(rates)


def ps_simulation(cfg) -> list[tuple]:
    model = build_model(cfg, image_shape(cfg))
    params = initial_params(cfg, model)
    nbytes = sum(p.numel() * 4 for p in params.values())
    rows = []
    for workers in (1, 2, 4, 8, 16, 32, 64):
        core = ParameterServerCore(params, cfg.optim, total_steps=100, checkpoint_dir=None, checkpoint_every=100)
        blocks = max(workers, cfg.train.grad_blocks or cfg.train.meta_batch)
        per = [list(range(i, i + 1)) for i in range(blocks)]
        grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(blocks)]
        jobs = np.array_split(np.arange(blocks), workers)
        metas = [{"worker": w, "step": 0, "version": 0, "blocks": [per[i] for i in j], "n_tasks": len(j)}
                 for w, j in enumerate(jobs)]
        contribs = [[grads[i] for i in j] for j in jobs]
        times = []
        for step in range(1, 8):
            for m in metas:
                m["version"] = step - 1
            t0 = time.perf_counter()
            core.apply_gradients(step, metas, contribs)
            times.append(time.perf_counter() - t0)
        rows.append((workers, blocks, blocks * nbytes, float(np.median(times[2:]))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--algo", default="fomaml")
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--data", default="data/omniglot")
    args = ap.parse_args()
    cores = os.cpu_count()
    base = [f"data.path={args.data}", f"algorithm.name={args.algo}", f"train.steps={args.steps + 2}",
            f"train.meta_batch={args.meta_batch}", "train.val_every=0", "train.checkpoint_every=100000",
            "workers.torch_threads=1"]
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    print(f"{platform.processor() or platform.machine()}, {cores} cores; torch {torch.__version__}, "
          f"ray {ray.__version__}; {args.algo} Omniglot 5w1s15q, meta-batch {args.meta_batch}, 1 torch thread/worker")
    print()
    print("| workers | tasks/s | speed-up | step s | slowest worker compute s | PS apply s | non-compute share |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    one = None
    for n in (1, 2):
        cfg = load_config("configs/omniglot_fomaml_5w1s.yaml", [*base, f"workers.count={n}"])
        r = measure(cfg, args.steps)
        one = one or r["tasks_per_s"]
        print(f"| {n} | {r['tasks_per_s']:.1f} | {r['tasks_per_s'] / one:.2f}x | {r['step_s']:.3f} | "
              f"{r['compute_s']:.3f} | {r['apply_s']:.4f} | {100 * r['overhead']:.1f}% |", flush=True)
    ray.shutdown()
    engine_speedup = r["tasks_per_s"] / one
    print()
    print("Peer: the same tasks in plain processes at once (no Ray, no parameter server): the machine's ceiling.")
    print()
    print("| plain processes | tasks/s | speed-up |")
    print("|---:|---:|---:|")
    plain_one = plain_processes("configs/omniglot_fomaml_5w1s.yaml", base, 1)
    print(f"| 1 | {plain_one:.1f} | 1.00x |", flush=True)
    plain_two = plain_processes("configs/omniglot_fomaml_5w1s.yaml", base, 2)
    print(f"| 2 | {plain_two:.1f} | {plain_two / plain_one:.2f}x |")
    print()
    print(f"engine speed-up {engine_speedup:.2f}x (target >= 1.8x) = {engine_speedup / (plain_two / plain_one):.0%} of "
          f"the plain processes' {plain_two / plain_one:.2f}x")
    print()
    cfg = load_config("configs/omniglot_fomaml_5w1s.yaml", [*base])
    print("Parameter server per step, simulated (Conv4 64 filters; one gradient block per task, or per worker "
          "beyond that):")
    print()
    print("| workers | blocks received | MiB received per step | apply ms |")
    print("|---:|---:|---:|---:|")
    for workers, blocks, nbytes, t in ps_simulation(cfg):
        print(f"| {workers} | {blocks} | {nbytes / 2**20:.1f} | {1000 * t:.1f} |")


if __name__ == "__main__":
    main()
