"""Matching Networks' accuracy per training step at several cosine scales (the attention is softmax(s * cos)).

    python bench/matching_scale.py --device cuda --seconds 150          # s = 10 and s = 1 (the paper's), ~6 min
    python bench/matching_scale.py --seconds 600 --scales 10,5,1        # on this CPU: ~300 steps per arm

Why it exists: with raw cosines (s = 1) a perfect 5-way 1-shot match gets at most 0.65 of the attention, and our
40-minute Matching runs stayed ~10 points under the paper. This isolates the scale: every arm starts from the same
initial weights (seed 0), sees the same training episodes (train.seed, step, slot) in the same order, and is
validated on the same 200 held-out-character episodes; only ``algorithm.cosine_scale`` differs. It trains in this
process with the pipeline's own worker code (``TaskWorkerCore.compute``: the meta-gradient a Ray worker sends)
and plain Adam at the config's learning rate, meta-batch 32, without Ray or MLflow, for --seconds per arm; then
each arm is tested on 600 episodes of the evaluation alphabets. Prints one row per validation point.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metatrain.pipeline.algorithms import init_params  # noqa: E402
from metatrain.pipeline.components import build_model, image_shape  # noqa: E402
from metatrain.pipeline.config import load_config  # noqa: E402
from metatrain.pipeline.distributed.worker import TaskWorkerCore  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "omniglot_matching_5w1s.yaml"


def accuracy(core: TaskWorkerCore, weights: dict, split: str, tasks: int) -> float:
    rows = core.evaluate(weights, split, 0, range(tasks))
    return 100 * sum(r["query_acc"] for r in rows) / len(rows)


def train_arm(scale: float, args) -> tuple[dict[int, float], int, float]:
    """(validation accuracy by step, steps run, test accuracy) for one cosine scale."""
    device = ["workers.gpus=1"] if args.device == "cuda" else []
    cfg = load_config(str(CONFIG), [f"data.path={args.data}", f"algorithm.cosine_scale={scale}", *device])
    torch.manual_seed(0)
    weights = {k: v.clone().requires_grad_(True)
               for k, v in init_params(build_model(cfg, image_shape(cfg)), cfg.algorithm).items()}
    opt = torch.optim.Adam(weights.values(), lr=cfg.optim.lr)
    core = TaskWorkerCore(cfg, device=args.device)
    batch = list(range(cfg.train.meta_batch))
    curve, step, t0 = {}, 0, time.time()
    while time.time() - t0 < args.seconds:
        step += 1
        meta, grads = core.compute(step, 0, {k: v.detach() for k, v in weights.items()}, [batch])
        for k, v in weights.items():
            v.grad = grads[k].sum(0) / meta["n_tasks"]  # one block: its sum over the tasks; the PS divides likewise
        opt.step()
        if step % args.eval_every == 0:
            curve[step] = accuracy(core, {k: v.detach() for k, v in weights.items()}, "val", 200)
            print(f"  s={scale:g} step {step}: val {curve[step]:.2f}% ({time.time() - t0:.0f} s)", flush=True)
    return curve, step, accuracy(core, {k: v.detach() for k, v in weights.items()}, "test", 600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--seconds", type=float, default=150, help="training time per scale")
    ap.add_argument("--scales", default="10,1", help="comma-separated cosine scales")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between validations (200 episodes)")
    ap.add_argument("--data", default="data/omniglot")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # a worker's setting
    scales = [float(s) for s in args.scales.split(",")]
    results = {s: train_arm(s, args) for s in scales}
    steps = sorted(set().union(*(c for c, _, _ in results.values())))
    print(f"\nMatching 5w1s, meta-batch 32, {args.seconds:g} s per scale on {args.device}; validation accuracy (%):\n")
    print("| step | " + " | ".join(f"s = {s:g}" for s in scales) + " |")
    print("|---:|" + "---:|" * len(scales))
    for st in steps:
        print(f"| {st} | " + " | ".join(f"{results[s][0][st]:.2f}" if st in results[s][0] else "-" for s in scales)
              + " |")
    print("| test (600 tasks) | " + " | ".join(f"{results[s][2]:.2f} ({results[s][1]} steps)" for s in scales) + " |")


if __name__ == "__main__":
    main()
