"""What the algorithms in ``pipeline/algorithms`` expect of a model.

A :class:`FewShotModel` is an ordinary ``nn.Module`` split into a ``body`` (feature extractor) and a ``head``
(the last layer), with ``forward(x, step=0) == head(body(x, step))``. The algorithms never call it with its own
parameters: they run it with ``torch.func.functional_call(model, params, (x,), {"step": s})`` on a
``dict[str, Tensor]``, so the module is only a description of the computation. ANIL adapts the parameters whose
names start with ``head.``; ``step`` selects MAML++'s per-step batch-norm rows (ignored by models without them).

Optionally a model (and its body) also has ``forward_tasks(params, x, step)``: the same function for ``T`` tasks at
once, ``x`` of shape ``(T, N, ...)``, each parameter either with a leading task dimension (per-task weights) or
without (shared by all tasks), output ``(T, N, out)``. The batched-task path uses it instead of ``torch.func.vmap``
when present (Conv4's runs the tasks as one grouped convolution: twice vmap's speed, see models/conv4.py).
"""

from __future__ import annotations

import torch
from metatrain.tasks.errors import MetatrainError
from torch import nn


class ModelConfigError(MetatrainError, ValueError):
    """A model was asked for with impossible settings (the message names the argument); also a ValueError."""


class FewShotModel(nn.Module):
    """Base of the models here: ``body`` + ``head``, a task kind and the number of outputs."""

    task: str = "classification"
    """``classification`` (cross-entropy on int64 labels, accuracy reported) or ``regression`` (MSE)."""
    out_features: int
    """Width of the head: the number of ways for classification."""
    bn_steps: int = 1
    """How many per-step batch-norm rows the model holds (1 = one set of BN weights shared by all steps)."""
    body: nn.Module
    head: nn.Module

    @property
    def ways(self) -> int:
        return self.out_features

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        return self.head(self.body(x, step))


def per_task(p: torch.Tensor, own_dim: int, tasks: int) -> torch.Tensor:
    """``p`` with a leading task dimension: as is when it has one (``own_dim + 1`` dims), else expanded (a view)."""
    return p if p.dim() == own_dim + 1 else p.expand(tasks, *p.shape)


def linear_tasks(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``F.linear`` for ``T`` tasks: ``x`` is ``(T, N, in)``, weight ``(T, out, in)`` per task or ``(out, in)``."""
    if weight.dim() == 2:
        return torch.nn.functional.linear(x, weight, bias)
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    bias = per_task(bias, 1, x.shape[0])
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
