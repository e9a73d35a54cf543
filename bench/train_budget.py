"""Accuracy within a wall-clock budget: train one algorithm for --minutes on this machine, then test on 600 tasks.

    python bench/train_budget.py --algo fomaml --minutes 30
    python bench/train_budget.py --algo maml --minutes 30 --set workers.count=2
    python bench/train_budget.py --algo mann --minutes 60        # MANN, then the LSTM baseline on the same budget
    python bench/train_budget.py --algo mann --minutes 60 --parallel   # both at once, one worker (core) each
    python bench/train_budget.py --algo memory --minutes 60      # Kaiser et al.'s memory module, 5w1s
    python bench/train_budget.py --algo protonet --minutes 20 [--ways 20] [--shots 5]
    python bench/train_budget.py --algo matching,relation --minutes 40 --parallel   # a core each, at once
    python bench/train_budget.py --algo meta_lstm --minutes 40 --parallel [--shots 5]   # and FOMAML, its peer
    python bench/train_budget.py --algo snail --minutes 40 [--ways 20] [--shots 5]   # its config for that shape
    python bench/train_budget.py --algo metanet --minutes 40 [--ways 20]   # one-shot only, a model per ways

Trains the algorithm's config (configs/omniglot_<algo>_5w1s.yaml; mann: omniglot_mann_5class.yaml) through the whole
pipeline (local Ray, parameter server, MLflow) until the budget is spent, then evaluates the final weights on 600
episodes of the evaluation alphabets and prints the result beside the published number. --set overrides any config
field (as for `metatrain train`). For mann the table is accuracy by instance (1st, 2nd, 3rd, 5th, 10th showing of a
class), MANN next to an LSTM of the same controller size trained on the same budget (--no-baseline skips it).
--parallel trains the two (or the comma-separated --algo list) at the same time, each with one worker on its own core
for the whole --minutes: with two, the same compute as two sequential runs of half the budget on both cores, in half
the wall time. An algorithm with a peer (meta_lstm: FOMAML, the first-order learner of the same cost per inner step)
trains it on the same budget in the same report, with the paired difference on the same test episodes
(--no-baseline skips it). The config is configs/omniglot_<algo>_<ways>w<shots>s.yaml where it exists (SNAIL: one per
shape, as the paper trains), else omniglot_<algo>_5w<shots>s.yaml, else the 5w1s one.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metatrain.pipeline.jobs.train import train  # noqa: E402

# Omniglot 5-way 1-shot test accuracy as published (%).
PUBLISHED = {"maml": (98.7, "Finn et al. 2017"), "fomaml": (98.3, "Finn et al. 2017"),
             "reptile": (97.68, "Nichol et al. 2018, transductive"), "protonet": (98.8, "Snell et al. 2017"),
             "matching": (98.1, "Vinyals et al. 2016"), "memory": (98.4, "Kaiser et al. 2017"),
             "relation": (99.6, "Sung et al. 2018"), "siamese": (float("nan"), "Koch et al. 2015: 92.0% at 20-way"),
             "meta_lstm": (float("nan"), "Ravi & Larochelle 2017: mini-ImageNet only"),
             "snail": (99.07, "Mishra et al. 2018"), "metanet": (98.95, "Munkhdalai & Yu 2017")}
# The papers' Omniglot accuracies by (ways, shots) where they report more than 5w1s (%).
PUBLISHED_BY_TASK = {"protonet": {(5, 1): 98.8, (5, 5): 99.7, (20, 1): 96.0, (20, 5): 98.9},
                     "matching": {(5, 1): 98.1, (5, 5): 98.9, (20, 1): 93.8, (20, 5): 98.5},
                     "relation": {(5, 1): 99.6, (5, 5): 99.8, (20, 1): 97.6, (20, 5): 99.1},
                     "memory": {(5, 1): 98.4, (20, 1): 95.0}, "siamese": {(20, 1): 92.0},
                     "snail": {(5, 1): 99.07, (5, 5): 99.78, (20, 1): 97.64, (20, 5): 99.36},
                     "metanet": {(5, 1): 98.95, (20, 1): 97.00}}
# Santoro et al. 2016, Omniglot 5 classes, accuracy at instances 1, 2, 3, 5, 10 (%).
PUBLISHED_MANN = {"MANN (LRUA)": (36.4, 82.8, 91.0, 94.9, 98.1), "LSTM": (24.4, 49.5, 55.3, 61.0, 63.6)}
INSTANCES = ("1", "2", "3", "5", "10")
CONFIGS = {"mann": "omniglot_mann_5class.yaml"}
# The peer trained on the same budget in the same report (the yardstick for the learned update rule).
PEERS = {"meta_lstm": "fomaml"}


def config_for(algo: str, ways: int, shots: int) -> Path:
    """The algorithm's config for this shape where it has one (SNAIL has a model per shape), else its 5-way one."""
    root = Path(__file__).resolve().parents[1] / "configs"
    if algo in CONFIGS:
        return root / CONFIGS[algo]
    for name in (f"omniglot_{algo}_{ways}w{shots}s.yaml", f"omniglot_{algo}_5w{shots}s.yaml"):
        if (root / name).is_file():
            return root / name
    return root / f"omniglot_{algo}_5w1s.yaml"


