"""The task worker's logic, free of Ray: rebuild episodes from (seed, step, slot) and compute meta-gradients.

A worker holds the task store (loaded once per process), the model (architecture only) and the samplers. Given the
weights of some version and a list of slots, it rebuilds exactly the episodes any other worker would, runs the
algorithm and returns the *sum* of the tasks' meta-gradients with the task count, so the parameter server can
average contributions of any size. Because episodes are pure functions of their key, a slot lost with a dead worker
is recomputed elsewhere with an identical result.

    core = TaskWorkerCore(cfg, worker_id=0)
    meta, grads = core.compute(step=1, version=0, weights=weights, blocks=[[0, 1], [2, 3]])  # the whole tree
    meta, grads = core.compute(1, 0, weights, blocks=[[4, 5], [6, 7]], tree=(2, 4))  # leaves 2-3 of a tree of 4
    rows = core.evaluate(weights, "test", step=0, slots=range(600))      # per-task accuracy/loss
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import time

import torch

from metatrain.pipeline.algorithms import get_algorithm, meta_gradient_tasks
from metatrain.pipeline.components import build_model, build_sampler, image_shape, open_store
from metatrain.pipeline.config import Config
from metatrain.pipeline.distributed.gradient_tree import cover, tree_sums

Params = dict[str, torch.Tensor]


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc malloc keep freed memory for reuse instead of handing it back to the kernel; False if not glibc.

    Why: every task allocates and frees the same activations. glibc serves blocks above its (dynamic) mmap
    threshold with fresh ``mmap`` pages and trims the heap top on free, so each task pays for page faults and page
    zeroing again: measured on this project's 2-core VM, 1.6 s of kernel time in 7.6 s of one worker's FOMAML
    compute (~1M minor faults), and worse with two workers faulting at once. Raising the mmap threshold to its
    maximum (32 MiB) and the trim threshold to 1 GiB makes that 0.01 s: the process keeps its peak RSS, as the
    CUDA caching allocator does on a GPU. (Setting only one of the two disables glibc's adaptive threshold and
    is much slower.)
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))


def pick_device(gpus: float) -> torch.device:
    """The worker's device: its GPU when Ray gave it a share of one, else the CPU."""
    if gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the worker's GPU
    return torch.device("cpu")


def place_store(store, device: torch.device):
    """The store with its images on ``device`` (a GPU: episodes are then gathered there); a CPU store as it is.

    A copy, never the store itself: ``TaskStore.open`` caches one instance per process, which other users in the
    process (a CPU worker core, the evaluation) must keep seeing on the CPU.
    """
    if store is None or device.type != "cuda":
        return store
    # The whole store fits on the GPU (25 MB for Omniglot 28x28).
    return dataclasses.replace(store, images=store.images.to(device))


class TaskWorkerCore:
    """Episodes + model + algorithm for one worker process."""

    def __init__(self, cfg: Config, worker_id: int = 0, device: torch.device | str | None = None):
        self.cfg = cfg
        self.worker_id = worker_id
        torch.set_num_threads(cfg.workers.torch_threads)
        if cfg.workers.keep_freed_memory:
            keep_freed_memory()
        self.device = torch.device(device) if device is not None else pick_device(cfg.workers.gpus)
        if self.device.type == "cuda":
            # A task is a pure function of (seed, step, slot), and so must its gradient be: by default cuDNN may
            # pick convolution-gradient algorithms that sum in a run-dependent order. On an H200, five calls on the
            # same weights and slots gave different gradients in 14 of MAML's 14 tensors (loop), 9 of 12 of
            # Matching's; deterministic, none, at -6% to +21% per call (bench/gpu_determinism.py). Process-wide, and a
            # worker owns its process.
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        self.store = place_store(open_store(cfg), self.device)
        self.model = build_model(cfg, image_shape(cfg)).to(self.device)
        self.algorithm = get_algorithm(cfg.algorithm.name)
        self.samplers = {}

    def sampler(self, split: str):
        if split not in self.samplers:
            self.samplers[split] = build_sampler(self.cfg, self.store, split)
        return self.samplers[split]

    def _params(self, weights: Params) -> Params:
        return {k: v.to(self.device, torch.float32).detach().clone().requires_grad_(True) for k, v in weights.items()}

    def compute(self, step: int, version: int, weights: Params, blocks: list[list[int]],
                tree: tuple[int, int] | None = None) -> tuple[dict, Params]:
        """Meta-gradients of the training episodes (train.seed, step, slot), reduced over a fixed tree of blocks.

        ``blocks`` is a list of slot lists, the leaves ``first .. first + len(blocks) - 1`` of the step's reduction
        tree over ``n`` leaves (``tree = (first, n)``; default: these blocks are the whole tree). Each block's
        gradients are summed in slot order; the blocks are then added along ``pipeline.gradient_tree``'s fixed tree
        up to the maximal nodes inside this worker's range, so the parameter server, finishing the same tree, gets
        the same float32 sum however the blocks were spread over workers, while receiving one or two gradients per
        worker instead of one per block.
        Returns (meta, grads): meta holds worker, step, version, blocks, n_tasks, ``tree`` (``leaves``, ``nodes``),
        task-mean metrics and timings; grads maps each key of ``weights`` to a CPU float32 tensor of shape
        ``(len(nodes), *param.shape)``, node ``i``'s sum at index ``i`` (the packed form the server accepts).
        """
        t0 = time.perf_counter()
        first, n = tree if tree is not None else (0, len(blocks))
        nodes = cover(first, len(blocks), n)
        sampler = self.sampler("train")
        params = self._params(weights)
        sample_s, metric_sums, n_total = 0.0, {}, 0

        def leaf(i: int) -> Params:
            nonlocal sample_s, n_total
            ts = time.perf_counter()
            episodes = [sampler.episode(step, s).to(self.device) for s in blocks[i - first]]
            sample_s += time.perf_counter() - ts
            # batched=None: algorithm.task_batching decides (auto = per-task loop on CPU, vmap on GPU).
            g, count, metrics = meta_gradient_tasks(params, episodes, self.cfg.algorithm, self.model, batched=None)
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v) * count
            n_total += count
            return {k: v.detach().to("cpu", torch.float32) for k, v in g.items()}

        sums = tree_sums(nodes, n, leaf)
        meta = {"worker": self.worker_id, "pid": os.getpid(), "step": step, "version": version,
                "blocks": [list(b) for b in blocks], "n_tasks": n_total,
                "tree": {"leaves": n, "nodes": [list(node) for node in nodes]},
                "metrics": {k: v / n_total for k, v in metric_sums.items()},
                "sample_s": sample_s, "compute_s": time.perf_counter() - t0 - sample_s}
        # Packed: one tensor per parameter with the nodes along dim 0, so Ray moves one buffer per parameter.
        return meta, {k: torch.stack([g[k] for g in sums]) for k in sums[0]}

    def evaluate(self, weights: Params, split: str, step: int, slots) -> list[dict]:
        """Adapt to each held-out episode (eval_inner_steps) and score its queries; one dict per task."""
        sampler = self.sampler(split)
        params = self._params(weights)
        rows = []
        for slot in slots:
            ep = sampler.episode(step, slot).to(self.device)
            metrics = self.algorithm.evaluate(params, ep, self.cfg.algorithm, self.model)
            rows.append({"step": step, "slot": int(slot), **{k: float(v) for k, v in metrics.items()}})
        return rows
