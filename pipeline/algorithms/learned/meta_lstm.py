"""The LSTM meta-learner (Ravi & Larochelle 2017, "Optimization as a model for few-shot learning").

The learner (Conv4, 32 filters in the paper) is not trained by SGD in the inner loop: a meta-learner writes its
parameters. Per coordinate of the learner's flat parameter vector, an LSTM (``lstm_hidden`` = 20 units) reads the
preprocessed (loss, gradient) and feeds the meta cell (:class:`~models.learned_optimizer.MetaLSTMCell`), whose cell
state IS the learner's parameters:

    c_t = f_t * c_{t-1} + i_t * (-grad_t),   f_t, i_t = sigmoid(W [h_t, c_{t-1}, gate_{t-1}] + b)

The meta-parameters are c_0 (the learner's initialisation: the model's own parameters, under their usual names)
and the meta-learner's weights, under ``meta_lstm.`` (``meta_lstm.lstm.weight_ih``, ``meta_lstm.w_f``, ...), both
trained by the parameter server on the query loss after ``inner_steps`` updates.

How this differs from MAML: MAML's update rule is fixed SGD and it differentiates through the inner gradients
(the Hessian term; FOMAML drops it). Here the rule is learned, and, as in the paper, the learner's loss and gradient
are inputs taken as constants (detached): only the chain of cell states c_0 -> c_T (through f, i and the LSTM) is
differentiated. So the cost per inner step is one forward/backward of the learner plus the LSTM, like FOMAML's.
The gradient is the mean over the batch, used as it is (both public codebases divide it by the batch size once
more, which shifts the log-preprocessed input by log(batch) / p; we do not).

Updates: ``inner_steps`` of them on the support set; with ``support_batch`` > 0 each takes the next
``support_batch`` examples of the support set in an order fixed by the episode key (the paper's 5-shot: batches of
the support set), else all of it (1-shot). Batch norm: support passes use their batch's statistics; the query set
is normalised with the adapted learner's statistics on the support set (``query_bn: support``, the default: each
query scored as if it came alone) or with its own (``query_bn: batch``, transductive, as MAML), at meta-training and
evaluation alike. ``eval.json`` names the mode.

    >>> from metatrain.pipeline.algorithms import AlgorithmConfig, init_params, meta_lstm
    >>> cfg = AlgorithmConfig(name="meta_lstm", inner_steps=12, eval_inner_steps=12)
    >>> params = init_params(Conv4.omniglot(5, hidden=32), cfg)          # c_0 and meta_lstm.*
    >>> grads, metrics = meta_lstm.meta_gradient(params, episode, cfg, model)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from metatrain.models import Conv4, MetaLSTMCell, ParamLayout
from metatrain.models.layers import query_logits
from metatrain.tasks.episode import Episode
from torch import nn
from torch.func import functional_call

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.errors import AlgorithmConfigError, TaskMismatchError
from metatrain.pipeline.algorithms.gradient.inner_loop import (
    Key,
    Metrics,
    Params,
    TaskBatch,
    accuracy,
    as_batch,
    check_finite,
    key_seed,
)
from metatrain.pipeline.algorithms.record import GRADIENT_METRICS, AlgorithmRecord

if TYPE_CHECKING:
    from metatrain.pipeline.config import Config

PREFIX = "meta_lstm."
"""Key prefix of the meta-learner's weights in the parameter dict (checkpoints depend on it)."""


def build_network(cfg: Config, shape: tuple[int, int, int]) -> Conv4:
    """The learner: Conv4 ``data.ways`` wide (``model.hidden`` filters: 32 in the paper's configs)."""
    m, (channels, height, _) = cfg.model, shape
    return Conv4(cfg.data.ways, in_channels=channels, hidden=m.hidden, image_size=height, pool=m.pool)


RECORD = AlgorithmRecord(name="meta_lstm", family="learned", models=("conv4",), predict="softmax",
                         adapts_weights=True, param_prefix=PREFIX, metrics=GRADIENT_METRICS, builder=build_network,
                         reads_query_bn=True, shape_fields=("lstm_hidden",),
                         forbidden=(("first_order", "meta_lstm is first-order by construction (the learner's "
                                                    "gradients are inputs); leave first_order unset"),
                                    ("multi_step_loss", "meta_lstm trains on the query loss after the last update"),
                                    ("per_step_bn", "meta_lstm's learner has one set of batch-norm weights")))
NAME = RECORD.name


@lru_cache(maxsize=8)
def meta_cell(hidden: int, p: float) -> MetaLSTMCell:
    """The cell as a description of the computation (its weights always come from the parameter dict)."""
    return MetaLSTMCell(hidden=hidden, p=p)


def init_extra_params(model: nn.Module, cfg: AlgorithmConfig) -> Params:  # noqa: ARG001 - uniform interface
    """The meta-learner's weights, freshly drawn (U(-0.01, 0.01), b_F ~ U(4, 6), b_I ~ U(-5, -4))."""
    fresh = MetaLSTMCell(hidden=cfg.lstm_hidden, p=cfg.lstm_p)
    return {PREFIX + k: v.detach() for k, v in fresh.named_parameters()}


