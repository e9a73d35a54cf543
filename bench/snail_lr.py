"""SNAIL's early training curve at several Adam learning rates: how many updates each takes to leave chance.

    python bench/snail_lr.py                                   # 1e-3 and 1e-4, 5w1s, 16 episodes/update, 570 s
    python bench/snail_lr.py --lrs 1e-3 3e-4 1e-4 --episodes 32 --seconds 300 --config configs/omniglot_snail_20w1s.yaml

In process (no Ray, no parameter server: the same meta-gradient the workers compute, the batched path, and a plain
torch.optim.Adam step), one torch thread per learning rate, the rates in parallel processes on the same episodes
(train.seed and (step, slot) fix them) and the same initial weights. Prints the mean training loss and accuracy
(query accuracy of the training episodes, before the update) over each 20 updates, side by side per rate. The curve
is per update, so a busy machine changes how far a run gets, not its numbers.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from metatrain.pipeline.algorithms import meta_gradient_tasks  # noqa: E402
from metatrain.pipeline.components import build_model, build_sampler, image_shape, initial_params, open_store  # noqa: E402
from metatrain.pipeline.config import load_config  # noqa: E402

EVERY = 20


def curve(config: str, data: str, lr: float, episodes: int, seconds: float, queue) -> None:
    """Train at ``lr`` for ``seconds``; put [(update, mean loss, mean accuracy) per EVERY updates] on ``queue``."""
    torch.set_num_threads(1)
    cfg = load_config(config, [f"data.path={data}"])
    model = build_model(cfg, image_shape(cfg))
    sampler = build_sampler(cfg, open_store(cfg), "train")
    params = {k: v.requires_grad_() for k, v in initial_params(cfg, model).items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    rows, losses, accs, t0, step = [], [], [], time.time(), 0
    while time.time() - t0 < seconds:
        eps = [sampler.episode(step, slot) for slot in range(episodes)]
        grads, n, metrics = meta_gradient_tasks({k: v.detach() for k, v in params.items()}, eps, cfg.algorithm,
                                                model, batched=True)
        for k, p in params.items():
            p.grad = grads[k] / n
        opt.step()
        losses.append(metrics["query_loss"])
        accs.append(metrics["query_acc"])
        step += 1
        if step % EVERY == 0:
            rows.append((step, sum(losses[-EVERY:]) / EVERY, sum(accs[-EVERY:]) / EVERY))
    queue.put(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/omniglot_snail_5w1s.yaml")
    ap.add_argument("--data", default="data/omniglot")
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 1e-4])
    ap.add_argument("--episodes", type=int, default=16, help="episodes per update")
    ap.add_argument("--seconds", type=float, default=570.0, help="wall time per rate (all rates at once)")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    queues = [ctx.Queue() for _ in args.lrs]
    procs = [ctx.Process(target=curve, args=(args.config, args.data, lr, args.episodes, args.seconds, q))
             for lr, q in zip(args.lrs, queues)]
    for p in procs:
        p.start()
    results = [q.get() for q in queues]
    for p in procs:
        p.join()
    print(f"{args.config}, {args.episodes} episodes per update, Adam; training loss / accuracy, mean of {EVERY} "
          f"updates; {args.seconds:g} s per rate, the rates at once")
    print("| update | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |")
    print("|---:|" + "---:|" * len(args.lrs))
    for i in range(max(len(r) for r in results)):
        cells = [f"{r[i][1]:.3f} / {r[i][2]:.3f}" if i < len(r) else "" for r in results]
        print(f"| {(i + 1) * EVERY} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
