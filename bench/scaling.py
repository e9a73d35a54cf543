"""Scaling of the distributed engine: tasks/s with 1 and 2 workers, and the parameter server's share of a step.

    python bench/scaling.py [--steps 8] [--rounds 4] [--algo fomaml] [--meta-batch 32]

Part 1 runs the real engine (local Ray, two TaskWorkers at one torch thread each, the ParameterServer actor) in
interleaved phases on the same actors: 1 worker (the other idle), 2 workers with the step's blocks split evenly, and
2 workers with the split sized by each worker's measured speed (``workers.balance``, the default). Each phase is
--steps sync steps (get weights, compute, apply: the Trainer's step), repeated --rounds times so that the host's
drift hits every phase alike. It prints tasks/s, the speed-up over 1 worker, the slowest worker's busy time and the
non-compute share of a step (parameter-server apply, weights fetch, scheduling and transfers).
Then the peer: the same FOMAML tasks in 1 and then 2 plain processes started together behind a barrier (no Ray,
no parameter server, no step barrier), each process's own rate shown: what this machine's two cores give.
Part 2 simulates what the parameter server does per step as the worker count grows to 64 (no Ray: the cost is
its own): the tree nodes and bytes of gradients it receives and its apply time, for Conv4 (Omniglot, 64 filters).
Targets: >= 1.8x at 2 workers; parameter-server share < 5%.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metatrain.pipeline.components import build_model, image_shape, initial_params  # noqa: E402
from metatrain.pipeline.config import load_config  # noqa: E402
from metatrain.pipeline.distributed.engine import Engine  # noqa: E402
from metatrain.pipeline.distributed.gradient_tree import cover  # noqa: E402
from metatrain.pipeline.distributed.parameter_server import ParameterServerCore  # noqa: E402


def sync_steps(engine: Engine, workers: int, balance: str, steps: int, cfg) -> list[dict]:
    """``steps`` sync training steps on the first ``workers`` actors: what ``Trainer.run`` does per step, timed.

    The other actors stay up and idle, so 1- and 2-worker phases alternate on the same processes and the same
    parameter server; the machine's drift (a neighbour on the host) then hits both alike.
    """
    engine.alive = lambda: engine.workers[:workers]
    engine.cfg = dataclasses.replace(cfg, workers=dataclasses.replace(cfg.workers, balance=balance))
    rows = []
    for _ in range(steps):
        t0 = time.perf_counter()
        version, ref = engine.get_weights()
        results = engine.compute(version + 1, version, ref, range(cfg.train.meta_batch))
        applied = engine.apply(version + 1, [m for m, _ in results], [g for _, g in results])
        step_s = time.perf_counter() - t0
        assert applied["applied"], applied
        busy = max(m["compute_s"] + m["sample_s"] for m, _ in results)
        rows.append({"step_s": step_s, "busy_s": busy, "apply_s": applied["apply_s"],
                     "split": [m["n_tasks"] for m, _ in results]})
    return rows


def measure(cfg, steps: int, rounds: int) -> dict[str, list[dict]]:
    """Rounds of (1 worker, 2 workers split evenly, 2 workers split by speed), ``steps`` steps each."""
    phases = {"1 worker": (1, "equal"), "2 workers, even split": (2, "equal"),
              "2 workers, split by speed": (2, "speed")}  # "even" is the default
    out: dict[str, list[dict]] = {name: [] for name in phases}
    with tempfile.TemporaryDirectory() as d:
        engine = Engine(cfg, d, log=lambda s: None)
        try:
            sync_steps(engine, 2, "equal", 2, cfg)  # warm-up: first calls, allocator, speeds
            for r in range(rounds):
                for name, (workers, balance) in phases.items():
                    rows = sync_steps(engine, workers, balance, steps + 1, cfg)
                    out[name].extend(row | {"round": r} for row in rows[1:])  # the first step of a phase re-balances
        finally:
            engine.shutdown()
    return out


def _plain_worker(config: str, overrides: list[str], repeats: int, barrier, queue) -> None:
    """One plain process: the engine's per-task work (sample + meta-gradient) on 16 tasks, ``repeats`` times."""
    torch.set_num_threads(1)
    from metatrain.pipeline.distributed.worker import TaskWorkerCore

    core = TaskWorkerCore(load_config(config, overrides))
    weights = initial_params(core.cfg, core.model)
    core.compute(0, 0, weights, [[0], [1]])  # warm-up
    barrier.wait()  # every process starts timing together: none runs alone while another is still importing
    t0 = time.perf_counter()
    for r in range(repeats):
        core.compute(r + 1, 0, weights, [[s] for s in range(16)])
    queue.put(16 * repeats / (time.perf_counter() - t0))


