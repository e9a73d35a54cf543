"""Reptile (Nichol, Achiam & Schulman 2018): train on the task, then move the initialisation towards the result.

The inner loop takes ``cfg.inner_steps`` steps of plain SGD or Adam (``cfg.reptile_optimizer``; Adam's state
starts fresh on every task, so with bias correction its first step moves every weight by ~``inner_lr`` whatever
its gradient's size. The authors' code restores only the model's variables between tasks: their Adam moments and
step count run on across all tasks, a long-run RMS per weight; not reproduced here, where a task is a pure function
of its key) on the task's data, the support and query sets together. Each step uses all of it, or
with ``reptile_batch_size`` the next that many examples of the data in a fixed order (shuffled by a generator
seeded from the episode key, so a task's minibatches are reproducible and identical in both execution modes).
Nothing is differentiated through the loop.

Training metrics are the inner loop's own, at no extra cost: ``support_*`` scores the first inner minibatch before
any step (what the initialisation does on the task's data), ``query_*`` the last minibatch, before the last step.
Scoring the whole support set before and the whole query set after adaptation instead took two more forward passes
over all 80 images of a 5w1s15q task against the loop's 5 x 10: 0.55x a plain PyTorch Reptile loop end to end
(``bench/throughput.py``). The adapted model's score on unseen queries is what :func:`evaluate` (``val/acc``,
``eval.json``) measures.

The meta-"gradient" is ``params - adapted``: handed to the parameter server's outer optimiser like any gradient,
plain SGD with learning rate ``eps`` gives Reptile's update ``params += eps * (adapted - params)``. With one
full-batch SGD step it is ``inner_lr * grad(loss on support+query)``. (Nichol et al.'s ``g_Reptile`` in their
analysis is this divided by ``inner_lr``.)

    >>> from metatrain.pipeline.algorithms import AlgorithmConfig, reptile
    >>> cfg = AlgorithmConfig(name="reptile", inner_lr=1e-3, inner_steps=5, eval_inner_steps=50,
    ...                       reptile_optimizer="adam", reptile_batch_size=10)
    >>> grads, metrics = reptile.meta_gradient(params, episode, cfg, model)   # params - adapted
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from metatrain.models.layers import has_batch_norm
from metatrain.tasks.episode import Episode
from torch import nn

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.errors import AlgorithmConfigError
from metatrain.pipeline.algorithms.gradient.inner_loop import (
    Functional,
    Key,
    Metrics,
    Params,
    TaskBatch,
    as_batch,
    check_finite,
    check_labels,
    check_model,
    is_classification,
    key_seed,
    support_only,
    task_metrics,
    with_diagnosis,
)
from metatrain.pipeline.algorithms.record import GRADIENT_METRICS, AlgorithmRecord

RECORD = AlgorithmRecord(
    name="reptile", family="gradient", models=("conv4", "mlp"), predict="adapt", adapts_weights=True,
    forbidden=(("multi_step_loss", "reptile has no query loss per step; use it with maml-like algorithms"),),
    metrics=GRADIENT_METRICS, reads_query_bn=True)
NAME = RECORD.name
ADAM_EPS = 1e-8


def init_extra_params(model: nn.Module, cfg: AlgorithmConfig) -> Params:  # noqa: ARG001 - uniform interface
    """Reptile learns nothing beyond the model's parameters."""
    return {}


def _minibatch_index(batch: TaskBatch, n: int, steps: int, cfg: AlgorithmConfig) -> list[torch.Tensor] | None:
    """Per step, which of the ``n`` examples to use (``(bs,)`` or ``(T, bs)``); None = all of them every step."""
    bs = cfg.reptile_batch_size
    if bs == 0 or bs >= n:  # a full batch: order does not change the mean loss or the batch statistics
        return None
    orders = []
    for key in batch.keys:
        if cfg.reptile_shuffle:
            # CPU generator seeded by the key: the same order on every device, in the loop and the batched path.
            orders.append(torch.randperm(n, generator=torch.Generator().manual_seed(key_seed(key))))
        else:
            orders.append(torch.arange(n))
    order = torch.stack(orders).to(batch.support_x.device)
    picks = [order[:, (s * bs + torch.arange(bs, device=order.device)) % n] for s in range(steps)]
    return picks if batch.batched else [p[0] for p in picks]


