"""ANIL (Raghu et al. 2020, "Almost No Inner Loop"): MAML whose inner loop adapts only the head.

The body (every parameter not named ``head.*``) is meta-learned but fixed within a task, so its features are
computed once per task (once per inner step only with per-step batch norm) and the inner loop runs the head alone:
the inner loop costs a linear layer, not a network. Second order by default (the body's meta-gradient includes the
path through the head's adaptation on the support features); ``first_order: true`` drops it.

    >>> from metatrain.pipeline.algorithms import AlgorithmConfig, anil
    >>> cfg = AlgorithmConfig(name="anil", inner_lr=0.4, inner_steps=1)
    >>> grads, metrics = anil.meta_gradient(params, episode, cfg, model)   # grads for body and head
"""

from __future__ import annotations

from metatrain.pipeline.algorithms.gradient.inner_loop import HEAD_PREFIX, GradientSpec, Params, fixed_lr
from metatrain.pipeline.algorithms.gradient.spec import interface
from metatrain.pipeline.algorithms.record import GRADIENT_METRICS, AlgorithmRecord

RECORD = AlgorithmRecord(name="anil", family="gradient", models=("conv4", "mlp"), predict="adapt",
                         adapts_weights=True, metrics=GRADIENT_METRICS)
NAME = RECORD.name


def head_keys(params: Params) -> list[str]:
    """The parameters ANIL adapts: those of the model's ``head`` submodule."""
    return [k for k in params if k.startswith(HEAD_PREFIX)]


SPEC = GradientSpec(NAME, second_order=lambda cfg: not cfg.first_order, adapt_keys=head_keys, lr_at=fixed_lr,
                    head_only=True)

init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate = interface(SPEC)
