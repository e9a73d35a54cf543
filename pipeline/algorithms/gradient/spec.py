"""The one implementation of the MAML family (maml, fomaml, metasgd, anil): a :class:`GradientSpec` in, the uniform
algorithm functions out. A module of the family declares its spec and binds them:

    >>> SPEC = GradientSpec(NAME, second_order=lambda cfg: True, adapt_keys=all_keys, lr_at=fixed_lr)
    >>> init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate = interface(SPEC)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from metatrain.tasks.episode import Episode
from torch import nn

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.gradient.inner_loop import (
    GradientSpec,
    Key,
    Metrics,
    Params,
    as_batch,
    gradient_adapt,
    gradient_evaluate,
    gradient_meta_gradient,
    support_only,
)


def no_extra_params(model: nn.Module, cfg: AlgorithmConfig) -> Params:  # noqa: ARG001 - uniform interface
    """Nothing is learned beyond the model's parameters."""
    return {}


def interface(spec: GradientSpec, init_extra_params: Callable[[nn.Module, AlgorithmConfig], Params] = no_extra_params):
    """The uniform algorithm functions for ``spec``:
    ``(init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate)``."""

    def adapt(params: Params, support, cfg: AlgorithmConfig, model: nn.Module, *, steps: int | None = None,
              create_graph: bool = False, batched: bool = False) -> Params:
        """``steps`` (default ``cfg.inner_steps``) inner steps on ``support`` (an Episode or ``(x, y)``).

        Detached unless ``create_graph``, in which case the result is differentiable w.r.t. ``params``; parameters
        the spec does not adapt (ANIL's body, Meta-SGD's rates) come back unchanged.
        """
        steps = cfg.inner_steps if steps is None else steps
        return gradient_adapt(spec, params, support_only(support, batched), cfg, model, steps, create_graph)

    def meta_gradient(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module
                      ) -> tuple[Params, Metrics]:
        """Meta-gradient of the query loss after ``cfg.inner_steps`` steps (order per the spec), plus metrics."""
        return gradient_meta_gradient(spec, params, as_batch(episode, False), cfg, model)

    def meta_gradient_batched(params: Params, stacked: Episode, cfg: AlgorithmConfig, model: nn.Module,
                              keys: Sequence[Key] | None = None) -> tuple[Params, Metrics]:
        """The same for a stack of tasks at once (batched path): gradients SUMMED over tasks, metrics averaged."""
        return gradient_meta_gradient(spec, params, as_batch(stacked, True, keys), cfg, model)

    def evaluate(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module, *,
                 steps: int | None = None, batched: bool = False, keys: Sequence[Key] | None = None) -> Metrics:
        """Adapt with ``cfg.eval_inner_steps`` (or ``steps``) and score the query set; no meta-gradient graph."""
        steps = cfg.eval_inner_steps if steps is None else steps
        return gradient_evaluate(spec, params, as_batch(episode, batched, keys), cfg, model, steps)

    return init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate
