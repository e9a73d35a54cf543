"""The sinusoid-regression network of the MAML paper (Finn et al. 2017, section 5.1): 1 -> 40 -> 40 -> 1, ReLU.

    >>> from metatrain.models import SinusoidMLP
    >>> net = SinusoidMLP()               # hidden=(40, 40)
    >>> net(torch.zeros(10, 1)).shape     # (10, 1)
"""

from __future__ import annotations

import torch
from metatrain.models.base import FewShotModel, ModelConfigError, linear_tasks
from torch import nn


class MLPBody(nn.Sequential):
    """Linear + ReLU layers; accepts (and ignores) ``step`` so every body has the same call signature."""

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:  # noqa: ARG002 - uniform signature
        return super().forward(x)

    def forward_tasks(self, params: dict[str, torch.Tensor], x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """``T`` tasks at once: ``x`` ``(T, N, in)``; per-task weights ``(T, out, in)`` or shared ones."""
        for i, layer in enumerate(self):
            x = linear_tasks(params[f"{i}.weight"], params[f"{i}.bias"], x) if isinstance(layer, nn.Linear) \
                else layer(x)
        return x


class SinusoidMLP(FewShotModel):
    """Fully connected regression net; ``hidden`` gives the widths of the ReLU layers (the paper: 40, 40)."""

    task = "regression"

    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        sizes = (("in_features", in_features), ("out_features", out_features), *(("hidden", h) for h in hidden))
        for name, value in sizes:
            if not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"{name}: must be an integer >= 1, got {value!r}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = MLPBody(*layers)
        self.head = nn.Linear(width, out_features)
        self.out_features = out_features

    def forward_tasks(self, params: dict[str, torch.Tensor], x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """``forward`` for ``T`` tasks at once (batched matrix products): ``(T, N, out)``."""
        body = {k[len("body."):]: v for k, v in params.items() if k.startswith("body.")}
        return linear_tasks(params["head.weight"], params["head.bias"], self.body.forward_tasks(body, x, step))

    def reset_parameters(self) -> None:
        """PyTorch's default ``nn.Linear`` initialisation, redrawn from the global generator."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
