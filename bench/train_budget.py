"""Accuracy within a wall-clock budget: train one algorithm for --minutes on this machine, then test on 600 tasks.

    python bench/train_budget.py --algo fomaml --minutes 30
    python bench/train_budget.py --algo maml --minutes 30 --set workers.count=2

Trains configs/omniglot_<algo>_5w1s.yaml (through the whole pipeline: local Ray, parameter server, MLflow) until
the budget is spent, then evaluates the final weights on 600 episodes of the evaluation alphabets and prints the
result beside the published number. --set overrides any config field (as for `metatrain train`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.driver import train  # noqa: E402

# Omniglot 5-way 1-shot test accuracy as published (%).
PUBLISHED = {"maml": (98.7, "Finn et al. 2017"), "fomaml": (98.3, "Finn et al. 2017"),
             "reptile": (97.68, "Nichol et al. 2018, transductive"), "protonet": (98.8, "Snell et al. 2017"),
             "matching": (98.1, "Vinyals et al. 2016")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algo", default="fomaml")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--data", default="data/omniglot")
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    config = Path(__file__).resolve().parents[1] / "configs" / f"omniglot_{args.algo}_5w1s.yaml"
    out = args.out or f"runs/budget-{args.algo}-{args.ways}w{args.shots}s-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"data.path={args.data}", f"data.ways={args.ways}", f"data.shots={args.shots}",
                 f"train.time_budget_s={args.minutes * 60}", "train.steps=1000000", "train.eval_tasks=600",
                 *args.overrides]
    t0 = time.time()
    result = train(str(config), overrides, out=out, quiet=True)
    s = result.summary
    paper, source = PUBLISHED.get(args.algo, (float("nan"), "-"))
    print()
    print(f"{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; config {config.name} "
          f"{' '.join(args.overrides)}")
    print()
    print("| algorithm | task | budget | steps | wall s | test accuracy (600 tasks) | published |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print(f"| {args.algo} | {args.ways}w{args.shots}s | {args.minutes:g} min | {result.final_step} | "
          f"{time.time() - t0:.0f} | {100 * s['accuracy']:.2f} ± {100 * s['ci95']:.2f}% | {paper}% ({source}) |")
    print(f"\nrun {result.run_id} in {out}")


if __name__ == "__main__":
    main()
