"""Meta-SGD (Li et al. 2017): MAML whose inner learning rates are meta-parameters, learned with the model.

The learned rates live in the same parameter dict as the model, under ``inner_lr.<parameter name>``, so the
parameter server updates them with its outer optimiser like any weight; :func:`init_extra_params` creates them
(all equal to ``cfg.inner_lr``). Two shapes (``cfg.metasgd_lr``):

* ``per_param`` (Meta-SGD): one rate per weight, the parameter's shape, the same at every step.
* ``per_layer_step`` (MAML++'s LSLR, Antoniou et al. 2019): one rate per parameter tensor per step, shape
  ``(inner_steps,)``; evaluation steps beyond ``inner_steps`` reuse the last one.

MAML++'s multi-step loss (``multi_step_loss``, weights ``msl_weights``; :func:`msl_weights` gives the paper's
annealing schedule) and per-step batch norm (``per_step_bn``) combine with either.

    >>> from metatrain.pipeline.algorithms import AlgorithmConfig, metasgd
    >>> cfg = AlgorithmConfig(name="metasgd", inner_lr=0.4, metasgd_lr="per_layer_step", inner_steps=5,
    ...                       eval_inner_steps=5, multi_step_loss=True)
    >>> params = {**dict(model.named_parameters()), **metasgd.init_extra_params(model, cfg)}
    >>> grads, metrics = metasgd.meta_gradient(params, episode, cfg, model)   # grads for inner_lr.* too
"""

from __future__ import annotations

import torch
from torch import nn

from metatrain.pipeline.algorithms.config import AlgorithmConfig
from metatrain.pipeline.algorithms.errors import AlgorithmConfigError
from metatrain.pipeline.algorithms.gradient.inner_loop import LR_PREFIX, GradientSpec, LrAt, Params, all_keys
from metatrain.pipeline.algorithms.gradient.spec import interface
from metatrain.pipeline.algorithms.record import GRADIENT_METRICS, AlgorithmRecord

#: The learned rates are stored under LR_PREFIX (``inner_lr.<parameter name>``), which checkpoints depend on.
RECORD = AlgorithmRecord(name="metasgd", family="gradient", models=("conv4", "mlp"), predict="adapt",
                         adapts_weights=True, param_prefix=LR_PREFIX, metrics=GRADIENT_METRICS)
NAME = RECORD.name


def init_extra_params(model: nn.Module, cfg: AlgorithmConfig) -> Params:
    """The learned inner learning rates, initialised to ``cfg.inner_lr``, one entry per model parameter."""
    out = {}
    for name, p in model.named_parameters():
        shape = p.shape if cfg.metasgd_lr == "per_param" else (cfg.inner_steps,)
        out[LR_PREFIX + name] = torch.full(shape, float(cfg.inner_lr), dtype=p.dtype, device=p.device)
    return out


def learned_lr(params: Params, cfg: AlgorithmConfig) -> LrAt:
    """Look the rates up in ``params``; missing or mis-shaped entries are a configuration error."""
    for key, p in params.items():
        if key.startswith(LR_PREFIX):
            continue
        lr = params.get(LR_PREFIX + key)
        want = tuple(p.shape) if cfg.metasgd_lr == "per_param" else (cfg.inner_steps,)
        if lr is None or tuple(lr.shape) != want:
            got = "missing" if lr is None else f"shape {tuple(lr.shape)}"
            raise AlgorithmConfigError(f"metasgd_lr: params[{LR_PREFIX + key!r}] is {got}, need shape {want} "
                                       f"(add metasgd.init_extra_params(model, cfg) to the parameters)")
    if cfg.metasgd_lr == "per_param":
        return lambda key, step: params[LR_PREFIX + key]
    last = cfg.inner_steps - 1
    return lambda key, step: params[LR_PREFIX + key][min(step, last)]


def msl_weights(steps: int, epoch: int, anneal_epochs: int) -> tuple[float, ...]:
    """MAML++'s multi-step-loss weights at ``epoch``: uniform at 0, the last step's weight growing over
    ``anneal_epochs`` while the others decay to 0.03/steps. Use as ``replace(cfg, msl_weights=...)``."""
    if steps < 1 or anneal_epochs < 1:
        raise AlgorithmConfigError(f"msl_weights: need steps >= 1 and anneal_epochs >= 1, got {steps}, "
                                   f"{anneal_epochs}")
    decay, floor = 1.0 / steps / anneal_epochs, 0.03 / steps
    w = [max(1.0 / steps - epoch * decay, floor) for _ in range(steps - 1)]
    w.append(min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return tuple(w)


SPEC = GradientSpec(NAME, second_order=lambda cfg: not cfg.first_order, adapt_keys=all_keys, lr_at=learned_lr)

init_extra_params, adapt, meta_gradient, meta_gradient_batched, evaluate = interface(SPEC, init_extra_params)
