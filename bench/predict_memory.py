"""Peak memory of `metatrain predict` against the number of query images: it must stay flat.

    python bench/predict_memory.py [--algos fomaml protonet] [--queries 5 500 5000] [--source ../shared/data/omniglot]

Each row is a fresh process that builds a model from the algorithm's Omniglot 5w1s config (its seeded initial
weights: memory does not depend on what was learnt), writes a 5-way task (one drawing per class as support, the
queries drawn from the evaluation archive, repeated as needed), runs ``predict`` and reports its peak resident memory
(``ru_maxrss``) above what the process held just before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_task(source: Path, root: Path, queries: int) -> tuple[Path, Path]:
    z = zipfile.ZipFile(source / "images_evaluation.zip")
    names = sorted(n for n in z.namelist() if n.endswith(".png"))
    chars = sorted({n.rsplit("/", 1)[0] for n in names})[::37][:5]
    for i, c in enumerate(chars):
        (root / "support" / f"c{i}").mkdir(parents=True)
        (root / "support" / f"c{i}" / "a.png").write_bytes(z.read(next(n for n in names if n.startswith(c + "/"))))
    (root / "query").mkdir()
    for q in range(queries):
        (root / "query" / f"q{q:05d}.png").write_bytes(z.read(names[q % len(names)]))
    return root / "support", root / "query"


def child(algo: str, support: str, query: str) -> None:
    """In the fresh process: the model, then predict, printing the peak RSS growth in MiB as JSON."""
    from metatrain.pipeline.components import build_model, initial_params
    from metatrain.pipeline.config import load_config
    from metatrain.pipeline.jobs.predict import predict

    cfg = load_config(str(REPO / "configs" / f"omniglot_{algo}_5w1s.yaml"), ["data.path=/nonexistent"])
    model = build_model(cfg, (1, 28, 28))
    state = {"config": cfg.to_dict(), "params": initial_params(cfg, model), "step": 0,
             "extra": {"image_shape": [1, 28, 28]}}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    predictions = predict(state, support, query, invert=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"queries": len(predictions), "growth_mib": (peak - before) / 1024, "peak_mib": peak / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", nargs="+", default=["fomaml", "protonet"])
    ap.add_argument("--queries", nargs="+", type=int, default=[5, 500, 5000])
    ap.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "omniglot"))
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.queries:
            support, query = write_task(Path(args.source), Path(tmp) / f"task{n}", n)
            for algo in args.algos:
                env = dict(os.environ, OMP_NUM_THREADS="1")
                out = subprocess.run([sys.executable, __file__, "--child", algo, str(support), str(query)],
                                     capture_output=True, text=True, env=env, check=True).stdout
                rows.append((algo, json.loads(out.strip().splitlines()[-1])))
    print(f"\npeak resident memory of predict above the process before it (MiB); {os.cpu_count()} cores\n")
    print("| algorithm | queries | growth MiB | peak MiB |")
    print("|---|---:|---:|---:|")
    for algo, r in sorted(rows, key=lambda x: (x[0], x[1]["queries"])):
        print(f"| {algo} | {r['queries']} | {r['growth_mib']:.1f} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
