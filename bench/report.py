"""Run every benchmark at a size that fits in about 30 minutes on 2 cores and write bench/RESULTS.md.

    python bench/report.py                   # all of them, ~30 min
    python bench/report.py --only scaling soak   # some of them (their sections are replaced, the rest kept)

Each benchmark is its own script (run alone for the full size; the commands are in each section) and prints
Markdown tables; this script runs them one after the other as subprocesses (so that none shares a core with
another), and writes their output under a header with the machine, the versions, the date and the commit. The
sizes here are smaller than the README's full runs where a full run takes longer than a few minutes
(train_budget: 5 minutes instead of 30); each section says what it ran.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"

# name -> (command, what it measures); sizes chosen for ~30 minutes in all on 2 cores.
BENCHMARKS = {
    "sampler": (["bench/sampler.py", "--seconds", "1"], "data: episodes/s of the sampler against a per-image peer"),
    "algorithms": (["bench/algorithms.py", "--repeats", "2"],
                   "throughput of each algorithm (1 thread) against higher and TorchOpt; peak memory"),
    "throughput": (["bench/throughput.py"],
                   "the whole pipeline at 1 worker through Ray against plain PyTorch, higher and TorchOpt"),
    "sinusoid": (["bench/sinusoid.py", "--iterations", "10000"], "MAML against a pretrained baseline on sinusoids"),
    "scaling": (["bench/scaling.py", "--rounds", "3"],
                "the engine at 1 and 2 workers, the parameter server's share, the PS at up to 64 workers"),
    "train_budget": (["bench/train_budget.py", "--algo", "fomaml", "--minutes", "5"],
                     "accuracy within a budget: FOMAML 5w1s for 5 minutes, 600 test tasks"),
    "faults": (["bench/faults.py"], "fault injection: worker, parameter server, driver, node, MLflow server"),
    "bad_inputs": (["bench/bad_inputs.py"], "the bad-input table: one clear error, nothing corrupted"),
    "soak": (["bench/soak.py", "--steps", "1000"], "memory over 1,000 sync steps (RSS, object store)"),
}


def header() -> str:
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "torchvision", "ray", "mlflow", "pyarrow"))
    return (f"# Benchmark results\n\nWritten by `python bench/report.py` on {time.strftime('%Y-%m-%d %H:%M %Z')}, "
            f"commit {commit}.\n\nMachine: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}; {versions}.\n")


def run(name: str) -> str:
    cmd, what = BENCHMARKS[name]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - t0
    # Keep what the script printed on stdout: its tables and notes (progress and library chatter go to stderr).
    # Ray's raylet writes its notices of the workers a fault benchmark kills to the driver's stdout: not results.
    body = "\n".join(line for line in proc.stdout.strip().splitlines() if "(raylet)" not in line).strip()
    body = body or "(no output)"
    status = "" if proc.returncode == 0 else \
        f"\n\n**exit code {proc.returncode}**; the end of its stderr:\n\n```\n{proc.stderr.strip()[-2000:]}\n```"
    return f"## {name}\n\n{what}. `python {' '.join(cmd)}`, {wall / 60:.1f} min.\n\n{body}{status}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run these; keep the other sections")
    args = ap.parse_args()
    names = args.only or list(BENCHMARKS)
    sections: dict[str, str] = {}
    if args.only and RESULTS.is_file():
        for block in re.split(r"(?m)^(?=## )", RESULTS.read_text())[1:]:
            sections[block.split("\n", 1)[0][3:].strip()] = block.rstrip() + "\n"
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        sections[name] = run(name)
        ordered = [sections[n] for n in BENCHMARKS if n in sections]
        RESULTS.write_text(header() + "\n" + "\n".join(ordered))  # after each one: a crash keeps what ran
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