def split(params: Params, model: nn.Module) -> tuple[Params, Params]:
    """(learner parameters c_0, meta-learner weights without the prefix); a missing or foreign key raises."""
    learner = {k: v for k, v in params.items() if not k.startswith(PREFIX)}
    cell = {k[len(PREFIX):]: v for k, v in params.items() if k.startswith(PREFIX)}
    own = {k for k, _ in model.named_parameters()}
    if set(learner) != own:
        missing, extra = sorted(own - set(learner)), sorted(set(learner) - own)
        raise AlgorithmConfigError(f"params: not the learner's parameters (missing {missing[:3]}, unexpected "
                                   f"{extra[:3]})")
    if not cell:
        raise AlgorithmConfigError(f"params: no {PREFIX}* weights (add meta_lstm.init_extra_params(model, cfg))")
    return learner, cell


def _check_cell(cell: Params, cfg: AlgorithmConfig) -> MetaLSTMCell:
    module = meta_cell(cfg.lstm_hidden, cfg.lstm_p)
    for k, v in module.named_parameters():
        if k not in cell or tuple(cell[k].shape) != tuple(v.shape):
            got = "missing" if k not in cell else f"shape {tuple(cell[k].shape)}"
            raise AlgorithmConfigError(f"lstm_hidden: params[{PREFIX + k!r}] is {got}, a meta-learner of "
                                       f"lstm_hidden={cfg.lstm_hidden} needs {tuple(v.shape)}")
    return module


def support_batches(key: Key, n: int, batch: int, steps: int) -> list[torch.Tensor | None]:
    """Row indices of the support set read at each update: None (all of it) unless ``batch`` is in (0, n).

    Consecutive slices of one permutation per pass over the support set, drawn from the episode key, so the order
    is the same on every worker.
    """
    if batch == 0 or batch >= n:
        return [None] * steps
    rng = np.random.default_rng(key_seed(key))
    order: list[int] = []
    while len(order) < steps * batch:
        perm = rng.permutation(n).tolist()
        order += perm[:n - n % batch]  # whole batches only (a DataLoader's drop_last)
    return [torch.tensor(order[t * batch:(t + 1) * batch]) for t in range(steps)]


def _check_episode(model: nn.Module, x: torch.Tensor, y: torch.Tensor, field: str, key: Key) -> None:
    ways = int(model.out_features)
    if y.is_floating_point():
        raise TaskMismatchError(f"{field}: meta_lstm classifies; got float labels (episode {key}); a sinusoid "
                                f"(regression) config cannot use it")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= ways):
        raise TaskMismatchError(f"{field}: labels must be in 0..{ways - 1} for this {ways}-way learner (episode "
                                f"{key})")


def unroll(params: Params, support_x: torch.Tensor, support_y: torch.Tensor, cfg: AlgorithmConfig,
           model: nn.Module, steps: int, key: Key, differentiable: bool
           ) -> tuple[torch.Tensor, ParamLayout, tuple[float, float]]:
    """(c_T the learner's flat parameters after ``steps`` updates, their layout, (loss, acc) at c_0 on the support).

    ``differentiable``: c_T keeps the graph of the cell-state chain back to c_0 and the meta-learner's weights.
    The learner's gradient is always taken at a detached copy of c_{t-1}: it enters the cell as a constant.
    """
    learner, cell_params = split(params, model)
    cell = _check_cell(cell_params, cfg)
    _check_episode(model, support_x, support_y, "support_y", key)
    layout = ParamLayout.of(learner)
    c = layout.flatten(learner)
    state = cell.init_state(c.shape[0], device=c.device, dtype=c.dtype)
    where = TaskBatch(support_x, support_y, support_x, support_y, False, (tuple(key),))  # names the episode
    first = None
    batches = support_batches(key, support_x.shape[0], cfg.support_batch, max(steps, 1))
    for t in range(steps):
        idx = batches[t]
        x, y = (support_x, support_y) if idx is None else (support_x[idx], support_y[idx])
        with torch.enable_grad():
            w = c.detach().requires_grad_(True)
            out = functional_call(model, layout.unflatten(w), (x,))
            loss = F.cross_entropy(out, y)
            (grad,) = torch.autograd.grad(loss, w)
        if t == 0 and idx is None:
            first = (float(loss.detach()), float(accuracy(out.detach(), y)))
        if cfg.check_finite:
            check_finite(NAME, f"inner step {t + 1}", ["learner gradient"], [grad], where, False)
        with torch.set_grad_enabled(differentiable):
            c, state = functional_call(cell, cell_params, (grad, loss.detach(), c, state))
    if first is None:  # no update read the whole support set at c_0: score it there
        with torch.no_grad():
            out = functional_call(model, learner, (support_x,))
            first = (float(F.cross_entropy(out, support_y)), float(accuracy(out, support_y)))
    return c, layout, first


