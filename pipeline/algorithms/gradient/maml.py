"""MAML (Finn et al. 2017): k inner SGD steps, meta-gradient through them (second order).

The inner loop differentiates the support loss with ``create_graph=True``, so the meta-gradient of the query
loss at the adapted parameters flows back through every update, Hessian-vector products included. Batch norm uses
the current episode's statistics (see :mod:`models.layers`).

    >>> from metatrain.models import Conv4
    >>> from metatrain.pipeline.algorithms import AlgorithmConfig, maml
    >>> model = Conv4.omniglot(ways=5)
    >>> params = dict(model.named_parameters())
    >>> cfg = AlgorithmConfig(name="maml", inner_lr=0.4, inner_steps=1, eval_inner_steps=3)
    >>> grads, metrics = maml.meta_gradient(params, episode, cfg, model)   # same keys/shapes as params
    >>> fast = maml.adapt(params, episode, cfg, model)                     # adapted parameters, detached
    >>> maml.evaluate(params, episode, cfg, model)                         # {'query_acc': ..., ...}
"""

from __future__ import annotations

from metatrain.pipeline.algorithms.gradient.inner_loop import GradientSpec, all_keys, fixed_lr
from metatrain.pipeline.algorithms.gradient.spec import interface
from metatrain.pipeline.algorithms.record import GRADIENT_METRICS, AlgorithmRecord

RECORD = AlgorithmRecord(
    name="maml", family="gradient", models=("conv4", "mlp"), predict="adapt", adapts_weights=True,
    forbidden=(("first_order", "maml is second order by definition; use name 'fomaml'"),),
    metrics=GRADIENT_METRICS)
NAME = RECORD.name
SPEC = GradientSpec(NAME, second_order=lambda cfg: True, adapt_keys=all_keys, lr_at=fixed_lr)

init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate = interface(SPEC)