def run(algo: str, args, extra: list[str]) -> tuple:
    config = config_for(algo, args.ways, args.shots)
    label = algo + ("-lstm" if "model.name=lstm" in extra else "")
    out = args.out or f"runs/budget-{label}-{args.ways}w{args.shots}s-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.out and (algo == "mann" and not args.no_baseline or "," in args.algo):
        out = f"{args.out}/{label}"  # MANN and its LSTM baseline: one folder (and MLflow store) each
    # ProtoNets train wider than they test (60-way in its config): only the test ways follow --ways.
    ways = [f"data.eval_ways={args.ways}"] if algo == "protonet" else [f"data.ways={args.ways}",
                                                                       f"data.eval_ways={args.ways}"]
    overrides = [f"data.path={args.data}", *ways, f"train.time_budget_s={args.minutes * 60}",
                 "train.steps=1000000", "train.eval_tasks=600", *extra, *args.overrides]
    if algo != "mann":
        overrides.insert(2, f"data.shots={args.shots}")
    t0 = time.time()
    result = train(str(config), overrides, out=out, quiet=True)
    return config, result, time.time() - t0, out


def _run_in_child(algo: str, args, extra: list[str], queue) -> None:
    config, result, wall, out = run(algo, args, extra)
    queue.put((str(config), result.summary, result.final_step, result.run_id, wall, out))


def run_parallel(jobs: list[tuple[str, list[str]]], args) -> list[tuple]:
    """``run`` for each (algo, overrides) at the same time in its own process (its own local Ray), one worker each."""
    import multiprocessing as mp
    from types import SimpleNamespace

    ctx = mp.get_context("spawn")
    queues = [ctx.Queue() for _ in jobs]
    procs = [ctx.Process(target=_run_in_child, args=(algo, args, [*extra, "workers.count=1", "train.grad_blocks=1"], q))
             for (algo, extra), q in zip(jobs, queues)]
    for p in procs:
        p.start()
    results = []
    for p, q in zip(procs, queues):
        config, summary, final_step, run_id, wall, out = q.get()
        p.join()
        results.append((Path(config), SimpleNamespace(summary=summary, final_step=final_step, run_id=run_id), wall,
                        out))
    return results


def paired_differences(a: Path, b: Path, columns: list[str]) -> dict[str, tuple[float, float]]:
    """{column: (mean of a - b, its 95% CI)} over the episodes both eval_tasks.parquet files scored.

    The two runs are tested on the same episodes (a task is a pure function of (eval seed, step, slot)), so the
    per-episode difference removes the episodes' shared difficulty: its CI is narrower than the two runs' CIs
    side by side. Rows are matched on (step, slot), not on file order; files that scored different episodes are
    an error, not a comparison.
    """
    import numpy as np
    import pyarrow.parquet as pq

    from metatrain.pipeline.scores import ci95

    tables, counts = {}, {}
    for path in (a, b):
        rows = pq.read_table(path).to_pylist()
        missing = [c for c in ("step", "slot", *columns) if rows and c not in rows[0]]
        if not rows or missing:
            raise ValueError(f"{path}: {'no rows' if not rows else 'no column ' + ', '.join(missing)}")
        tables[path], counts[path] = {(r["step"], r["slot"]): r for r in rows}, len(rows)
    keys = sorted(tables[a])
    if set(keys) != set(tables[b]) or counts[a] != len(keys) or counts[b] != len(keys):
        raise ValueError(f"{a} and {b} scored different episodes ((step, slot) pairs differ or repeat): "
                         "not a paired comparison")
    out = {}
    for c in columns:
        d = np.array([tables[a][k][c] - tables[b][k][c] for k in keys], dtype=np.float64)
        out[c] = (float(d.mean()), ci95(d))
    return out