def _take(x: torch.Tensor, idx: torch.Tensor | None, batched: bool) -> torch.Tensor:
    if idx is None:
        return x
    if not batched:
        return x[idx]
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


def _train(params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, cfg: AlgorithmConfig, fn: Functional,
           batch: TaskBatch, check_steps: bool = True, seen: list | None = None) -> Params:
    """``steps`` optimiser steps on (x, y); returns the detached adapted parameters (task dim when batched).

    ``seen``, when given, receives ``(loss, outputs, labels)`` (detached) of the first and the last step's minibatch.
    """
    keys = list(params)
    n_examples = int(x.shape[1] if batch.batched else x.shape[0])
    picks = _minibatch_index(batch, n_examples, steps, cfg)
    t = batch.n_tasks
    fast = {k: (v.detach().expand(t, *v.shape) if batch.batched else v.detach()) for k, v in params.items()}
    task_keys = frozenset(keys) if batch.batched else frozenset()
    adam = cfg.reptile_optimizer == "adam"
    beta1, beta2 = cfg.reptile_adam_betas
    m = {k: torch.zeros_like(v) for k, v in fast.items()} if adam else {}
    v2 = {k: torch.zeros_like(v) for k, v in fast.items()} if adam else {}
    for s in range(steps):
        idx = None if picks is None else picks[s]
        xb, yb = _take(x, idx, batch.batched), _take(y, idx, batch.batched)
        with torch.enable_grad():
            leaf = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
            out = fn.outputs(leaf, xb, s, task_keys)
            loss = fn.loss(out, yb)
            grads = torch.autograd.grad(loss.sum(), [leaf[k] for k in keys])
        if seen is not None and s in (0, steps - 1):
            seen.append((loss.detach(), out.detach(), yb))
        if cfg.check_finite and check_steps:
            check_finite(NAME, f"inner step {s}", keys, grads, batch, per_task=True)
        with torch.no_grad():
            for k, g in zip(keys, grads):
                if adam:
                    m[k] = beta1 * m[k] + (1 - beta1) * g
                    v2[k] = beta2 * v2[k] + (1 - beta2) * g * g
                    m_hat = m[k] / (1 - beta1 ** (s + 1))
                    v_hat = v2[k] / (1 - beta2 ** (s + 1))
                    fast[k] = fast[k] - cfg.inner_lr * m_hat / (v_hat.sqrt() + ADAM_EPS)
                else:
                    fast[k] = fast[k] - cfg.inner_lr * g
    return fast


def _concat(a: torch.Tensor, b: torch.Tensor, batched: bool) -> torch.Tensor:
    return torch.cat([a, b], dim=1 if batched else 0)


def _meta_gradient(params: Params, batch: TaskBatch, cfg: AlgorithmConfig, model: nn.Module) -> tuple[Params, Metrics]:
    # Only the result is checked on the happy path; a non-finite one re-runs with every step checked.
    return with_diagnosis(lambda diagnose: _reptile_gradient(params, batch, cfg, model, diagnose))


def _reptile_gradient(params: Params, batch: TaskBatch, cfg: AlgorithmConfig, model: nn.Module,
                      diagnose: bool) -> tuple[Params, Metrics]:
    check_model(model, cfg, params, cfg.inner_steps)
    check_labels(model, params, batch)
    fn = Functional(model, cfg, batch.batched)
    p = {k: v.detach() for k, v in params.items()}
    x = _concat(batch.support_x, batch.query_x, batch.batched)
    y = _concat(batch.support_y, batch.query_y, batch.batched)
    seen: list = []
    fast = _train(p, x, y, cfg.inner_steps, cfg, fn, batch, check_steps=diagnose, seen=seen)
    with torch.no_grad():
        grads = {k: (p[k] - fast[k]).sum(0) if batch.batched else p[k] - fast[k] for k in p}
        if cfg.check_finite:
            check_finite(NAME, "the meta-gradient", list(grads), list(grads.values()), batch, per_task=False)
        cls = is_classification(model)
        if not seen:  # no inner step (inner_steps = 0): score the task's data with the initial parameters
            out = fn.outputs(p, x, 0)
            seen = [(fn.loss(out, y), out, y)]
        (first_loss, first_out, first_y), (last_loss, last_out, last_y) = seen[0], seen[-1]
        metrics = {**task_metrics("support", fn, first_out, first_y, first_loss, cls),
                   **task_metrics("query", fn, last_out, last_y, last_loss, cls)}
    return grads, metrics


