"""The learned optimizer of Andrychowicz et al. 2016 against tuned SGD, NAG, RMSprop and Adam, all in one run.

    python bench/learned_optimizer.py                          # quadratics and the digits MLP, both training modes
    python bench/learned_optimizer.py --families quadratic --train-tasks 600 --heldout 100
    python bench/learned_optimizer.py --families quadratic --equal-updates   # both modes with as many Adam steps
    python bench/learned_optimizer.py --server-steps 300      # and trained through `metatrain train` (Ray, the server)

For each optimizee family (``quadratic``: ||W theta - y||^2, 10-d; ``mlp``: one hidden layer of 20 sigmoid units on
scikit-learn's 8x8 digits, minibatches of 128):

1. The coordinate-wise LSTM (2 x 20) is trained with Adam on --train-tasks training optimizees (seed 0), unrolls of
   100 steps cut every 20, twice: ``per-trajectory`` (the sum of a trajectory's window gradients, one Adam step per
   trajectory: what the parameter server applies) and ``per-window`` (the paper's Adam step after every window).
   With --server-steps N also a third time, through the pipeline: ``metatrain train configs/<family>_l2l_gd.yaml``
   (quadratic_l2l_gd, digits_l2l_gd) for N steps on local Ray, two workers each unrolling one trajectory per step
   and the parameter server averaging them (so 2N trajectories, N Adam steps), at the same Adam rate; and again with
   ``algorithm.server_update: window`` for 5N steps (the paper's update after every window through the server:
   the same 2N trajectories, one window of each per step).
2. Each baseline's learning rate is tuned on a log grid on --tune-tasks training optimizees (mean final loss after
   100 steps; NAG is SGD with Nesterov momentum 0.9).
3. Everything runs on the same --heldout optimizees (seed 1): mean final loss after 100 and 200 steps (and its
   log10), and the mean loss curve as a PNG (--out). The MLP's generalisation cases (40 hidden units, 2 hidden
   layers, ReLU) reuse the optimizer trained on the base MLP, with the baselines retuned on each case.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metatrain.models import CoordinateLSTM  # noqa: E402
from metatrain.tasks.optimizees import make_optimizee_sampler  # noqa: E402

from metatrain.pipeline.algorithms.learned import l2l_gd  # noqa: E402
from metatrain.pipeline.jobs.train import train as pipeline_train  # noqa: E402

#: The pipeline config of each family (--server-steps).
CONFIGS = {"quadratic": "configs/quadratic_l2l_gd.yaml", "mlp": "configs/digits_l2l_gd.yaml"}

BASELINES = {
    "SGD": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "NAG": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
    "RMSprop": lambda p, lr: torch.optim.RMSprop(p, lr=lr),
    "Adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
}
GRID = [10.0 ** e for e in np.arange(-4.0, 1.01, 0.5)]
MLP_CASES = {"mlp": {}, "mlp, 40 hidden": {"hidden": (40,)}, "mlp, 2 hidden layers": {"hidden": (20, 20)},
             "mlp, ReLU": {"activation": "relu"}}


def hand_curve(make, lr: float, task, steps: int) -> list[float]:
    """The loss after every step of a hand-designed optimizer (task.eval_loss; at most one NaN ends the curve)."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in task.init_params().items()}
    opt = make(list(params.values()), lr)
    curve = []
    for t in range(steps):
        with torch.no_grad():
            curve.append(float(task.eval_loss(params)))
        opt.zero_grad(set_to_none=True)
        task.loss(params, t).backward()
        opt.step()
    with torch.no_grad():
        curve.append(float(task.eval_loss(params)))
    return [c if math.isfinite(c) else float("inf") for c in curve]


def tune(make, tasks, steps: int) -> float:
    """The grid learning rate with the lowest mean final loss on the tuning tasks."""
    scores = {lr: np.mean([hand_curve(make, lr, t, steps)[-1] for t in tasks]) for lr in GRID}
    return min(scores, key=lambda lr: scores[lr] if math.isfinite(scores[lr]) else float("inf"))


def row(name: str, curves: np.ndarray, note: str) -> str:
    f100, f200 = curves[:, 100].mean(), curves[:, 200].mean()
    return f"| {name} | {f100:.4g} | {l2l_gd.log10(f100):+.2f} | {f200:.4g} | {l2l_gd.log10(f200):+.2f} | {note} |"