def result_workers(runs) -> int:
    """The worker count the first run trained with, from the resolved config.yaml the driver wrote to its folder."""
    import yaml

    return yaml.safe_load((Path(runs[0][-1]) / "config.yaml").read_text())["workers"]["count"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algo", default="fomaml", help="an algorithm, or several separated by commas")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--ways", type=int, default=5, help="ways (mann: classes per sequence)")
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--data", default="data/omniglot")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-baseline", action="store_true", help="mann: skip the LSTM baseline; meta_lstm: FOMAML")
    ap.add_argument("--parallel", action="store_true",
                    help="train the algorithms (mann: MANN and the LSTM) at once, a core each")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    head = f"{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    if args.algo == "mann":
        if args.parallel and not args.no_baseline:
            both = run_parallel([("mann", []), ("mann", ["model.name=lstm"])], args)
            runs = [("MANN (LRUA)", *both[0]), ("LSTM", *both[1])]
        else:
            # --no-baseline --set model.name=lstm trains the baseline on its own: name its row by what ran.
            first = "LSTM" if "model.name=lstm" in args.overrides else "MANN (LRUA)"
            runs = [(first, *run("mann", args, []))]
            if not args.no_baseline:
                runs.append(("LSTM", *run("mann", args, ["model.name=lstm"])))
        workers = result_workers(runs)
        how = (f"at once, {workers} worker(s) each" if args.parallel and len(runs) > 1 else
               f"one after the other, {workers} worker(s) each" if len(runs) > 1 else f"{workers} worker(s)")
        print(f"\n{head}; {args.ways} classes x 10 instances, {args.minutes:g} min each ({how}), 600 test episodes "
              f"of the evaluation alphabets; {' '.join(args.overrides)}\n")
        print("| model | steps | wall s | " + " | ".join(f"inst {k}" for k in INSTANCES) + " | all steps |")
        print("|---|---:|---:|" + "---:|" * (len(INSTANCES) + 1))
        for name, _, result, wall, _ in runs:
            s = result.summary
            cells = " | ".join(f"{100 * s['instance_accuracy'][k]:.1f} ± {100 * s['instance_ci95'][k]:.1f}"
                               for k in INSTANCES if k in s["instance_accuracy"])
            print(f"| {name} | {result.final_step} | {wall:.0f} | {cells} | {100 * s['accuracy']:.1f} |")
        if len(runs) == 2:
            # Same 600 test episodes for both: the per-episode difference is the sharper comparison.
            shown = runs[0][2].summary["instance_accuracy"]
            cols = [f"inst{k}_acc" for k in INSTANCES if k in shown] + ["query_acc"]
            a, b = (Path(r[-1]) / "eval_tasks.parquet" for r in runs)
            diff = paired_differences(a, b, cols)
            print(f"| {runs[0][0]} - {runs[1][0]}, paired | - | - | "
                  + " | ".join(f"{100 * diff[c][0]:+.2f} ± {100 * diff[c][1]:.2f}" for c in cols) + " |")
        for name, values in PUBLISHED_MANN.items():
            if args.ways == 5:
                print(f"| {name}, Santoro et al. 2016 | - | - | " + " | ".join(f"{v}" for v in values) + " | - |")
        for name, _, result, _, out in runs:
            print(f"{name}: run {result.run_id} in {out}")
        return
    algos = args.algo.split(",")
    if len(algos) == 1 and algos[0] in PEERS and not args.no_baseline:
        algos.append(PEERS[algos[0]])
        args.algo = ",".join(algos)  # so that each run gets its own folder under --out
    if args.parallel:
        runs = run_parallel([(a, []) for a in algos], args)
    else:
        runs = [run(a, args, []) for a in algos]
    how = ("at once, 1 worker (core) each" if args.parallel else "whole machine") + f", {' '.join(args.overrides)}"
    print()
    print(f"{head}; {how}")
    print()
    tasks = runs[0][1].summary["tasks"]
    print(f"| algorithm | task | budget | steps | wall s | test accuracy ({tasks} tasks) | published |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for algo, (_, result, wall, _) in zip(algos, runs):
        s = result.summary
        paper, source = PUBLISHED.get(algo, (float("nan"), "-"))
        paper = PUBLISHED_BY_TASK.get(algo, {}).get((args.ways, args.shots),
                                                    paper if (args.ways, args.shots) == (5, 1) else float("nan"))
        print(f"| {algo} | {args.ways}w{args.shots}s | {args.minutes:g} min | {result.final_step} | "
              f"{wall:.0f} | {100 * s['accuracy']:.2f} ± {100 * s['ci95']:.2f}% | "
              f"{'-' if paper != paper else f'{paper}%'} ({source}) |")  # paper != paper: NaN, none at this task
    if len(runs) == 2:
        d, ci = paired_differences(*(Path(r[-1]) / "eval_tasks.parquet" for r in runs), ["query_acc"])["query_acc"]
        print(f"| {algos[0]} - {algos[1]}, paired | {args.ways}w{args.shots}s | | | | {100 * d:+.2f} ± {100 * ci:.2f} "
              f"points | |")
    for algo, (config, result, _, out) in zip(algos, runs):
        print(f"{algo}: config {config.name}, run {result.run_id} in {out}")

if __name__ == "__main__":
    main()
