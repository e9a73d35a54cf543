"""The parameter server's logic, free of Ray: meta-parameters, the outer optimizer, validation, checkpoints.

``ParameterServerCore`` owns the meta-parameters (model weights plus any learned inner-loop rates), the outer
optimizer and a version counter (= applied steps). Workers send *contributions*: sums of their tasks'
meta-gradients, one per node of the step's fixed reduction tree over its blocks of slots (``pipeline.gradient_tree``;
or one per block), plus how many tasks went in. ``apply_gradients(step, metas, grads)`` checks each contribution
(same keys and shapes as the parameters, finite, computed on recent-enough weights, no block sent twice), finishes
the tree (the same additions in the same order however the blocks were spread over workers), divides by the task
count, and takes exactly one optimizer step. A step id at or below the last applied
one is refused, so a call retried after a timeout or a driver restart never applies twice. Every
``checkpoint_every`` steps it checkpoints itself atomically, and its constructor restores the newest checkpoint: a
parameter server restarted by Ray resumes where it stopped.

The Ray actor in ``pipeline/actors.py`` is a thin shell around this class; tests drive it directly.

    core = ParameterServerCore(initial_params, optim_cfg, total_steps=1000, checkpoint_dir="out/checkpoints",
                               checkpoint_every=100, fingerprint=fp, config=cfg.to_dict())
    version, weights = core.get_weights()
    meta = {"worker": 0, "step": 1, "version": 0, "blocks": [[0, 1], [2, 3]], "n_tasks": 4}
    result = core.apply_gradients(1, [meta], [[grads_of_slots_0_1, grads_of_slots_2_3]])
    # or packed tree nodes, as TaskWorkerCore.compute sends them: meta["tree"] = {"leaves": 2, "nodes": [[0, 2]]}
    # and {name: tensor of shape (1, *param.shape)}
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from metatrain.pipeline.checkpoint import (
    checkpoint_state,
    load_latest,
    restore_rng,
    save_checkpoint,
    save_named,
)
from metatrain.pipeline.config import OptimConfig
from metatrain.pipeline.distributed.gradient_tree import combine, is_node, leaves_of

Params = dict[str, torch.Tensor]


def learning_rate(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """The outer learning rate at (1-based) ``step``: linear warm-up, then constant / cosine / step decay."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    t = step - cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, t / span)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if cfg.schedule == "step":
        return cfg.lr * cfg.min_lr_ratio ** (t // cfg.step_every)
    return cfg.lr


def make_optimizer(cfg: OptimConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@dataclass
class Rejection:
    """A contribution that was not applied, and why."""

    worker: int
    step: int
    reason: str

    def __str__(self) -> str:
        return f"worker {self.worker}, step {self.step}: {self.reason}"


class ParameterServerCore:
    """Meta-parameters + outer optimizer + version; see the module docstring."""

    def __init__(self, params: Params, optim: OptimConfig, *, total_steps: int, checkpoint_dir: str | Path | None,
                 checkpoint_every: int, keep_checkpoints: int = 3, fingerprint: str = "", config: dict | None = None,
                 max_staleness: int | None = None, buffers: Params | None = None):
        # Own copies: float32 leaves on the CPU, whatever the caller passed.
        self.params = {k: v.detach().to("cpu", torch.float32).clone().requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: v.detach().cpu().clone() for k, v in (buffers or {}).items()}
        self.optim_cfg = optim
        self.total_steps = total_steps
        self.optimizer = make_optimizer(optim, list(self.params.values()))
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.fingerprint = fingerprint
        self.config = config or {}
        self.max_staleness = max_staleness  # None: sync mode, every contribution must be on the current version
        self.version = 0  # = the last applied step
        self.counters = {"rejected": 0, "stale_dropped": 0, "duplicates": 0}
        self.extra: dict = {}
        self.restored_from: str | None = None
        if self.checkpoint_dir is not None:
            state = load_latest(self.checkpoint_dir, expected_fingerprint=fingerprint or None)
            if state is not None:
                self.load_state(state)

    # ---- weights ------------------------------------------------------------------------------------------------

    def get_weights(self) -> tuple[int, Params]:
        """(version, CPU tensors). The tensors are fresh detached copies, safe to ship through the object store."""
        return self.version, {k: v.detach().clone() for k, v in self.params.items()}

    # ---- updates ------------------------------------------------------------------------------------------------

    def _check_block(self, grads, leading: tuple[int, ...] = ()) -> str | None:
        """Why one block's gradients (or, with ``leading``, a packed stack of blocks) are unusable, or None."""
        if not isinstance(grads, dict):
            return f"gradients are a {type(grads).__name__}, not a dict of tensors"
        missing, extra = sorted(self.params.keys() - grads.keys()), sorted(grads.keys() - self.params.keys())
        if missing or extra:
            return f"keys differ from the parameters (missing {missing[:3]}, unexpected {extra[:3]})"
        for name, p in self.params.items():
            g = grads[name]
            if not isinstance(g, torch.Tensor) or tuple(g.shape) != leading + tuple(p.shape):
                shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                return f"{name} has shape {shape}, parameter has {tuple(p.shape)}" + \
                    (f" (packed: {leading[0]} blocks first)" if leading else "")
            if not g.dtype.is_floating_point:
                return f"{name} has dtype {g.dtype}"
            if not bool(torch.isfinite(g).all()):
                return f"{name} has non-finite values"
        return None

    def _check(self, meta: dict, grads) -> str | None:
        """Why a contribution (gradient sums described by ``meta``, list or packed form) is unusable, or None.

        Two forms. Leaf form: one gradient per entry of ``meta['blocks']`` (the sum of that block's tasks). Tree
        form (what ``TaskWorkerCore.compute`` sends): ``meta['tree'] = {'leaves': n, 'nodes': [[start, size], ...]}``
        and one gradient per node of the step's reduction tree (``pipeline.gradient_tree``), the nodes covering
        exactly the contribution's blocks.
        """
        slots = meta.get("blocks")
        if not isinstance(slots, list) or not slots or not all(slots):
            return "meta['blocks'] must list the slots of each gradient block"
        n = meta.get("n_tasks")
        if not isinstance(n, int) or n < 1 or n != sum(len(b) for b in slots):
            return f"n_tasks must be the positive number of slots in its blocks, got {n!r}"
        entries = len(slots)
        tree = meta.get("tree")
        if tree is not None:
            leaves, nodes = (tree.get("leaves"), tree.get("nodes")) if isinstance(tree, dict) else (None, None)
            if not isinstance(leaves, int) or leaves < 1 or not isinstance(nodes, list) or not nodes or \
                    not all(is_node(node, leaves) for node in nodes):
                return f"meta['tree'] must give 'leaves' (>= 1) and the tree's 'nodes' as [start, size], got {tree!r}"
            covered = [i for node in nodes for i in leaves_of(tuple(node), leaves)]
            if len(covered) != len(slots) or covered != list(range(covered[0], covered[0] + len(covered))):
                return f"meta['tree'] nodes cover leaves {covered[:4]}..., not the {len(slots)} contiguous blocks sent"
            entries = len(nodes)
        if isinstance(grads, dict):
            # Packed: one tensor per parameter holding every entry along dim 0. Checked as a whole (one finiteness
            # test per parameter, not per entry), which is what keeps the apply cheap.
            first = next(iter(grads.values()), None)
            if not isinstance(first, torch.Tensor) or first.dim() == 0 or first.shape[0] != entries:
                what = "tree nodes" if tree is not None else "blocks"
                return f"packed gradients need {entries} {what} along dim 0 (one per entry of meta)"
            return self._check_block(grads, leading=(entries,))
        if not isinstance(grads, (list, tuple)) or not grads:
            return f"expected a non-empty list of gradient blocks, got {type(grads).__name__}"
        if entries != len(grads):
            return "meta['blocks'] must list the slots of each gradient block" if tree is None else \
                f"{len(grads)} gradients for {entries} tree nodes"
        for b in grads:
            why = self._check_block(b)
            if why is not None:
                return why
        return None

    @staticmethod
    def _unpack(blocks) -> list[Params]:
        """A contribution's entries as a list of dicts (views into a packed contribution; no copy)."""
        if isinstance(blocks, dict):
            count = next(iter(blocks.values())).shape[0]
            return [{k: v[i] for k, v in blocks.items()} for i in range(count)]
        return list(blocks)

    @staticmethod
    def _tree_of(accepted: list[tuple[dict, object]]) -> tuple[dict, int] | str:
        """The step's reduction-tree nodes {(start, size): grads} and leaf count, or why they do not fit together.

        Leaf-form contributions become leaves ranked by their first slot; tree-form ones bring their own nodes.
        """
        trees = [m.get("tree") is not None for m, _ in accepted]
        if all(trees):
            n = accepted[0][0]["tree"]["leaves"]
            if any(m["tree"]["leaves"] != n for m, _ in accepted):
                return "contributions disagree on the step's number of gradient blocks"
            return {tuple(node): g for m, gs in accepted
                    for node, g in zip(m["tree"]["nodes"], ParameterServerCore._unpack(gs))}, n
        if any(trees):
            return "a step's contributions must all be tree-form or all leaf-form"
        leaves = sorted(((meta["blocks"][i][0], g) for meta, gs in accepted
                         for i, g in enumerate(ParameterServerCore._unpack(gs))), key=lambda item: item[0])
        return {(i, 1): g for i, (_, g) in enumerate(leaves)}, len(leaves)

    def apply_gradients(self, step: int, metas: list[dict], grads: list[list[Params] | Params]) -> dict:
        """Validate, average (weighted by task count) and apply one optimizer step as ``step``; see module docstring.

        Returns what happened: ``applied``, ``version``, ``rejected`` (list of strings), ``stale_dropped``,
        ``staleness`` (per accepted contribution), ``tasks``, ``lr``, ``grad_norm``, ``apply_s`` and the counters.
        """
        t0 = time.perf_counter()
        out = {"step": step, "applied": False, "rejected": [], "stale_dropped": 0, "staleness": [], "tasks": 0}
        if step <= self.version:
            self.counters["duplicates"] += 1
            out.update(reason=f"step {step} was already applied (version {self.version})", version=self.version,
                       counters=dict(self.counters))
            return out
        accepted = []
        for meta, g in zip(metas, grads):
            staleness = self.version - int(meta.get("version", -1))
            limit = 0 if self.max_staleness is None else self.max_staleness
            if staleness < 0 or staleness > limit:
                if self.max_staleness is None or staleness < 0:
                    why = f"computed on weights version {meta.get('version')}, current is {self.version}"
                    out["rejected"].append(str(Rejection(meta.get("worker", -1), step, why)))
                    self.counters["rejected"] += 1
                else:
                    out["stale_dropped"] += 1
                    self.counters["stale_dropped"] += 1
                continue
            why = self._check(meta, g)
            if why is not None:
                out["rejected"].append(str(Rejection(meta.get("worker", -1), step, why)))
                self.counters["rejected"] += 1
                continue
            accepted.append((meta, g))
            out["staleness"].append(staleness)
        if not accepted:
            out.update(reason="no usable contribution", version=self.version, counters=dict(self.counters))
            return out

        # Contributions that claim a block another one already covered (a recomputed slot, a buggy worker) are
        # refused rather than counted twice.
        seen: dict[int, int] = {}
        kept = []
        for (meta, g), staleness in zip(accepted, list(out["staleness"])):
            tree = meta.get("tree")
            leaves = [i for node in tree["nodes"] for i in leaves_of(tuple(node), tree["leaves"])] if tree else \
                [b[0] for b in meta["blocks"]]
            clash = next((i for i in leaves if i in seen), None)
            if clash is not None:
                why = f"block {clash} was already sent by worker {seen[clash]}"
                out["rejected"].append(str(Rejection(meta.get("worker", -1), step, why)))
                self.counters["rejected"] += 1
                out["staleness"].remove(staleness)
                continue
            seen.update((i, meta.get("worker", -1)) for i in leaves)
            kept.append((meta, g))
        accepted = kept
        tree = self._tree_of(accepted)
        if isinstance(tree, str):
            out["rejected"].append(str(Rejection(-1, step, tree)))
            self.counters["rejected"] += 1
            out.update(reason=tree, version=self.version, counters=dict(self.counters))
            return out
        # Mean over tasks: every node is a sum over its tasks, so finish the step's fixed reduction tree and divide
        # once. The tree, not the arrival order or the split over workers, fixes every float32 addition: a sync
        # step's gradient is then the same for 1 or 16 workers (Adam would otherwise amplify the rounding
        # differences in gradients that are ~0, such as a conv bias followed by batch norm).
        nodes, n_leaves = tree
        summed = combine({k: {name: g[name].to(torch.float32) for name in self.params} for k, g in nodes.items()},
                         n_leaves)
        tasks = sum(m["n_tasks"] for m, _ in accepted)
        lr = learning_rate(self.optim_cfg, step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            for name, p in self.params.items():
                p.grad = summed[name].clone().div_(tasks)
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()),
                                              self.optim_cfg.clip_norm if self.optim_cfg.clip_norm else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version = step
        out.update(applied=True, version=self.version, tasks=tasks, lr=lr, grad_norm=float(norm),
                   counters=dict(self.counters))
        if self.checkpoint_dir is not None and step % self.checkpoint_every == 0:
            self.checkpoint()
        out["apply_s"] = time.perf_counter() - t0
        return out

    # ---- checkpoints --------------------------------------------------------------------------------------------

    def state(self) -> dict:
        # No scheduler state: the schedule is a pure function of the step (learning_rate).
        return checkpoint_state({k: v.detach().clone() for k, v in self.params.items()},
                                {k: v.clone() for k, v in self.buffers.items()}, self.optimizer.state_dict(),
                                step=self.version, fingerprint=self.fingerprint, config=self.config,
                                extra={**self.extra, "counters": dict(self.counters)})

    def load_state(self, state: dict) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state["params"][k])
        for k in self.buffers:
            if k in state.get("buffers", {}):
                self.buffers[k] = state["buffers"][k].clone()
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["step"])
        self.extra = dict(state.get("extra") or {})
        self.counters.update(self.extra.pop("counters", {}))
        if state.get("rng"):
            restore_rng(state["rng"])
        self.restored_from = f"step {self.version}"

    def checkpoint(self, name: str | None = None) -> str | None:
        """Write a periodic checkpoint (``name=None``) or a named one (``best``, ``final``); return its path."""
        if self.checkpoint_dir is None:
            return None
        if name is None:
            return str(save_checkpoint(self.checkpoint_dir, self.state(), keep=self.keep_checkpoints))
        return str(save_named(self.checkpoint_dir, f"{name}.pt", self.state()))

    def set_extra(self, **values) -> None:
        """Small facts stored in the next checkpoints (best validation accuracy, MLflow run id, ...)."""
        self.extra.update(values)
