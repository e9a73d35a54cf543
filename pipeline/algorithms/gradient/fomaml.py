"""First-order MAML: MAML's inner loop, meta-gradient = the query gradient at the adapted parameters.

The inner gradients are taken without ``create_graph`` and so act as constants: the chain rule from the adapted
parameters back to the initial ones is the identity, and no Hessian term (or second-order graph) is computed.

    >>> from pipeline.algorithms import AlgorithmConfig, fomaml
    >>> cfg = AlgorithmConfig(name="fomaml", inner_lr=0.4, inner_steps=1)
    >>> grads, metrics = fomaml.meta_gradient(params, episode, cfg, model)
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

NAME = "fomaml"
SPEC = GradientSpec(NAME, second_order=lambda cfg: False, adapt_keys=all_keys, lr_at=fixed_lr)


def init_extra_params(model: nn.Module, cfg: AlgorithmConfig) -> Params:  # noqa: ARG001 - uniform interface
    """FOMAML learns nothing beyond the model's parameters."""
    return {}


def adapt(params: Params, support, cfg: AlgorithmConfig, model: nn.Module, *, steps: int | None = None,
          create_graph: bool = False, batched: bool = False) -> Params:
    """``steps`` (default ``cfg.inner_steps``) SGD steps on ``support``; the same inner loop as MAML."""
    steps = cfg.inner_steps if steps is None else steps
    return gradient_adapt(SPEC, params, support_only(support, batched), cfg, model, steps, create_graph)


def meta_gradient(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module) -> tuple[Params, Metrics]:
    """The gradient of the query loss at the adapted parameters, plus metrics."""
    return gradient_meta_gradient(SPEC, params, as_batch(episode, False), cfg, model)


def meta_gradient_batched(params: Params, stacked: Episode, cfg: AlgorithmConfig, model: nn.Module,
                          keys: Sequence[Key] | None = None) -> tuple[Params, Metrics]:
    """The same for a stack of tasks at once (batched path): gradients SUMMED over tasks, metrics averaged."""
    return gradient_meta_gradient(SPEC, params, as_batch(stacked, True, keys), cfg, model)


def evaluate(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module, *,
             steps: int | None = None, batched: bool = False, keys: Sequence[Key] | None = None) -> Metrics:
    """Adapt with ``cfg.eval_inner_steps`` (or ``steps``) and score the query set."""
    steps = cfg.eval_inner_steps if steps is None else steps
    return gradient_evaluate(SPEC, params, as_batch(episode, batched, keys), cfg, model, steps)
