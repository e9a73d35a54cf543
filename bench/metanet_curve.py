"""Meta Networks' training curve and episode cost, in process: does the fast-weight path leave chance, and how fast.

    python bench/metanet_curve.py --updates 400 --set model.hidden=32     # the mechanism, cheap: ~0.4 s/episode
    python bench/metanet_curve.py --updates 150                           # the config's network (64 filters)
    python bench/metanet_curve.py --config configs/omniglot_metanet_20w1s.yaml --updates 50

No Ray, no parameter server: the meta-gradient the workers compute (one episode per update, as the authors' code),
clipped to ``optim.clip_norm`` and applied with Adam at ``optim.lr``, as the server does; one torch thread. Prints
the mean training loss and query accuracy (before each update) over every 25 updates, the seconds per episode and
the peak memory of the process. The curve is per update, so a busy machine changes the timings, not the numbers.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from metatrain.pipeline.algorithms.fastweight import metanet  # noqa: E402
from metatrain.pipeline.components import build_model, build_sampler, image_shape, initial_params, open_store  # noqa: E402
from metatrain.pipeline.config import load_config  # noqa: E402

EVERY = 25


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/omniglot_metanet_5w1s.yaml")
    ap.add_argument("--updates", type=int, default=150)
    ap.add_argument("--data", default="data/omniglot")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"data.path={args.data}", *args.overrides])
    model = build_model(cfg, image_shape(cfg))
    params = {k: v.requires_grad_() for k, v in initial_params(cfg, model).items()}
    opt = torch.optim.Adam(list(params.values()), lr=cfg.optim.lr)
    sampler = build_sampler(cfg, open_store(cfg), "train")
    print(f"{args.config} {' '.join(args.overrides)}: {cfg.data.ways}w{cfg.data.shots}s{cfg.data.queries}q, "
          f"Adam {cfg.optim.lr}, clip {cfg.optim.clip_norm}")
    losses, accs, t0 = [], [], time.time()
    for step in range(args.updates):
        grads, metrics = metanet.meta_gradient(params, sampler.episode(step, 0), cfg.algorithm, model)
        for k, p in params.items():
            p.grad = grads[k]
        if cfg.optim.clip_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.optim.clip_norm)
        opt.step()
        losses.append(metrics["query_loss"])
        accs.append(metrics["query_acc"])
        if (step + 1) % EVERY == 0:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print(f"update {step + 1}: loss {sum(losses[-EVERY:]) / EVERY:.3f}, accuracy "
                  f"{sum(accs[-EVERY:]) / EVERY:.3f}; {(time.time() - t0) / (step + 1):.2f} s/episode, "
                  f"peak {peak:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
