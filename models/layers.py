"""Layers whose forward is a pure function of (input, parameters): nothing here owns running statistics.

:class:`EpisodeBatchNorm2d` is the batch norm every model in ``models/`` uses. It always normalises with the
statistics of the batch it is given, in training *and* in eval mode, and owns no buffers: running statistics would
be mutated by every forward pass (a side effect that ``torch.func.functional_call`` cannot undo and that the
parameter server would never see), and MAML itself never used them (its TensorFlow code ran ``batch_norm`` with
``is_training`` left at its default, so every episode, at train and at test, is normalised with its own
statistics: the *transductive* setting). One episode's support set (or query set) is one batch.

With ``steps > 1`` it keeps one gain/bias row per inner-loop step (MAML++'s per-step batch-norm weights and biases,
Antoniou et al. 2019): the forward at inner step ``s`` uses row ``s``, and the post-adaptation (query) forward after
``k`` steps uses row ``k``. The statistics are still those of the current batch at that step: MAML++'s per-step
*running* statistics are deliberately not kept, for the reason above.

:class:`MaxPool2x2` is ``nn.MaxPool2d(2)`` with a faster CPU forward (same values, same gradients, ties included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EpisodeBatchNorm2d(nn.Module):
    """Batch norm over (N, H, W) with the current batch's statistics always; optional per-step gain and bias."""

    def __init__(self, channels: int, steps: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.channels, self.steps, self.eps = channels, steps, eps
        # One row per step only when asked: with steps == 1 the parameters have nn.BatchNorm2d's shapes and names,
        # so a default model is interchangeable with a stock BatchNorm2d(track_running_stats=False) one.
        shape = (channels,) if steps == 1 else (steps, channels)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor, step: int = 0, stats_rows: int | None = None) -> torch.Tensor:
        """``stats_rows``: normalise every row with the statistics of the first ``stats_rows`` rows only (a support
        set followed by its queries: the queries are then scored without seeing each other, non-transductively)."""
        weight, bias = (self.weight, self.bias) if self.steps == 1 else (self.weight[step], self.bias[step])
        return self.normalise(x, weight, bias, stats_rows)

    def normalise(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  stats_rows: int | None = None) -> torch.Tensor:
        """``x`` normalised per channel with the batch's statistics (or its first ``stats_rows`` rows'), then scaled
        by ``weight`` and shifted by ``bias`` (given: a per-step row, or Conv4's tasks side by side on channels)."""
        if stats_rows is not None and stats_rows < x.shape[0]:
            if stats_rows < 1:
                raise ValueError(f"stats_rows must be >= 1, got {stats_rows}")
            ref = x[:stats_rows]
            mean = ref.mean(dim=(0, 2, 3), keepdim=True)
            var = ref.var(dim=(0, 2, 3), unbiased=False, keepdim=True)  # biased, as F.batch_norm normalises
            # Written out: F.batch_norm's eval mode takes the statistics as constants (no gradient through them).
            shape = (1, -1, 1, 1)
            return (x - mean) * torch.rsqrt(var + self.eps) * weight.view(shape) + bias.view(shape)
        # training=True with no running buffers: batch statistics, no state written. F.batch_norm (not a
        # hand-written mean/var) because it has fused kernels, a double-backward formula and a vmap rule.
        return F.batch_norm(x, None, None, weight, bias, training=True, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.channels}, steps={self.steps}, eps={self.eps}, statistics=batch"


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, EpisodeBatchNorm2d) for m in model.modules())


def query_logits(model: nn.Module, weights: dict, support_x: torch.Tensor, query_x: torch.Tensor,
                 query_bn: str = "support") -> torch.Tensor:
    """``model``'s logits for ``query_x`` under ``weights`` (``functional_call``), batch-normalised with the support
    set's statistics (``query_bn="support"``: each query scored as if it came alone) or the query set's own
    (``"batch"``: transductive, every query's score depends on the others). A model without batch norm: plain."""
    from torch.func import functional_call

    if query_bn == "batch" or not has_batch_norm(model):
        return functional_call(model, weights, (query_x,))
    n = support_x.shape[0]
    return functional_call(model, weights, (torch.cat([support_x, query_x]),), {"stats_rows": n})[n:]


class _MaxPool2x2(torch.autograd.Function):
    """2x2/stride-2 max-pool whose forward is four strided views and elementwise ops (vectorised), and whose
    backward is ATen's own ``max_pool2d_with_indices_backward`` on indices built here.

    Why: on CPU, ATen's NCHW max-pool forward is a scalar loop; for Conv4's first block on a 75-image query set
    (75x64x28x28) it took ~15 ms of a ~75 ms MAML task, against ~5 ms here. Reusing ATen's backward keeps the
    double-backward formula (MAML differentiates through the pooling's backward) and the gradient routing exact:
    ties go to the first maximum in row-major window order, as in ATen, so values *and* gradients are identical
    to ``F.max_pool2d(x, 2)``. ``generate_vmap_rule`` lets the batched-task path vmap it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H, W = x.shape[-2:]
        h, w = H // 2, W // 2
        xc = x[..., : 2 * h, : 2 * w]  # floor mode: an odd last row/column is never the max of a full window
        a, b, c, d = xc[..., 0::2, 0::2], xc[..., 0::2, 1::2], xc[..., 1::2, 0::2], xc[..., 1::2, 1::2]
        y = torch.maximum(torch.maximum(a, b), torch.maximum(c, d))
        # Position of the first maximum in (a, b, c, d) order: row offset di, column offset dj.
        ea, eb = a == y, b == y
        di = ~(ea | eb)
        dj = ~ea & (eb | (c != y))
        base = torch.arange(h, device=x.device)[:, None] * (2 * W) + torch.arange(w, device=x.device) * 2
        idx = di.to(torch.int64).mul_(W).add_(dj).add_(base)  # flat index into the H*W plane, as ATen stores it
        return y, idx

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.shape = inputs[0].shape
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor, _grad_idx: torch.Tensor) -> torch.Tensor:
        (idx,) = ctx.saved_tensors
        # ATen reads only the shape of `self`; a zero-stride expand gives it without allocating the input size.
        shape_only = grad_y.new_empty(()).expand(ctx.shape)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad_y, shape_only, [2, 2], [2, 2], [0, 0], [1, 1],
                                                                False, idx)


#: Below this many pixels per plane ATen's pooling is faster than building indices (measured at 7x7 vs 14x14).
_FAST_POOL_MIN_PIXELS = 64


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``, exactly, with the fast CPU path for planes of at least 64 pixels."""
    if x.device.type != "cpu" or x.shape[-1] * x.shape[-2] < _FAST_POOL_MIN_PIXELS:
        return F.max_pool2d(x, 2)
    return _MaxPool2x2.apply(x)[0]


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)`` with :func:`max_pool2x2`'s faster CPU forward; identical values and gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2x2(x)
