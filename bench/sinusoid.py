"""MAML on sinusoid regression (Finn et al. 2017, section 5.1) against a jointly trained ("pretrained") baseline.

    python bench/sinusoid.py                      # about 1.5 minutes on 1 CPU thread
    python bench/sinusoid.py --iterations 70000   # the paper's length

Tasks: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; K = 10 support points. Network: the
paper's MLP, 1 -> 40 -> 40 -> 1 with ReLU (models.SinusoidMLP).

* MAML: one inner SGD step (lr 0.01) on the 10 support points, meta-gradient of the MSE on 10 query points,
  meta-batch 25, Adam (1e-3) as the outer optimiser. Runs through ``maml.meta_gradient_batched`` (all 25 tasks at
  once; the MLP's ``forward_tasks`` uses batched matrix products).
* Baseline: the same network trained for as many iterations on the same task stream, as one regression problem
  (all tasks' points pooled, 25 tasks x 20 points per batch, Adam 1e-3): it learns the average function, ~0.
* Evaluation: 600 held-out tasks (a separate seed), 10 support points, MSE on 100 query points in [-5, 5] after 1
  and 10 SGD steps of lr 0.01 from each initialisation (the same adaptation for both). Target: MAML's 1-step MSE
  <= 1/3 of the baseline's.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metatrain.models import SinusoidMLP  # noqa: E402
from metatrain.tasks.episode import Episode  # noqa: E402

from metatrain.pipeline.algorithms import AlgorithmConfig, evaluate_tasks, init_params, maml  # noqa: E402

K, META_BATCH, INNER_LR, OUTER_LR = 10, 25, 0.01, 1e-3


def sinusoid_tasks(n: int, support: int, query: int, gen: torch.Generator, query_grid: bool = False) -> Episode:
    """``n`` tasks as one stacked Episode: support_x (n, support, 1), query_x (n, query, 1)."""
    amp = torch.empty(n, 1, 1).uniform_(0.1, 5.0, generator=gen)
    phase = torch.empty(n, 1, 1).uniform_(0.0, math.pi, generator=gen)
    xs = torch.empty(n, support, 1).uniform_(-5.0, 5.0, generator=gen)
    if query_grid:
        xq = torch.linspace(-5.0, 5.0, query).view(1, query, 1).expand(n, query, 1).contiguous()
    else:
        xq = torch.empty(n, query, 1).uniform_(-5.0, 5.0, generator=gen)
    keys = torch.full((n, 1), -1)
    return Episode(xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase), keys, keys * 0, (-1, -1, -1))


def unstack(stacked: Episode) -> list[Episode]:
    n = stacked.support_x.shape[0]
    return [Episode(stacked.support_x[i], stacked.support_y[i], stacked.query_x[i], stacked.query_y[i],
                    stacked.classes[i], stacked.rotations[i], (1, 0, i)) for i in range(n)]


def train_maml(model, cfg, iterations: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    params = {k: v.requires_grad_(True) for k, v in init_params(model, cfg).items()}
    opt = torch.optim.Adam(params.values(), lr=OUTER_LR)
    for it in range(iterations):
        batch = sinusoid_tasks(META_BATCH, K, K, gen)
        grads, metrics = maml.meta_gradient_batched(params, batch, cfg, model)
        for k, p in params.items():
            p.grad = grads[k] / META_BATCH  # the worker sends sums; the server averages
        opt.step()
        if (it + 1) % max(1, iterations // 5) == 0:
            print(f"  maml      iter {it + 1:6d}: query MSE after 1 step {metrics['query_loss']:.3f}", flush=True)
    return {k: v.detach() for k, v in params.items()}


def train_pretrained(model, iterations: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    opt = torch.optim.Adam(params.values(), lr=OUTER_LR)
    for it in range(iterations):
        batch = sinusoid_tasks(META_BATCH, K, K, gen)
        x = torch.cat([batch.support_x, batch.query_x], 1).reshape(-1, 1)
        y = torch.cat([batch.support_y, batch.query_y], 1).reshape(-1, 1)
        loss = F.mse_loss(torch.func.functional_call(model, params, (x,)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (it + 1) % max(1, iterations // 5) == 0:
            print(f"  pretrain  iter {it + 1:6d}: pooled MSE {loss.item():.3f}", flush=True)
    return {k: v.detach() for k, v in params.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=30000)
    ap.add_argument("--eval-tasks", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = SinusoidMLP()
    cfg = AlgorithmConfig(name="maml", inner_lr=INNER_LR, inner_steps=1, eval_inner_steps=10)
    print(f"# sinusoid regression, K={K}, meta-batch {META_BATCH}, inner lr {INNER_LR}, outer Adam {OUTER_LR}, "
          f"{args.iterations} iterations, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")

    t0 = time.perf_counter()
    maml_params = train_maml(model, cfg, args.iterations, torch.Generator().manual_seed(args.seed + 1))
    t1 = time.perf_counter()
    torch.manual_seed(args.seed)
    model.reset_parameters()  # the baseline starts from the same initialisation
    pre_params = train_pretrained(model, args.iterations, torch.Generator().manual_seed(args.seed + 1))
    t2 = time.perf_counter()

    held_out = unstack(sinusoid_tasks(args.eval_tasks, K, 100, torch.Generator().manual_seed(10_000 + args.seed),
                                      query_grid=True))
    results = {}
    for name, params in (("MAML", maml_params), ("pretrained", pre_params)):
        for steps in (0, 1, 10):
            m = evaluate_tasks(params, held_out, cfg, model, batched=True, steps=steps)
            results[name, steps] = m["query_loss"]
    t3 = time.perf_counter()

    print(f"\n# {args.eval_tasks} held-out tasks, {K}-shot, query MSE on 100 points after k SGD steps "
          f"(lr {INNER_LR})")
    print(f"{'init':<12}{'k=0':>9}{'k=1':>9}{'k=10':>9}")
    for name in ("MAML", "pretrained"):
        print(f"{name:<12}" + "".join(f"{results[name, k]:9.3f}" for k in (0, 1, 10)))
    ratio = results["MAML", 1] / results["pretrained", 1]
    print(f"\nMAML / pretrained after 1 step: {ratio:.3f} (target <= 0.333: {'met' if ratio <= 1 / 3 else 'MISSED'})"
          f"; after 10 steps: {results['MAML', 10] / results['pretrained', 10]:.3f}")
    print(f"time: MAML training {t1 - t0:.0f} s ({args.iterations / (t1 - t0):.0f} it/s), baseline {t2 - t1:.0f} s, "
          f"evaluation {t3 - t2:.0f} s")


if __name__ == "__main__":
    main()
