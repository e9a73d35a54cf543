"""End-to-end training throughput at 1 worker: the whole pipeline through Ray against plain PyTorch, higher, TorchOpt.

    python bench/throughput.py                       # maml, fomaml, reptile, protonet; about 6 minutes on 2 cores
    python bench/throughput.py --algos maml --steps 8 --rounds 3
    python bench/throughput.py --algos snail --steps 2 --rounds 1
    python bench/throughput.py --algos metanet --meta-batch 4 --steps 2 --rounds 2 --batched-steps 1
    python bench/throughput.py --device cuda         # the same table on a GPU (worker and peers on cuda:0)

For each algorithm, Omniglot 5-way 1-shot 15 queries (real episodes from the prepared store), meta-batch 32, one
torch thread, the algorithm's own config otherwise (inner steps and rates from configs/omniglot_<algo>_5w1s.yaml):

- ours, through Ray: a training step as ``Trainer.run`` does it (parameter server's weights, one TaskWorker sampling
  its 32 episodes and computing their meta-gradients, the server's Adam/SGD update), with the per-task loop and with
  the batched path (``algorithm.task_batching``);
- plain PyTorch: one process, no Ray, no parameter server; the same episodes from the same sampler, the same Conv4
  module called directly (``torch.func.functional_call`` only where fast weights need it), ``torch.autograd``
  and ``torch.optim`` by hand: what a user would write for one machine;
- higher and TorchOpt (second-order MAML; higher also for first-order MAML), in that same process, each with the
  same sampling and optimizer step around it.

The plain process runs with the allocator setting the workers use (``workers.keep_freed_memory``), so that the ratio
is what Ray, the parameter server and our functional algorithms cost, not glibc's. Phases alternate round by round
(ours, then the peers) so that a change of load hits all rows alike; each cell is the median step time over the
rounds. Target: ours at 1 worker >= 0.95x the plain loop.

With ``--device cuda`` the worker holds the store and model on the GPU (``workers.gpus=1``), the peers put the
same store and model there too, and every timed step ends with the gradients back on the host (ours: the
parameter server's update on the CPU; peers: ``torch.cuda.synchronize``). The second-order MAML iterations/s
(meta-batch 32) are printed under the table: target >= 10 it/s on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import ray
import torch
import torch.nn.functional as F
from torch.func import functional_call

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
from algorithms import higher_maml, torchopt_maml  # noqa: E402
from scaling import sync_steps  # noqa: E402

from metatrain.pipeline.algorithms import get_record  # noqa: E402
from metatrain.pipeline.components import build_model, build_sampler, image_shape, open_store  # noqa: E402
from metatrain.pipeline.config import load_config  # noqa: E402
from metatrain.pipeline.distributed.engine import Engine  # noqa: E402

ALGOS = ("maml", "fomaml", "reptile", "protonet", "snail", "metanet")
PEERS = {"maml": ("plain", "higher", "torchopt"), "fomaml": ("plain", "higher"), "reptile": ("plain",),
         "protonet": ("plain",), "snail": ("plain",), "metanet": ("plain",)}


def bench_config(algo: str, args, batching: str = "loop"):
    """The algorithm's 5w1s config at 5w1s15q, meta-batch 32, one worker, no validation or checkpoints in the way."""
    gpus = "1" if args.device == "cuda" else "0"
    return load_config(f"configs/omniglot_{algo}_5w1s.yaml", [f"workers.gpus={gpus}",
        f"data.path={args.data}", "data.ways=5", "data.eval_ways=5", "data.shots=1", "data.queries=15",
        f"train.meta_batch={args.meta_batch}", "train.grad_blocks=1", "train.val_every=0",
        "train.checkpoint_every=1000000", "train.steps=1000000", "workers.count=1", "workers.torch_threads=1",
        f"algorithm.task_batching={batching}"])


# ----------------------------------------------------------------------------------------- plain PyTorch, by hand


