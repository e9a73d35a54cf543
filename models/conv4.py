"""Conv4, the 4-block convolutional network of the MAML paper (Finn et al. 2017, section 5.2).

Each block is a 3x3 convolution, batch norm, ReLU and a 2x2 max-pool; a linear head maps the features to the ways.
The convolutions have no bias, which batch norm would cancel exactly (the paper's code had one; it never learns).

* Omniglot (``Conv4.omniglot(ways)``): 1x28x28 input, 64 filters, 28 -> 14 -> 7 -> 3 -> 1, so 64 features.
* Omniglot, strided (``Conv4.omniglot(ways, pool="stride")``): the variant the paper reports for Omniglot, with
  stride-2 convolutions instead of max-pooling (28 -> 14 -> 7 -> 4 -> 2) and, as in the authors' code, the feature
  map averaged over space (64 features).
* mini-ImageNet (``Conv4.mini_imagenet(ways)``): 3x84x84 input, 32 filters, 84 -> 42 -> 21 -> 10 -> 5, flattened to
  32*5*5 = 800 features.

Batch norm (see :mod:`models.layers`): always the statistics of the batch being run, i.e. of the current
episode's support set or query set, in train and eval mode alike (MAML's transductive setting); no running
statistics exist, so a forward pass never mutates the module. ``forward(x, stats_rows=n)`` normalises with
the first ``n`` rows' statistics instead (support set first, then queries: each query scored as if alone).
``bn_steps > 1`` gives MAML++'s per-inner-step BN gains and biases (row ``s`` at inner step ``s``; the query pass
after ``k`` steps uses row ``k``, so build with
``bn_steps = max(inner_steps, eval_inner_steps) + 1``).

    >>> from metatrain.models import Conv4
    >>> net = Conv4.omniglot(ways=5)
    >>> net(torch.zeros(5, 1, 28, 28)).shape      # (5, 5)
    >>> params = dict(net.named_parameters())    # what the algorithms adapt, via torch.func.functional_call
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from metatrain.models.base import FewShotModel, ModelConfigError, linear_tasks, per_task
from metatrain.models.layers import EpisodeBatchNorm2d, MaxPool2x2
from torch import nn

POOLS = ("max", "stride")


class ConvBlock(nn.Module):
    """conv3x3 -> batch norm -> ReLU -> 2x2 max-pool (or a stride-2 conv and no pool)."""

    def __init__(self, cin: int, cout: int, pool: str, bn_steps: int) -> None:
        super().__init__()
        # No conv bias: batch norm with batch statistics subtracts any per-channel constant, so a bias would get an
        # exactly-zero gradient (in practice rounding noise, which Adam's normalisation turns into a random walk).
        self.conv = nn.Conv2d(cin, cout, 3, stride=2 if pool == "stride" else 1, padding=1, bias=False)
        self.norm = EpisodeBatchNorm2d(cout, steps=bn_steps)
        self.pool = MaxPool2x2() if pool == "max" else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, step: int = 0, stats_rows: int | None = None) -> torch.Tensor:
        # The paper's order is conv, BN, ReLU, pool. Max-pool and ReLU commute exactly (both monotone, and where a
        # 2x2 window is all non-positive the ReLU gradient is zero either way), so pooling first gives the same
        # values and gradients with a 4x smaller ReLU in the forward, backward and double-backward passes.
        return self.act(self.pool(self.norm(self.conv(x), step, stats_rows)))


class Conv4Body(nn.ModuleList):
    """The four blocks, then a flatten (max-pool) or a spatial mean (strided, as MAML's code did)."""

    def __init__(self, blocks: list[ConvBlock], spatial_mean: bool) -> None:
        super().__init__(blocks)
        self.spatial_mean = spatial_mean

    def forward(self, x: torch.Tensor, step: int = 0, stats_rows: int | None = None) -> torch.Tensor:
        for block in self:
            x = block(x, step, stats_rows)
        return x.mean(dim=(-2, -1)) if self.spatial_mean else x.flatten(-3)

    def forward_tasks(self, params: dict[str, torch.Tensor], x: torch.Tensor, step: int = 0,
                      stats_rows: int | None = None) -> torch.Tensor:
        """The body for ``T`` tasks at once: ``x`` ``(T, N, C, H, W)`` -> features ``(T, N, F)``; ``stats_rows`` as in
        ``forward``, per task.

        The tasks go side by side along channels, ``(N, T*C, H, W)``: each convolution is one grouped convolution
        (``groups=T``, task t's filters on task t's channels) and each batch norm an ordinary one over ``T*C``
        channels, whose per-channel statistics over (N, H, W) are exactly each task's own batch statistics. No
        transposes between layers, unlike ``vmap``'s batch-norm rule: about 2x faster than vmap on CPU for a
        MAML meta-batch, with the same values. ``params`` are keyed as in this module (``"0.conv.weight"``, ...).
        """
        tasks, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])
        for i, block in enumerate(self):
            conv, norm = block.conv, block.norm
            w = per_task(params[f"{i}.conv.weight"], 4, tasks)
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), None, conv.stride, conv.padding, groups=tasks)
            gain = per_task(params[f"{i}.norm.weight"], norm.weight.dim(), tasks)
            bias = per_task(params[f"{i}.norm.bias"], norm.bias.dim(), tasks)
            if norm.steps > 1:
                gain, bias = gain[:, step], bias[:, step]
            h = norm.normalise(h, gain.reshape(-1), bias.reshape(-1), stats_rows)
            h = block.act(block.pool(h))
        # Channel t*C + c is task t's channel c, so (N, T, C*h*w) holds each task's features in forward()'s order.
        h = h.mean(dim=(-2, -1)).reshape(n, tasks, -1) if self.spatial_mean else h.reshape(n, tasks, -1)
        return h.transpose(0, 1)


