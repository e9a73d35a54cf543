"""Throughput and peak memory of the meta-gradient computations on Omniglot 5-way 1-shot (15 queries per class).

    python bench/algorithms.py                    # CPU, 1 torch thread, meta-batch 32: about 4 minutes
    python bench/algorithms.py --repeats 5        # steadier medians
    python bench/algorithms.py --device cuda      # the batched path's home (its >= 2x target is for a GPU)
    python bench/algorithms.py --profile          # also: top operators of our MAML loop and of `higher`
    python bench/algorithms.py --tuned-malloc     # glibc keeps freed memory (no page faults), for every row

What it measures, all in one process and on the same Conv4 module (so that model-level speed-ups apply to every
row alike and the ratios compare only how the meta-gradient is driven):

1. tasks/s for maml, fomaml, reptile, metasgd and anil, each as the per-task loop and as the batched path (Conv4's
   ``forward_tasks``: grouped convolutions, ~2x vmap here), through ``meta_gradient_tasks`` (the worker's entry
   point), and the same second-order MAML meta-batch computed by
   ``higher`` (innerloop_ctx + SGD) and by TorchOpt (MetaSGD, extract/recover_state_dict). Methods are timed
   round-robin (repeat r of every method before repeat r+1 of any), median of ``--repeats`` after one warm-up, so
   a load change on a shared machine hits all rows alike. Ratios: each MAML row against the faster of
   higher/TorchOpt; each batched row against its loop row.
2. Peak memory of one meta-batch for every row (CPU: the process's peak RSS above its level before the call, with
   glibc told to return freed blocks at once, so the peak is the live set, measured in fresh subprocesses;
   GPU: max_memory_allocated).
3. Second-order MAML memory per task for 1, 5 and 10 inner steps, with and without ``checkpoint_inner``, for
   5-way 1-shot (75 query images against 5 support images: the query pass dominates) and 10-way 5-shot (50
   support images per step).

Episodes are random tensors of the right shapes: content does not change the cost.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metatrain.models import Conv4  # noqa: E402
from metatrain.tasks.episode import Episode  # noqa: E402

from metatrain.pipeline.algorithms import (  # noqa: E402
    AlgorithmConfig,
    algorithm_names,
    get_record,
    init_params,
    meta_gradient_tasks,
)

WAYS, SHOTS, QUERIES, SIDE = 5, 1, 15, 28
INNER_LR = 0.4  # MAML's Omniglot setting; one inner step at meta-training


def inner_loop_algorithms() -> tuple[str, ...]:
    """The inner-loop learners (records that adapt weights), in registry order: all run a Conv4 classifier. The
    registry's other algorithms need their own models (sequence models, embeddings) and are measured end to end by
    throughput.py and train_budget.py."""
    return tuple(n for n in algorithm_names() if get_record(n).adapts_weights)


def make_episodes(n: int, device: torch.device, ways: int = WAYS, shots: int = SHOTS,
                  queries: int = QUERIES) -> list[Episode]:
    g = torch.Generator().manual_seed(0)
    eps = []
    for i in range(n):
        eps.append(Episode(torch.rand(ways * shots, 1, SIDE, SIDE, generator=g),
                           torch.arange(ways).repeat_interleave(shots),
                           torch.rand(ways * queries, 1, SIDE, SIDE, generator=g),
                           torch.arange(ways).repeat_interleave(queries), torch.arange(ways),
                           torch.zeros(ways, dtype=torch.int64), (0, 0, i)).to(device))
    return eps


# ------------------------------------------------------------------------------------------------------- the peers


def higher_maml(model, episodes, lr):
    """Second-order MAML with `higher`, the way its README does it; gradients summed over the tasks."""
    import higher

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for ep in episodes:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step(F.cross_entropy(fmodel(ep.support_x), ep.support_y))
            loss = F.cross_entropy(fmodel(ep.query_x), ep.query_y)
            for t, g in zip(total, torch.autograd.grad(loss, params)):
                t.add_(g)
    return total


def torchopt_maml(model, episodes, lr):
    """Second-order MAML with TorchOpt's MetaSGD (its MAML example's pattern); gradients summed over the tasks."""
    import torchopt

    inner = torchopt.MetaSGD(model, lr=lr)
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for ep in episodes:
        state = torchopt.extract_state_dict(model)
        inner.step(F.cross_entropy(model(ep.support_x), ep.support_y))
        loss = F.cross_entropy(model(ep.query_x), ep.query_y)
        for t, g in zip(total, torch.autograd.grad(loss, params)):
            t.add_(g)
        torchopt.recover_state_dict(model, state)
    return total


# ---------------------------------------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory of a call above the level before it: CUDA allocator stats, or peak RSS on Linux CPUs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_ok = device.type == "cpu" and Path("/proc/self/clear_refs").exists()
        if self.cpu_ok:
            # Make glibc hand every block over 64 KiB straight back to the OS on free (no caching, no dynamic
            # threshold), so that RSS follows the live set and its high-water mark is the peak of this call.
            # Done only for the memory phase: the page faults it causes would distort the timings.
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            self.libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD

    @staticmethod
    def _status(field: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) * 1024

    def measure(self, fn, warm_up: bool = True) -> float | None:
        """MiB, or None where this platform cannot tell. With ``warm_up``, ``fn`` runs once before the measured call
        (needed after other work in the process; a fresh process can measure its first call)."""
        if warm_up:
            fn()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        if not self.cpu_ok:
            return None
        self.libc.malloc_trim(0)
        base = self._status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        fn()
        return (self._status("VmHWM") - base) / 2**20


# ------------------------------------------------------------------------------------------------------------ rows

CKPT_SHAPES = ((WAYS, SHOTS, QUERIES), (10, 5, 5))
CKPT_STEPS = (1, 5, 10)


def build_methods(args, device: torch.device) -> dict:
    """name -> zero-argument callable computing one meta-batch's meta-gradient."""
    torch.manual_seed(0)
    model = Conv4.omniglot(WAYS).to(device)
    episodes = make_episodes(args.meta_batch, device)

    def ours(name: str, batched: bool):
        cfg = AlgorithmConfig(name=name, inner_lr=INNER_LR if name != "reptile" else 0.1, inner_steps=1)
        params = {k: v.to(device) for k, v in init_params(model, cfg).items()}
        return lambda: meta_gradient_tasks(params, episodes, cfg, model, batched=batched)

    methods = {}
    for name in inner_loop_algorithms():
        methods[f"{name} loop"] = ours(name, False)
        methods[f"{name} batched"] = ours(name, True)
    methods["maml higher"] = lambda: higher_maml(model, episodes, INNER_LR)
    methods["maml torchopt"] = lambda: torchopt_maml(model, episodes, INNER_LR)
    return methods


