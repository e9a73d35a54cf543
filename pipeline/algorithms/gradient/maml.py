"""MAML (Finn et al. 2017): k inner SGD steps, meta-gradient through them (second order).

The inner loop differentiates the support loss with ``create_graph=True``, so the meta-gradient of the query
loss at the adapted parameters flows back through every update, Hessian-vector products included. Batch norm uses
the current episode's statistics (see :mod:`models.layers`).

    >>> from models import Conv4
    >>> from pipeline.algorithms import AlgorithmConfig, maml
    >>> model = Conv4.omniglot(ways=5)
    >>> params = dict(model.named_parameters())
    >>> cfg = AlgorithmConfig(name="maml", inner_lr=0.4, inner_steps=1, eval_inner_steps=3)
    >>> grads, metrics = maml.meta_gradient(params, episode, cfg, model)   # same keys/shapes as params
    >>> fast = maml.adapt(params, episode, cfg, model)                     # adapted parameters, detached
    >>> maml.evaluate(params, episode, cfg, model)                         # {'query_acc': ..., ...}
"""

from __future__ import annotations

from collections.abc import Sequence

from metatrain.tasks.episode import Episode
from torch import nn

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.gradient.inner_loop import (
    GradientSpec,
    Key,
    Metrics,
    Params,
    all_keys,
    as_batch,
    fixed_lr,
    gradient_adapt,
    gradient_evaluate,
    gradient_meta_gradient,
    support_only,
)

NAME = "maml"
SPEC = GradientSpec(NAME, second_order=lambda cfg: True, adapt_keys=all_keys, lr_at=fixed_lr)


def init_extra_params(model: nn.Module, cfg: AlgorithmConfig) -> Params:  # noqa: ARG001 - uniform interface
    """MAML learns nothing beyond the model's parameters."""
    return {}


def adapt(params: Params, support, cfg: AlgorithmConfig, model: nn.Module, *, steps: int | None = None,
          create_graph: bool = False, batched: bool = False) -> Params:
    """``steps`` (default ``cfg.inner_steps``) SGD steps on ``support`` (an Episode or ``(x, y)``).

    Detached unless ``create_graph``, in which case the result is differentiable w.r.t. ``params``.
    """
    steps = cfg.inner_steps if steps is None else steps
    return gradient_adapt(SPEC, params, support_only(support, batched), cfg, model, steps, create_graph)


def meta_gradient(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module) -> tuple[Params, Metrics]:
    """Second-order meta-gradient of the query loss after ``cfg.inner_steps`` steps, plus metrics."""
    return gradient_meta_gradient(SPEC, params, as_batch(episode, False), cfg, model)


def meta_gradient_batched(params: Params, stacked: Episode, cfg: AlgorithmConfig, model: nn.Module,
                          keys: Sequence[Key] | None = None) -> tuple[Params, Metrics]:
    """The same for a stack of tasks at once (batched path): gradients SUMMED over tasks, metrics averaged."""
    return gradient_meta_gradient(SPEC, params, as_batch(stacked, True, keys), cfg, model)


def evaluate(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module, *,
             steps: int | None = None, batched: bool = False, keys: Sequence[Key] | None = None) -> Metrics:
    """Adapt with ``cfg.eval_inner_steps`` (or ``steps``) and score the query set; no meta-gradient graph."""
    steps = cfg.eval_inner_steps if steps is None else steps
    return gradient_evaluate(SPEC, params, as_batch(episode, batched, keys), cfg, model, steps)