def plain_processes(config: str, overrides: list[str], procs: int, repeats: int = 8) -> list[float]:
    """Tasks/s of each of ``procs`` plain processes computing at the same time."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(procs)
    jobs = [ctx.Process(target=_plain_worker, args=(config, overrides, repeats, barrier, queue)) for _ in range(procs)]
    for j in jobs:
        j.start()
    rates = [queue.get() for _ in jobs]
    for j in jobs:
        j.join()
    return sorted(rates, reverse=True)


def ps_simulation(cfg) -> list[tuple]:
    model = build_model(cfg, image_shape(cfg))
    params = initial_params(cfg, model)
    nbytes = sum(p.numel() * 4 for p in params.values())
    rows = []
    for workers in (1, 2, 4, 8, 16, 32, 64):
        core = ParameterServerCore(params, cfg.optim, total_steps=100, checkpoint_dir=None, checkpoint_every=100)
        n = max(workers, cfg.train.grad_blocks or cfg.train.meta_batch)  # leaf blocks: one per task (or worker)
        metas, contribs = [], []
        for w, leaves in enumerate(np.array_split(np.arange(n), workers)):
            nodes = cover(int(leaves[0]), len(leaves), n)
            metas.append({"worker": w, "step": 0, "version": 0, "blocks": [[int(i)] for i in leaves],
                          "n_tasks": len(leaves), "tree": {"leaves": n, "nodes": [list(x) for x in nodes]}})
            contribs.append({k: torch.randn(len(nodes), *v.shape) for k, v in params.items()})
        received = sum(len(m["tree"]["nodes"]) for m in metas)
        times = []
        for step in range(1, 8):
            for m in metas:
                m["version"] = step - 1
            t0 = time.perf_counter()
            core.apply_gradients(step, metas, contribs)
            times.append(time.perf_counter() - t0)
        rows.append((workers, received, received * nbytes, float(np.median(times[2:]))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="measured steps per phase")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of the three phases, interleaved")
    ap.add_argument("--algo", default="fomaml")
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--data", default="data/omniglot")
    args = ap.parse_args()
    cores = os.cpu_count()
    base = [f"data.path={args.data}", f"algorithm.name={args.algo}", "train.steps=100000",
            f"train.meta_batch={args.meta_batch}", "train.val_every=0", "train.checkpoint_every=100000",
            "workers.torch_threads=1"]
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    print(f"{platform.processor() or platform.machine()}, {cores} cores; torch {torch.__version__}, "
          f"ray {ray.__version__}; {args.algo} Omniglot 5w1s15q, meta-batch {args.meta_batch}, 1 torch thread/worker")
    print()
    print("| engine | tasks/s | speed-up | step s | slowest worker busy s | PS apply s | non-compute share | split |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    cfg = load_config("configs/omniglot_fomaml_5w1s.yaml", [*base, "workers.count=2"])
    phases = measure(cfg, args.steps, args.rounds)
    one = cfg.train.meta_batch / np.median([r["step_s"] for r in phases["1 worker"]])
    for name, rows in phases.items():
        step_s = np.array([r["step_s"] for r in rows])
        busy_s = np.array([r["busy_s"] for r in rows])
        rate = cfg.train.meta_batch / np.median(step_s)
        splits = Counter("/".join(map(str, r["split"])) for r in rows)  # tasks per worker, most common first
        print(f"| {name} | {rate:.1f} | {rate / one:.2f}x | {np.median(step_s):.3f} | {np.median(busy_s):.3f} | "
              f"{np.median([r['apply_s'] for r in rows]):.4f} | {100 * np.median((step_s - busy_s) / step_s):.1f}% | "
              f"{', '.join(x for x, _ in splits.most_common(3))} |", flush=True)
    ray.shutdown()
    # The headline is the default configuration (workers.balance=equal); the speed split is for unequal hardware.
    engine_speedup = cfg.train.meta_batch / np.median([r["step_s"] for r in phases["2 workers, even split"]]) / one
    # Each round's own ratio (its 1-worker and 2-worker phases ran back to back): the spread the host's drift gives.
    per_round = [np.median([r["step_s"] for r in phases["1 worker"] if r["round"] == k])
                 / np.median([r["step_s"] for r in phases["2 workers, even split"] if r["round"] == k])
                 for k in range(args.rounds)]
    print()
    print(f"speed-up at 2 workers by round: {', '.join(f'{x:.2f}' for x in per_round)}; "
          f"median {np.median(per_round):.2f}x, range {min(per_round):.2f}-{max(per_round):.2f}x")
    print()
    print("Peer: the same tasks in plain processes started together (no Ray, no parameter server, no step barrier).")
    print()
    print("| plain processes | tasks/s | speed-up | each process |")
    print("|---:|---:|---:|---|")
    plain_one = sum(plain_processes("configs/omniglot_fomaml_5w1s.yaml", base, 1))
    print(f"| 1 | {plain_one:.1f} | 1.00x | {plain_one:.1f} |", flush=True)
    rates = plain_processes("configs/omniglot_fomaml_5w1s.yaml", base, 2)
    plain_two = sum(rates)
    print(f"| 2 | {plain_two:.1f} | {plain_two / plain_one:.2f}x | {' + '.join(f'{r:.1f}' for r in rates)} |")
    print()
    print(f"engine speed-up {engine_speedup:.2f}x (target >= 1.8x) = {engine_speedup / (plain_two / plain_one):.0%} of "
          f"the plain processes' {plain_two / plain_one:.2f}x")
    print()
    cfg = load_config("configs/omniglot_fomaml_5w1s.yaml", [*base])
    print("Parameter server per step, simulated (Conv4 64 filters; the meta-batch's blocks split evenly, each "
          "worker sending the nodes of the reduction tree inside its share):")
    print()
    print("| workers | tree nodes received | MiB received per step | apply ms |")
    print("|---:|---:|---:|---:|")
    for workers, blocks, nbytes, t in ps_simulation(cfg):
        print(f"| {workers} | {blocks} | {nbytes / 2**20:.1f} | {1000 * t:.1f} |")


if __name__ == "__main__":
    main()