def build_ckpt_row(key: tuple, device: torch.device):
    """Second-order MAML on one task of shape (ways, shots, queries), ``steps`` inner steps, checkpointed or not."""
    ways, shots, queries, steps, ck = key
    torch.manual_seed(0)
    net = Conv4.omniglot(ways).to(device)
    one = make_episodes(1, device, ways, shots, queries)
    cfg = AlgorithmConfig(name="maml", inner_lr=0.1, inner_steps=steps, checkpoint_inner=bool(ck))
    params = {k: v.to(device) for k, v in init_params(net, cfg).items()}
    return lambda: meta_gradient_tasks(params, one, cfg, net, batched=False)


def measure_in_subprocess(args, rows: list[str], meta_batch: int) -> dict[str, float | None]:
    """Peak memory of ``rows``, measured in a fresh process: a process that has just run a 2 GiB batched
    meta-batch keeps enough heap state that later, smaller peaks read hundreds of MiB high (seen here)."""
    cmd = [sys.executable, __file__, "--measure", json.dumps(rows), "--meta-batch", str(meta_batch),
           "--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_rows(args, rows: list[str]) -> None:
    """The --measure mode: print {row: MiB} as one JSON line."""
    device = torch.device(args.device)
    meter = PeakMemory(device)
    methods = build_methods(args, device) if any(not r.startswith("ckpt") for r in rows) else {}
    result = {}
    for row in rows:
        fn = methods[row] if row in methods else build_ckpt_row(tuple(json.loads(row[len("ckpt"):])), device)
        result[row] = meter.measure(fn, warm_up=len(rows) > 1)
    print(json.dumps(result))


# ------------------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method (median), after one warm-up")
    ap.add_argument("--batched-repeats", type=int, default=1,
                    help="timed runs of the batched rows (slow on a CPU and not the CPU's path; more on a GPU)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--tuned-malloc", action="store_true",
                    help="keep freed memory in glibc's heap, as the workers do (pipeline.worker.keep_freed_memory)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: memory of these rows, in a fresh process
    args = ap.parse_args()
    args.repeats, args.batched_repeats = max(1, args.repeats), max(1, args.batched_repeats)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # higher/TorchOpt deprecation chatter
    if args.measure:
        measure_rows(args, json.loads(args.measure))
        return
    if args.tuned_malloc:
        # What every TaskWorker does (workers.keep_freed_memory): large tensors stop being mmap'd and unmapped or
        # trimmed on every allocation, so they stop page-faulting. (mallopt refuses an mmap threshold above 32 MiB:
        # an earlier 1 GiB here set only the trim threshold, which disables glibc's adaptive threshold.)
        from metatrain.pipeline.distributed.worker import keep_freed_memory

        keep_freed_memory()
    device = torch.device(args.device)
    methods = build_methods(args, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"# Omniglot {WAYS}-way {SHOTS}-shot, {QUERIES} queries/class, meta-batch {args.meta_batch}, "
          f"Conv4 (64 filters), inner lr {INNER_LR} x 1 step; device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); median of {args.repeats} round-robin repeats after a warm-up "
          f"({args.batched_repeats} for batched rows)"
          + ("; glibc malloc tuned" if args.tuned_malloc else ""), flush=True)
    times: dict[str, list[float]] = {m: [] for m in methods}
    wanted = {m: args.batched_repeats if m.endswith("batched") else args.repeats for m in methods}
    for r in range(max(wanted.values()) + 1):
        for m, fn in methods.items():
            if r > wanted[m]:
                continue
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r:
                times[m].append(time.perf_counter() - t0)
    rate = {m: args.meta_batch / statistics.median(ts) for m, ts in times.items()}

    # Checkpointing rows: timed here (warm-up, then one timed call); their memory comes from a subprocess below.
    ckpt_keys = [(w, s, q, steps, ck) for (w, s, q) in CKPT_SHAPES for steps in CKPT_STEPS for ck in (0, 1)]
    ckpt_time = {}
    if not args.skip_memory:
        for key in ckpt_keys:
            call = build_ckpt_row(key, device)
            call()
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            ckpt_time[key] = time.perf_counter() - t0

    memory: dict[str, float | None] = {}
    if not args.skip_memory:
        if device.type == "cuda":  # the CUDA allocator's own peak statistic is exact in-process
            meter = PeakMemory(device)
            for m, fn in methods.items():
                memory[m] = meter.measure(fn)
            for key in ckpt_keys:
                memory["ckpt" + json.dumps(key)] = meter.measure(build_ckpt_row(key, device))
        else:
            # CPU: every batched row alone in a fresh process (its first call measured); the rest, each far smaller,
            # in one process, warm-up before each. The loop and peer rows hold one task's graph at a time, so their
            # peak does not depend on the meta-batch: measured on 4 tasks (32 gives the same within 5 MiB).
            for m in methods:
                if m.endswith("batched"):
                    memory.update(measure_in_subprocess(args, [m], args.meta_batch))
            small = ["ckpt" + json.dumps(k) for k in sorted(ckpt_keys, key=lambda k: (-k[0], -k[3], k[4]))]
            small += [m for m in methods if not m.endswith("batched")]
            memory.update(measure_in_subprocess(args, small, min(4, args.meta_batch)))

    peer = max(rate["maml higher"], rate["maml torchopt"])
    peer_name = "higher" if rate["maml higher"] >= rate["maml torchopt"] else "torchopt"
    print(f"\n{'method':<16}{'tasks/s':>9}{'ms/task':>9}{'peak MiB':>10}  ratio   (peak: above the process's "
          f"level before the call; loop rows hold one task at a time, batched rows all {args.meta_batch})")
    for m in methods:
        mem = memory.get(m)
        mem_s = f"{mem:10.1f}" if mem is not None else f"{'n/a':>10}"
        note = f"{rate[m] / peer:5.2f}x vs {peer_name} (best peer)" if m.startswith("maml") else ""
        if m.endswith("batched"):
            loop = m.replace("batched", "loop")
            note = (note + "; " if note else "") + f"{rate[m] / rate[loop]:5.2f}x vs its loop"
        print(f"{m:<16}{rate[m]:9.2f}{1000 / rate[m]:9.1f}{mem_s}  {note}")
    best_ours = max(rate["maml loop"], rate["maml batched"])
    print(f"\nfastest second-order MAML (ours) / faster of higher, TorchOpt: {best_ours / peer:.2f}x "
          f"(target >= 1.0x); batched / loop for MAML: {rate['maml batched'] / rate['maml loop']:.2f}x "
          f"(target >= 2x on a GPU)")

    if not args.skip_memory:
        for ways, shots, queries in CKPT_SHAPES:
            print(f"\n# second-order MAML, one {ways}-way {shots}-shot task ({ways * shots} support, "
                  f"{ways * queries} query images): peak memory of the meta-gradient by inner steps")
            print(f"{'inner steps':<12}{'plain MiB':>10}{'checkpointed MiB':>18}{'saved':>8}{'time x':>8}")
            for steps in CKPT_STEPS:
                k0, k1 = (ways, shots, queries, steps, 0), (ways, shots, queries, steps, 1)
                m0, m1 = memory.get("ckpt" + json.dumps(k0)), memory.get("ckpt" + json.dumps(k1))
                saved = f"{1 - m1 / m0:7.0%}" if m0 and m1 is not None else "    n/a"
                print(f"{steps:<12}{m0 or 0:10.1f}{m1 or 0:18.1f}{saved:>8}{ckpt_time[k1] / ckpt_time[k0]:8.2f}")

    if args.profile:
        from torch.profiler import profile

        for m in ("maml loop", "maml higher"):
            with profile() as prof:
                methods[m]()
            print(f"\n# profile: {m}, one meta-batch")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