def adapt(params: Params, support, cfg: AlgorithmConfig, model: nn.Module, *, steps: int | None = None,
          create_graph: bool = False, batched: bool = False) -> Params:
    """``steps`` (default ``cfg.inner_steps``) optimiser steps on the support set only (as at test time).

    Reptile never differentiates through its inner loop; ``create_graph`` is accepted for a uniform interface and
    must be False.
    """
    if create_graph:
        raise AlgorithmConfigError("create_graph: reptile's inner loop is not differentiated through")
    steps = cfg.inner_steps if steps is None else steps
    if steps < 0:
        raise AlgorithmConfigError(f"steps: must be >= 0, got {steps}")
    batch = support_only(support, batched)
    check_model(model, cfg, params, steps)
    check_labels(model, params, batch, with_query=False)
    return _train(params, batch.support_x, batch.support_y, steps, cfg, Functional(model, cfg, batched), batch)


def meta_gradient(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module) -> tuple[Params, Metrics]:
    """``params - adapted`` after training on support+query; metrics: the inner loop's first minibatch before
    adaptation (``support_*``) and its last minibatch (``query_*``), see the module docstring."""
    return _meta_gradient(params, as_batch(episode, False), cfg, model)


def meta_gradient_batched(params: Params, stacked: Episode, cfg: AlgorithmConfig, model: nn.Module,
                          keys: Sequence[Key] | None = None) -> tuple[Params, Metrics]:
    """The same for a stack of tasks (batched path): SUMMED over tasks, metrics averaged. Pass the episodes' ``keys``
    when ``reptile_batch_size`` is set, so that the minibatch order matches the per-task path."""
    return _meta_gradient(params, as_batch(stacked, True, keys), cfg, model)


def evaluate(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module, *,
             steps: int | None = None, batched: bool = False, keys: Sequence[Key] | None = None) -> Metrics:
    """Train on the support set for ``cfg.eval_inner_steps`` (or ``steps``) and score the query set (``keys``: the
    stacked episodes' keys, for the minibatch order), batch-normalised as ``cfg.query_bn`` says: with the support
    set's statistics (``support``: Nichol et al.'s non-transductive setting, each query as if alone; they run the
    support set plus one query, we the support set's statistics alone) or the query set's own (``batch``: their
    transductive figures)."""
    steps = cfg.eval_inner_steps if steps is None else steps
    if steps < 0:
        raise AlgorithmConfigError(f"steps: must be >= 0, got {steps}")
    batch = as_batch(episode, batched, keys)
    check_model(model, cfg, params, steps)
    check_labels(model, params, batch)
    fn = Functional(model, cfg, batched)
    p = {k: v.detach() for k, v in params.items()}
    fast = _train(p, batch.support_x, batch.support_y, steps, cfg, fn, batch)
    cls = is_classification(model)
    task_keys = frozenset(fast) if batched else frozenset()
    with torch.no_grad():
        support_out = fn.outputs(p, batch.support_x, 0)
        if cfg.query_bn == "support" and has_batch_norm(model):
            n = batch.support_x.shape[1 if batched else 0]
            both = _concat(batch.support_x, batch.query_x, batched)
            query_out = fn.outputs(fast, both, steps, task_keys, stats_rows=n)[..., n:, :]
        else:
            query_out = fn.outputs(fast, batch.query_x, steps, task_keys)
        return {**task_metrics("support", fn, support_out, batch.support_y, classification=cls),
                **task_metrics("query", fn, query_out, batch.query_y, classification=cls)}
