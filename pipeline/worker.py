"""The task worker's logic, free of Ray: rebuild episodes from (seed, step, slot) and compute meta-gradients.

A worker holds the task store (loaded once per process), the model (architecture only) and the samplers. Given the
weights of some version and a list of slots, it rebuilds exactly the episodes any other worker would, runs the
algorithm and returns the *sum* of the tasks' meta-gradients with the task count, so the parameter server can
average contributions of any size. Because episodes are pure functions of their key, a slot lost with a dead worker
is recomputed elsewhere with an identical result.

    core = TaskWorkerCore(cfg, worker_id=0)
    meta, grads = core.compute(step=1, version=0, weights=weights, blocks=[[0, 1], [2, 3]])
    rows = core.evaluate(weights, "test", step=0, slots=range(600))      # per-task accuracy/loss
"""

from __future__ import annotations

import os
import time

import torch

from pipeline.algorithms import get_algorithm, meta_gradient_tasks
from pipeline.components import build_model, build_sampler, image_shape, open_store
from pipeline.config import Config

Params = dict[str, torch.Tensor]


def pick_device(gpus: float) -> torch.device:
    """The worker's device: its GPU when Ray gave it a share of one, else the CPU."""
    if gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the worker's GPU
    return torch.device("cpu")


class TaskWorkerCore:
    """Episodes + model + algorithm for one worker process."""

    def __init__(self, cfg: Config, worker_id: int = 0, device: torch.device | str | None = None):
        self.cfg = cfg
        self.worker_id = worker_id
        torch.set_num_threads(cfg.workers.torch_threads)
        self.device = torch.device(device) if device is not None else pick_device(cfg.workers.gpus)
        self.store = open_store(cfg)
        if self.store is not None and self.device.type == "cuda":
            # The whole store fits on the GPU (25 MB for Omniglot 28x28): episodes are then gathered there.
            object.__setattr__(self.store, "images", self.store.images.to(self.device))
        self.model = build_model(cfg, image_shape(cfg)).to(self.device)
        self.algorithm = get_algorithm(cfg.algorithm.name)
        self.samplers = {}

    def sampler(self, split: str):
        if split not in self.samplers:
            self.samplers[split] = build_sampler(self.cfg, self.store, split)
        return self.samplers[split]

    def _params(self, weights: Params) -> Params:
        return {k: v.to(self.device, torch.float32).detach().clone().requires_grad_(True) for k, v in weights.items()}

    def compute(self, step: int, version: int, weights: Params, blocks: list[list[int]]) -> tuple[dict, list[Params]]:
        """Meta-gradients of the training episodes (train.seed, step, slot), summed per block of slots.

        ``blocks`` is a list of slot lists; each block's gradients are summed in slot order. Returning blocks rather
        than one sum per worker lets the parameter server add the same partial sums in the same order however the
        blocks were spread over workers, so a sync run's parameters do not depend on the worker count bit for bit.
        Returns (meta, grads): meta holds worker, step, version, blocks, n_tasks, task-mean metrics and timings;
        grads maps each key of ``weights`` to a CPU float32 tensor of shape ``(len(blocks), *param.shape)``, block
        ``i``'s sum at index ``i`` (the packed form ``ParameterServerCore.apply_gradients`` accepts).
        """
        t0 = time.perf_counter()
        sampler = self.sampler("train")
        params = self._params(weights)
        sample_s, grads, metric_sums, n_total = 0.0, [], {}, 0
        for block in blocks:
            ts = time.perf_counter()
            episodes = [sampler.episode(step, s).to(self.device) for s in block]
            sample_s += time.perf_counter() - ts
            # batched=None: algorithm.task_batching decides (auto = per-task loop on CPU, vmap on GPU).
            g, n, metrics = meta_gradient_tasks(params, episodes, self.cfg.algorithm, self.model, batched=None)
            grads.append({k: v.detach().to("cpu", torch.float32) for k, v in g.items()})
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v) * n
            n_total += n
        meta = {"worker": self.worker_id, "pid": os.getpid(), "step": step, "version": version,
                "blocks": [list(b) for b in blocks], "n_tasks": n_total,
                "metrics": {k: v / n_total for k, v in metric_sums.items()},
                "sample_s": sample_s, "compute_s": time.perf_counter() - t0 - sample_s}
        # Packed: one tensor per parameter with the blocks along dim 0. Ray then moves 17 buffers instead of
        # 17 x blocks small tensors, which measured as most of the parameter server's share of a step.
        return meta, {k: torch.stack([g[k] for g in grads]) for k in grads[0]}

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
