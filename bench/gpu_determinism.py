"""Repeated meta-gradients on a GPU with cuDNN's default algorithms and in deterministic mode: bit-identical or not,
and the time per call.

    python bench/gpu_determinism.py                      # on a machine with a GPU: the README's table
    python bench/gpu_determinism.py --device cpu --configs omniglot_matching_5w1s   # the CPU, for comparison

A task is a pure function of (seed, step, slot), so a worker's gradient for the same weights and slots must be the
same on every call. ``TaskWorkerCore`` puts cuDNN in deterministic mode on a GPU for that; this script switches it
off and on again around the same worker and counts, per config, the gradient tensors that differ from the first of
five calls, then times ten calls (the config's meta-batch in blocks of 4 slots). Single timings: read them as ±25%.
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

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT = ("omniglot_maml_5w1s:loop,omniglot_maml_5w1s:batched,omniglot_matching_5w1s,omniglot_relation_5w1s,"
           "omniglot_siamese_5w1s,omniglot_protonet_5w1s,omniglot_memory_5w1s,omniglot_mann_5class")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def probe(name: str, batching: str | None, args) -> str:
    """The table row of config ``name``: both cuDNN modes (default, deterministic)."""
    overrides = [f"data.path={args.data}", f"workers.gpus={1 if args.device == 'cuda' else 0}"]
    cfg = load_config(str(CONFIGS / f"{name}.yaml"), overrides + ([f"algorithm.task_batching={batching}"]
                                                                  if batching else []))
    torch.manual_seed(0)
    weights = init_params(build_model(cfg, image_shape(cfg)), cfg.algorithm)
    core = TaskWorkerCore(cfg, device=args.device)
    blocks = [list(range(i, min(i + 4, cfg.train.meta_batch))) for i in range(0, cfg.train.meta_batch, 4)]
    rows = []
    for deterministic in (False, True):
        torch.backends.cudnn.deterministic = deterministic
        core.compute(1, 0, weights, blocks)  # warm-up: cuDNN's algorithm choice, allocator
        first = core.compute(3, 0, weights, blocks)[1]
        differ = set()
        for _ in range(4):
            again = core.compute(3, 0, weights, blocks)[1]
            differ |= {k for k in first if not torch.equal(again[k], first[k])}
        sync(args.device)
        t0 = time.perf_counter()
        for i in range(10):
            core.compute(10 + i, 0, weights, blocks)
        sync(args.device)
        rows.append(f"{len(differ)} of {len(first)} | {100 * (time.perf_counter() - t0):.0f}")  # 10 calls: ms/call
    torch.backends.cudnn.deterministic = True  # what a GPU worker runs with
    label = name + (f", {batching}" if batching else "") + f" (meta-batch {cfg.train.meta_batch})"
    return f"| {label} | {rows[0]} | {rows[1]} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--configs", default=DEFAULT, help="comma-separated config names (configs/NAME.yaml), each "
                                                       "optionally :loop or :batched (algorithm.task_batching)")
    ap.add_argument("--data", default="data/omniglot")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_determinism: --device cuda, but torch sees no CUDA device (use --device cpu)")
    if args.device == "cpu":
        torch.set_num_threads(1)  # a worker's setting
    cases = [(c.split(":") + [None])[:2] for c in args.configs.split(",")]
    for name, _ in cases:
        if not (CONFIGS / f"{name}.yaml").is_file():
            sys.exit(f"gpu_determinism: --configs: no config {CONFIGS / name}.yaml")
    print(f"\n{args.device}: tensors differing from the first of 5 calls, ms per call (10 calls)\n")
    print("| config | default: differing | ms/call | deterministic: differing | ms/call |")
    print("|---|---:|---:|---:|---:|")
    for name, batching in cases:
        print(probe(name, batching, args), flush=True)


if __name__ == "__main__":
    main()