def plain_step(algo: str, cfg, model: torch.nn.Module, opt: torch.optim.Optimizer, episodes) -> None:
    """One training step of ``algo`` the way a single-process PyTorch script would write it."""
    a = cfg.algorithm
    opt.zero_grad(set_to_none=False)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    n = len(episodes)
    if algo == "snail":  # a sequence model is written batched: every episode's sequences through the body at once
        plain_snail(model, episodes).backward()
        opt.step()
        return
    for ep in episodes:
        if algo in ("maml", "fomaml"):
            second = algo == "maml"
            fast = dict(zip(names, params))
            for _ in range(a.inner_steps):
                loss = F.cross_entropy(functional_call(model, fast, (ep.support_x,)), ep.support_y)
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second)
                fast = {k: w - a.inner_lr * g for (k, w), g in zip(fast.items(), grads)}
                if not second:
                    fast = {k: w.detach().requires_grad_() for k, w in fast.items()}
            loss = F.cross_entropy(functional_call(model, fast, (ep.query_x,)), ep.query_y) / n
            if second:
                loss.backward()
            else:  # first order: the query gradient at the adapted weights is the meta-gradient
                for p, g in zip(params, torch.autograd.grad(loss, list(fast.values()))):
                    p.grad.add_(g)
        elif algo == "reptile":
            inner = copy.deepcopy(model)
            inner_opt = torch.optim.Adam(inner.parameters(), lr=a.inner_lr, betas=tuple(a.reptile_adam_betas))
            x = torch.cat([ep.support_x, ep.query_x])
            y = torch.cat([ep.support_y, ep.query_y])
            order = torch.randperm(len(x))
            bs = a.reptile_batch_size or len(x)
            for i in range(a.inner_steps):
                idx = order[(i * bs) % len(x):(i * bs) % len(x) + bs]
                inner_opt.zero_grad()
                F.cross_entropy(inner(x[idx]), y[idx]).backward()
                inner_opt.step()
            for p, q in zip(params, inner.parameters()):
                p.grad.add_((p.detach() - q.detach()) / n)
        elif algo == "protonet":
            emb = model(torch.cat([ep.support_x, ep.query_x]))
            s, q = emb[:len(ep.support_x)], emb[len(ep.support_x):]
            protos = torch.stack([s[ep.support_y == c].mean(0) for c in range(int(ep.support_y.max()) + 1)])
            (F.cross_entropy(-torch.cdist(q, protos).square(), ep.query_y) / n).backward()
        elif algo == "metanet":  # the module's own episode forward (fast weights, memory read), no functional_call
            (F.cross_entropy(model.episode_logits(ep.support_x, ep.support_y, ep.query_x), ep.query_y) / n).backward()
    if cfg.optim.clip_norm:  # what the parameter server does before its update (metanet's configs: 10)
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_norm)
    opt.step()


def plain_snail(model, episodes) -> torch.Tensor:
    """SNAIL's loss on a meta-batch as one script would write it: each episode embedded (batch norm on its support),
    the support prefixes and queries stacked through the sequence body once; mean over queries, over episodes."""
    n = len(episodes[0].support_x)
    feats = torch.stack([model(torch.cat([ep.support_x, ep.query_x]), stats_rows=n) for ep in episodes])
    sy = torch.stack([ep.support_y for ep in episodes])
    logits = model.sequence_logits(feats[:, :n], sy, feats[:, n:])
    qy = torch.stack([ep.query_y for ep in episodes])
    return F.cross_entropy(logits.flatten(0, 1), qy.flatten())


def library_step(peer: str, algo: str, cfg, model, opt, episodes) -> None:
    """higher / TorchOpt computing the step's meta-gradient (their README patterns), then the same optimizer step."""
    opt.zero_grad(set_to_none=False)
    if peer == "torchopt":
        grads = torchopt_maml(model, episodes, cfg.algorithm.inner_lr)
    elif algo == "maml":
        grads = higher_maml(model, episodes, cfg.algorithm.inner_lr)
    else:
        grads = higher_fomaml(model, episodes, cfg.algorithm.inner_lr, cfg.algorithm.inner_steps)
    for p, g in zip(model.parameters(), grads):
        p.grad.add_(g / len(episodes))
    opt.step()


def higher_fomaml(model, episodes, lr: float, steps: int):
    """First-order MAML with higher: no graph through the inner loop; the query gradient at the adapted weights."""
    import higher

    inner = torch.optim.SGD(model.parameters(), lr=lr)
    total = [torch.zeros_like(p) for p in model.parameters()]
    for ep in episodes:
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False, track_higher_grads=False) as (fm, diff):
            for _ in range(steps):
                diff.step(F.cross_entropy(fm(ep.support_x), ep.support_y))
            fast = list(fm.parameters())
            loss = F.cross_entropy(fm(ep.query_x), ep.query_y)
            for t, g in zip(total, torch.autograd.grad(loss, fast)):
                t.add_(g)
    return total


