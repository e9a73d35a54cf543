"""First-order MAML: MAML's inner loop, meta-gradient = the query gradient at the adapted parameters.

The inner gradients are taken without ``create_graph`` and so act as constants: the chain rule from the adapted
parameters back to the initial ones is the identity, and no Hessian term (or second-order graph) is computed.

    >>> from metatrain.pipeline.algorithms import AlgorithmConfig, fomaml
    >>> cfg = AlgorithmConfig(name="fomaml", inner_lr=0.4, inner_steps=1)
    >>> grads, metrics = fomaml.meta_gradient(params, episode, cfg, model)
"""

from __future__ import annotations

from metatrain.pipeline.algorithms.gradient.inner_loop import GradientSpec, all_keys, fixed_lr
from metatrain.pipeline.algorithms.gradient.spec import interface
from metatrain.pipeline.algorithms.record import GRADIENT_METRICS, AlgorithmRecord

RECORD = AlgorithmRecord(name="fomaml", family="gradient", models=("conv4", "mlp"), predict="adapt",
                         adapts_weights=True, metrics=GRADIENT_METRICS)
NAME = RECORD.name
SPEC = GradientSpec(NAME, second_order=lambda cfg: False, adapt_keys=all_keys, lr_at=fixed_lr)

init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate = interface(SPEC)