def _episodes(episode: Episode, batched: bool, keys: Sequence[Key] | None) -> list[Episode]:
    """One task, or the tasks of a stack (the learned update runs per task: the cell's batch is coordinates)."""
    if not batched:
        return [episode]
    n = episode.support_x.shape[0]
    keys = list(keys) if keys is not None else [(-1, -1, t) for t in range(n)]
    return [dataclasses.replace(episode, support_x=episode.support_x[t], support_y=episode.support_y[t],
                                query_x=episode.query_x[t], query_y=episode.query_y[t], classes=episode.classes[t],
                                rotations=episode.rotations[t], key=tuple(keys[t]))
            for t in range(n)]


def adapt(params: Params, support, cfg: AlgorithmConfig, model: nn.Module, *, steps: int | None = None,
          create_graph: bool = False, batched: bool = False) -> Params:
    """The learner written by the meta-learner after ``steps`` (default ``cfg.inner_steps``) updates on ``support``
    (an Episode or ``(x, y)``); the ``meta_lstm.*`` weights come back unchanged."""
    if batched:
        raise AlgorithmConfigError("batched: meta_lstm adapts one task at a time")
    steps = cfg.inner_steps if steps is None else steps
    if steps < 0:
        raise AlgorithmConfigError(f"steps: must be >= 0, got {steps}")
    x, y, key = (support.support_x, support.support_y, tuple(support.key)) if isinstance(support, Episode) \
        else (*support, (-1, -1, 0))
    c, layout, _ = unroll(params, x, y, cfg, model, steps, key, differentiable=create_graph)
    return {**params, **layout.unflatten(c if create_graph else c.detach())}


def scores(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module, *, steps: int | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(query NLL, query logits ``(queries, ways)``) after ``eval_inner_steps`` updates (what predict calls)."""
    steps = cfg.eval_inner_steps if steps is None else steps
    ways = int(episode.support_y.unique().numel())
    if ways != model.out_features:
        raise TaskMismatchError(f"support_y: the support set has {ways} classes but this meta_lstm learner's head "
                                f"has exactly {model.out_features} ways (data.ways it was trained with)")
    adapted = adapt(params, episode, cfg, model, steps=steps)
    learner = {k: v for k, v in adapted.items() if not k.startswith(PREFIX)}
    with torch.no_grad():
        logits = query_logits(model, learner, episode.support_x, episode.query_x, cfg.query_bn)
    return F.cross_entropy(logits, episode.query_y), logits


def meta_gradient(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module) -> tuple[Params, Metrics]:
    """Gradient of the query loss after ``inner_steps`` updates w.r.t. c_0 and the meta-learner's weights."""
    _check_episode(model, episode.query_x, episode.query_y, "query_y", episode.key)
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        c, layout, first = unroll(p, episode.support_x, episode.support_y, cfg, model, cfg.inner_steps,
                                  tuple(episode.key), differentiable=True)
        logits = query_logits(model, layout.unflatten(c), episode.support_x, episode.query_x, cfg.query_bn)
        loss = F.cross_entropy(logits, episode.query_y)
        names = list(p)
        grads = torch.autograd.grad(loss, [p[k] for k in names], allow_unused=True)
    out = {k: (g if g is not None else torch.zeros_like(p[k])) for k, g in zip(names, grads)}
    if cfg.check_finite:
        check_finite(NAME, "the meta-gradient", names, [out[k] for k in names], as_batch(episode, False), False)
    return out, {"support_loss": first[0], "support_acc": first[1], "query_loss": float(loss.detach()),
                 "query_acc": float(accuracy(logits.detach(), episode.query_y))}


def meta_gradient_batched(params: Params, stacked: Episode, cfg: AlgorithmConfig, model: nn.Module,
                          keys: Sequence[Key] | None = None) -> tuple[Params, Metrics]:
    """The tasks of a stack one after another (the cell is already batched over the learner's coordinates):
    gradients summed, metrics averaged."""
    total, sums = None, {}
    tasks = _episodes(stacked, True, keys)
    for ep in tasks:
        g, m = meta_gradient(params, ep, cfg, model)
        total = g if total is None else {k: total[k] + g[k] for k in total}
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
    return total, {k: v / len(tasks) for k, v in sums.items()}


def evaluate(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module, *, steps: int | None = None,
             batched: bool = False, keys: Sequence[Key] | None = None) -> Metrics:
    """Adapt with ``eval_inner_steps`` (or ``steps``) updates and score the query set; no meta-gradient graph."""
    steps = cfg.eval_inner_steps if steps is None else steps
    tasks = _episodes(episode, batched, keys)
    sums: dict[str, float] = {}
    for ep in tasks:
        _check_episode(model, ep.query_x, ep.query_y, "query_y", ep.key)
        p = {k: v.detach() for k, v in params.items()}
        c, layout, first = unroll(p, ep.support_x, ep.support_y, cfg, model, steps, tuple(ep.key), False)
        with torch.no_grad():
            logits = query_logits(model, layout.unflatten(c), ep.support_x, ep.query_x, cfg.query_bn)
            m = {"support_loss": first[0], "support_acc": first[1],
                 "query_loss": float(F.cross_entropy(logits, ep.query_y)),
                 "query_acc": float(accuracy(logits, ep.query_y))}
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / len(tasks) for k, v in sums.items()}
