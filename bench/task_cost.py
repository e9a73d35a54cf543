"""Seconds per task on one CPU thread: what a worker spends on one slot's meta-gradient, and for meta_lstm how much
of it is the meta-learner's cell alone (eager against torch.compile).

    python bench/task_cost.py [--algos meta_lstm fomaml] [--tasks 10] [--no-compile]

The meta-gradient rows use each algorithm's Omniglot 5w1s config on the store at --data; the cell rows replay the
meta_lstm config's inner steps on random gradients over as many coordinates as its learner has.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metatrain.models import MetaLSTMCell  # noqa: E402

from metatrain.pipeline import components  # noqa: E402
from metatrain.pipeline.algorithms import get_algorithm  # noqa: E402
from metatrain.pipeline.config import load_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def per_task(fn, tasks: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn(0)
    t = time.perf_counter()
    for i in range(tasks):
        fn(i)
    return (time.perf_counter() - t) / tasks


def meta_gradient_cost(algo: str, data: str, tasks: int) -> tuple[float, int, object]:
    cfg = load_config(str(CONFIGS / f"omniglot_{algo}_5w1s.yaml"), [f"data.path={data}"])
    sampler = components.build_sampler(cfg, components.open_store(cfg), "train")
    model = components.build_model(cfg, components.image_shape(cfg))
    params, alg = components.initial_params(cfg, model), get_algorithm(cfg.algorithm.name)
    episodes = [sampler.episode(i, 0) for i in range(tasks)]
    cost = per_task(lambda i: alg.meta_gradient(params, episodes[i], cfg.algorithm, model), tasks)
    return cost, sum(v.numel() for v in params.values()), cfg


def cell_cost(coords: int, steps: int, hidden: int, compiled: bool, tasks: int) -> float:
    cell = MetaLSTMCell(hidden)
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in cell.named_parameters()}

    def step(grad, loss, c, state):
        return torch.func.functional_call(cell, weights, (grad, loss, c, state))

    fn = torch.compile(step, dynamic=False) if compiled else step

    def one_task(_):  # the unroll of one task: forward through every step, then back to c_0 and the weights
        c0 = (torch.randn(coords) * 0.1).requires_grad_(True)
        c, state = c0, cell.init_state(coords)
        for _ in range(steps):
            c, state = fn(torch.randn(coords) * 1e-3, torch.tensor(1.5), c, state)
        c.sum().backward()

    return per_task(one_task, tasks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algos", nargs="+", default=["meta_lstm", "fomaml"])
    ap.add_argument("--data", default="data/omniglot")
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a worker is one core
    rows, lstm_cfg, coords = [], None, 0
    for algo in args.algos:
        cost, n, cfg = meta_gradient_cost(algo, args.data, args.tasks)
        rows.append((f"{algo} meta_gradient", n, cost))
        if cfg.algorithm.name == "meta_lstm":
            lstm_cfg, coords = cfg, n
    if lstm_cfg is not None:
        a = lstm_cfg.algorithm
        for compiled in (False,) if args.no_compile else (False, True):
            label = f"meta_lstm cell alone, {a.inner_steps} steps, {'torch.compile' if compiled else 'eager'}"
            rows.append((label, coords, cell_cost(coords, a.inner_steps, a.lstm_hidden, compiled, args.tasks)))
    print(f"torch {torch.__version__}, 1 thread, mean of {args.tasks} tasks after 2 warm-up\n")
    print("| what | coordinates | s per task |\n|---|---:|---:|")
    for label, n, cost in rows:
        print(f"| {label} | {n:,} | {cost:.3f} |")


if __name__ == "__main__":
    main()