def plot(results: dict[str, np.ndarray], title: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, curves in results.items():
        ax.semilogy(curves.mean(0), label=name)
    ax.set(xlabel="step", ylabel="mean loss (held-out optimizees)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def family_sampler(family: str, seed: int, **options):
    return make_optimizee_sampler(family, seed=seed, **options)


def server_trained(family: str, steps: int, lr: float, update: str) -> tuple[dict, float, int]:
    """(weights, seconds, trajectories) of the family's config trained through the whole pipeline."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="l2l-server-") as tmp:
        result = pipeline_train(CONFIGS[family], [f"train.steps={steps}", f"optim.lr={lr}", "train.val_every=0",
                                                  "train.eval_tasks=10", "tracking.system_metrics=false",
                                                  f"algorithm.server_update={update}"],
                                out=f"{tmp}/run", tracking_uri=f"sqlite:///{tmp}/mlflow.db", quiet=True)
        state = torch.load(result.out_dir / "checkpoints" / "final.pt", weights_only=True)
        config = state["config"]
    per = 100 // 20 if update == "window" else 1  # steps per trajectory
    return dict(state["params"]), time.time() - t0, steps * config["train"]["meta_batch"] // per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="quadratic,mlp")
    ap.add_argument("--train-tasks", type=int, default=400, help="training optimizees per training mode")
    ap.add_argument("--tune-tasks", type=int, default=10, help="training optimizees per learning rate of the grid")
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam's rate for the optimizer's weights")
    ap.add_argument("--out", default="bench/learned_optimizer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server-steps", type=int, default=0,
                    help="also train through metatrain train (local Ray, 2 workers, the parameter server) this many "
                         "steps")
    ap.add_argument("--equal-updates", action="store_true",
                    help="per-trajectory mode trains on 5x the optimizees (unroll / truncation): as many Adam steps "
                         "as per-window")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; {args.train_tasks} training "
          f"optimizees per mode, unroll 100 / truncation 20, Adam {args.lr:g}; baselines tuned on {args.tune_tasks} "
          f"training optimizees over lr 1e-4..10 (half decades); {args.heldout} held-out optimizees\n")
    for family in args.families.split(","):
        opt = CoordinateLSTM(hidden=20, layers=2)
        train = family_sampler(family, 0)
        trained = {}
        for mode, per_window in (("per-trajectory", False), ("per-window", True)):
            t0 = time.time()
            n = args.train_tasks * (100 // 20 if args.equal_updates and not per_window else 1)
            weights, _ = l2l_gd.train_in_process(l2l_gd.fresh_weights(opt, seed=0),
                                                 (train.task(i, 0) for i in range(n)), opt,
                                                 unroll=100, truncation=20, lr=args.lr, per_window=per_window)
            trained[mode] = (weights, time.time() - t0, n)
            torch.save(weights, out / f"{family}-{mode}.pt")
        if args.server_steps:
            for mode, update, steps in (("parameter server", "trajectory", args.server_steps),
                                        ("parameter server, per window", "window", args.server_steps * 100 // 20)):
                trained[mode] = server_trained(family, steps, args.lr, update)
                torch.save(trained[mode][0], out / f"{family}-{mode.replace(', ', '-').replace(' ', '-')}.pt")
        cases = MLP_CASES if family == "mlp" else {family: {}}
        for case, options in cases.items():
            heldout = [family_sampler(family, 1, **options).task(0, s) for s in range(args.heldout)]
            tuning = [family_sampler(family, 0, **options).task(10**6, s) for s in range(args.tune_tasks)]
            results, notes = {}, {}
            for mode, (weights, secs, n) in trained.items():
                results[f"LSTM, {mode}"] = np.array([l2l_gd.optimize(weights, t, opt, 200)[0] for t in heldout])
                notes[f"LSTM, {mode}"] = (f"trained {secs:.0f} s on {n} {family} optimizees"
                                          + (" (base MLP)" if options else ""))
            for name, make in BASELINES.items():
                lr = tune(make, tuning, 100)
                results[name] = np.array([hand_curve(make, lr, t, 200) for t in heldout])
                notes[name] = f"lr {lr:.3g}"
            print(f"**{case}**\n")
            print("| optimizer | loss @100 | log10 | loss @200 | log10 | |")
            print("|---|---:|---:|---:|---:|---|")
            for name, curves in results.items():
                print(row(name, curves, notes[name]))
            best = min(BASELINES, key=lambda n: results[n][:, 100].mean())
            for mode in trained:
                lstm = results[f"LSTM, {mode}"]
                print(f"\nLSTM {mode} below every tuned baseline: @100 "
                      f"{all(lstm[:, 100].mean() < results[n][:, 100].mean() for n in BASELINES)}, @200 "
                      f"{all(lstm[:, 200].mean() < results[n][:, 200].mean() for n in BASELINES)} (best baseline "
                      f"@100: {best})")
            png = out / f"{case.replace(', ', '-').replace(' ', '_')}.png"
            plot(results, case, png)
            print(f"\ncurve: {png}\n")


if __name__ == "__main__":
    main()
