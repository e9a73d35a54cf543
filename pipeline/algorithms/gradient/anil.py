"""ANIL (Raghu et al. 2020, "Almost No Inner Loop"): MAML whose inner loop adapts only the head.

The body (every parameter not named ``head.*``) is meta-learned but fixed within a task, so its features are
computed once per task (once per inner step only with per-step batch norm) and the inner loop runs the head alone:
the inner loop costs a linear layer, not a network. Second order by default (the body's meta-gradient includes the
path through the head's adaptation on the support features); ``first_order: true`` drops it.

    >>> from pipeline.algorithms import AlgorithmConfig, anil
    >>> cfg = AlgorithmConfig(name="anil", inner_lr=0.4, inner_steps=1)
    >>> grads, metrics = anil.meta_gradient(params, episode, cfg, model)   # grads for body and head
"""

from __future__ import annotations

from collections.abc import Sequence

from metatrain.tasks.episode import Episode
from torch import nn

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.gradient.inner_loop import (
    HEAD_PREFIX,
    GradientSpec,
    Key,
    Metrics,
    Params,
    as_batch,
    fixed_lr,
    gradient_adapt,
    gradient_evaluate,
    gradient_meta_gradient,
    support_only,
)

NAME = "anil"


def head_keys(params: Params) -> list[str]:
    """The parameters ANIL adapts: those of the model's ``head`` submodule."""
    return [k for k in params if k.startswith(HEAD_PREFIX)]


SPEC = GradientSpec(NAME, second_order=lambda cfg: not cfg.first_order, adapt_keys=head_keys, lr_at=fixed_lr,
                    head_only=True)


def init_extra_params(model: nn.Module, cfg: AlgorithmConfig) -> Params:  # noqa: ARG001 - uniform interface
    """ANIL learns nothing beyond the model's parameters."""
    return {}


def adapt(params: Params, support, cfg: AlgorithmConfig, model: nn.Module, *, steps: int | None = None,
          create_graph: bool = False, batched: bool = False) -> Params:
    """``steps`` (default ``cfg.inner_steps``) SGD steps of the head on ``support``; the body is returned as is."""
    steps = cfg.inner_steps if steps is None else steps
    return gradient_adapt(SPEC, params, support_only(support, batched), cfg, model, steps, create_graph)


def meta_gradient(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module) -> tuple[Params, Metrics]:
    """Meta-gradient for body and head after adapting the head, plus metrics."""
    return gradient_meta_gradient(SPEC, params, as_batch(episode, False), cfg, model)


def meta_gradient_batched(params: Params, stacked: Episode, cfg: AlgorithmConfig, model: nn.Module,
                          keys: Sequence[Key] | None = None) -> tuple[Params, Metrics]:
    """The same for a stack of tasks (batched path; one body pass for all): gradients SUMMED, metrics averaged."""
    return gradient_meta_gradient(SPEC, params, as_batch(stacked, True, keys), cfg, model)


def evaluate(params: Params, episode: Episode, cfg: AlgorithmConfig, model: nn.Module, *,
             steps: int | None = None, batched: bool = False, keys: Sequence[Key] | None = None) -> Metrics:
    """Adapt the head with ``cfg.eval_inner_steps`` (or ``steps``) and score the query set."""
    steps = cfg.eval_inner_steps if steps is None else steps
    return gradient_evaluate(SPEC, params, as_batch(episode, batched, keys), cfg, model, steps)