class Conv4(FewShotModel):
    """MAML's Conv4. ``hidden`` filters per block, ``pool`` ``max`` or ``stride``, ``bn_steps`` (MAML++) rows."""

    task = "classification"

    def __init__(self, ways: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28,
                 pool: str = "max", bn_steps: int = 1) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ModelConfigError(f"pool: must be one of {', '.join(POOLS)}, got {pool!r}")
        for name, value in (("ways", ways), ("in_channels", in_channels), ("hidden", hidden), ("bn_steps", bn_steps)):
            if not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"{name}: must be an integer >= 1, got {value!r}")
        side = image_size
        for _ in range(4):
            # max-pool: conv keeps the size (padding 1), pool floors it by 2; stride-2 conv, padding 1: ceil.
            side = side // 2 if pool == "max" else (side + 1) // 2
        if side < 1:
            raise ModelConfigError(f"image_size: {image_size} is too small for four 2x downsamplings")
        blocks = [ConvBlock(in_channels if i == 0 else hidden, hidden, pool, bn_steps) for i in range(4)]
        self.body = Conv4Body(blocks, spatial_mean=pool == "stride")
        features = hidden if pool == "stride" else hidden * side * side
        self.head = nn.Linear(features, ways)
        self.out_features, self.bn_steps, self.image_size, self.in_channels = ways, bn_steps, image_size, in_channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights, zero biases, unit BN gains (the initialisation of MAML's TensorFlow code)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, EpisodeBatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, step: int = 0, stats_rows: int | None = None) -> torch.Tensor:
        """Logits ``(N, ways)``; ``stats_rows``: batch norm with the statistics of the first rows only (see
        :class:`~models.layers.EpisodeBatchNorm2d`), for support-then-query batches scored non-transductively."""
        return self.head(self.body(x, step, stats_rows))

    def forward_tasks(self, params: dict[str, torch.Tensor], x: torch.Tensor, step: int = 0,
                      stats_rows: int | None = None) -> torch.Tensor:
        """``forward`` for ``T`` tasks at once (see :meth:`Conv4Body.forward_tasks`): ``(T, N, ways)``."""
        body = {k[len("body."):]: v for k, v in params.items() if k.startswith("body.")}
        features = self.body.forward_tasks(body, x, step, stats_rows)
        return linear_tasks(params["head.weight"], params["head.bias"], features)

    @classmethod
    def omniglot(cls, ways: int, **kwargs) -> Conv4:
        """1x28x28 grayscale, 64 filters (``pool="stride"`` for the paper's strided variant)."""
        return cls(ways, **{"in_channels": 1, "hidden": 64, "image_size": 28, **kwargs})

    @classmethod
    def mini_imagenet(cls, ways: int, **kwargs) -> Conv4:
        """3x84x84 RGB, 32 filters, max-pool, 800 features."""
        return cls(ways, **{"in_channels": 3, "hidden": 32, "image_size": 84, **kwargs})