def peer_rates(algo: str, args, steps: int, first_step: int) -> dict[str, list[float]]:
    """Step times of each peer of ``algo``, in this process (run in a spawned child: no Ray, its own allocator)."""
    from metatrain.pipeline.distributed.worker import keep_freed_memory, place_store

    torch.set_num_threads(1)
    keep_freed_memory()
    warnings.filterwarnings("ignore")
    cfg = bench_config(algo, args)
    device = torch.device(args.device)
    sampler = build_sampler(cfg, place_store(open_store(cfg), device), "train")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {}
    for peer in PEERS[algo]:
        torch.manual_seed(0)
        model = build_model(cfg, image_shape(cfg)).to(device)
        model.train()
        opt = (torch.optim.SGD(model.parameters(), lr=cfg.optim.lr) if cfg.optim.name == "sgd"
               else torch.optim.Adam(model.parameters(), lr=cfg.optim.lr))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        fn = plain_step if peer == "plain" else (lambda *a, peer=peer: library_step(peer, *a))
        times[peer] = []
        for s in range(first_step, first_step + steps + 1):
            t0 = time.perf_counter()
            episodes = [sampler.episode(s, slot).to(device) for slot in range(cfg.train.meta_batch)]
            fn(algo, cfg, model, opt, episodes)
            sync()
            if s > first_step:  # the first step warms up
                times[peer].append(time.perf_counter() - t0)
    return times


def _peer_child(algo, args, steps, first_step, queue) -> None:
    queue.put(peer_rates(algo, args, steps, first_step))


def run_peers(algo: str, args, steps: int, first_step: int) -> dict[str, list[float]]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peer_child, args=(algo, args, steps, first_step, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


# ------------------------------------------------------------------------------------------------------------ main


def ours(algo: str, args, batching: str, steps: int) -> list[float]:
    """Step times of the engine at one worker (PS weights -> worker compute -> PS update), after a warm-up step."""
    cfg = bench_config(algo, args, batching)
    with tempfile.TemporaryDirectory() as d:
        engine = Engine(cfg, d, log=lambda s: None)
        try:
            rows = sync_steps(engine, 1, "equal", steps + 1, cfg)
        finally:
            engine.shutdown()
    return [r["step_s"] for r in rows[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per row and round (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batched-steps", type=int, default=2, help="timed steps of the batched path (slow on a CPU)")
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--data", default="data/omniglot")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device on this machine")
    gpu = args.device == "cuda"
    defaults = {a: "batched" if gpu or get_record(a).auto_batched else "loop" for a in args.algos}
    ray.init(num_cpus=2, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False)
    where = f"{torch.cuda.get_device_name(0)}, " if gpu else ""
    print(f"{where}{platform.machine()}, {os.cpu_count()} cores (Ray given 2); torch {torch.__version__}, "
          f"ray {ray.__version__}; Omniglot 5w1s15q, "
          f"meta-batch {args.meta_batch}, 1 torch thread, 1 worker; median step over {args.rounds} rounds x "
          f"{args.steps} steps (batched: {args.batched_steps}); tasks/s = meta-batch / step s")
    print()
    print("| algorithm | ours via Ray, loop | ours via Ray, batched | plain PyTorch | higher | TorchOpt | "
          "ours (auto) / plain | ours (auto) / best library |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for algo in args.algos:
        default = defaults[algo]  # what algorithm.task_batching=auto picks for it on this device
        times: dict[str, list[float]] = {}
        for r in range(args.rounds):
            times.setdefault("loop", []).extend(ours(algo, args, "loop", args.steps))
            # Each round samples new steps: the same (seed, step, slot) episodes are not re-timed warm.
            for peer, ts in run_peers(algo, args, args.steps, 1000 * (r + 1)).items():
                times.setdefault(peer, []).extend(ts)
            if r == 0:
                times["batched"] = ours(algo, args, "batched", args.batched_steps)
        rate = {k: args.meta_batch / statistics.median(v) for k, v in times.items()}
        libs = [rate[k] for k in ("higher", "torchopt") if k in rate]
        cells = [f"{rate[k]:.2f}" if k in rate else "-" for k in ("loop", "batched", "plain", "higher", "torchopt")]
        best = f"{rate[default] / max(libs):.2f}x" if libs else "-"
        print(f"| {algo} | {' | '.join(cells)} | {rate[default] / rate['plain']:.2f}x ({default}) | {best} |",
              flush=True)
        if algo == "maml":
            maml_its = {k: rate[k] / args.meta_batch for k in ("loop", "batched")}
    ray.shutdown()
    print()
    print(f"tasks/s; target: ours via Ray (the {args.device} default of algorithm.task_batching=auto, in brackets) "
          ">= 0.95x plain PyTorch")
    if "maml" in args.algos:
        print(f"second-order MAML, meta-batch {args.meta_batch}: {maml_its['loop']:.2f} it/s (loop), "
              f"{maml_its['batched']:.2f} it/s (batched){'; target on a GPU >= 10 it/s' if gpu else ''}")


if __name__ == "__main__":
    main()
