"""SNAIL (Mishra et al. 2018): a causal sequence model over (embedding(x), one-hot label) pairs, Omniglot variant.

The episode is the sequence ``[(e(s_1), y_1), ..., (e(s_n), y_n), (e(q), 0)]``, support first, the query last with
its label zeroed; the prediction is the linear read-out at the last position. ``e`` is Conv4 to 64 features. Body as
the paper's Omniglot model, with ``T = N*K + 1``:

    Attention(64, 32) -> TC(T, 128) -> Attention(256, 128) -> TC(T, 128) -> Attention(512, 256) -> Linear(N)

* Dense block (dilation d, D filters): ``a = W_f * x``, ``b = W_g * x`` with ``*`` a causal 1-d convolution of kernel
  2 and dilation d (``(W * x)_t = W_0 x_{t-d} + W_1 x_t + bias``, ``x_{t-d} = 0`` before the start);
  output ``[x, tanh(a) * sigmoid(b)]`` (concatenated on channels, so each block adds D).
* TC(T, D): ``ceil(log2 T)`` dense blocks with dilations 1, 2, 4, ...: receptive field >= T.
* Attention(k, v): ``K = x W_k``, ``Q = x W_q`` (size k), ``V = x W_v`` (size v);
  ``A = softmax_over_keys(Q K^T / sqrt(k) + causal mask)``; output ``[x, A V]``. Row t of A sums to 1 over keys
  0..t; later keys get exactly 0 (a public port normalised over the queries instead).

Several queries share one support prefix: every operation is causal, so the prefix's activations are the same in
each query's sequence. :meth:`SNAIL.episode_logits` runs the prefix once, ``(B, n, C)``, and each query as one more
position, ``(B, m, C)``, reading the prefix (the dilated conv's ``x_{n-d}``, the attention's keys and values): the
same numbers as running every query's own ``n + 1`` sequence (tests/test_snail.py checks it), for ``n + m`` steps of
work instead of ``m (n + 1)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from metatrain.models.base import ModelConfigError
from metatrain.models.metric import Conv4Embedding
from torch import nn

#: The task kind the algorithm checks for (an episode of images in, one sequence per query).
SNAIL_TASK = "snail"

Stream = tuple[torch.Tensor, torch.Tensor]
"""(prefix ``(B, n, C)``, queries ``(B, m, C)``): the support positions and each query's own last position."""


def causal_mask(n: int, device: torch.device | None = None) -> torch.Tensor:
    """``(n, n)`` bool, True where position t may see position s (s <= t)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


class DenseBlock(nn.Module):
    """Gated causal convolution (kernel 2, dilation ``dilation``); its ``filters`` outputs are appended to the input."""

    def __init__(self, channels: int, dilation: int, filters: int):
        super().__init__()
        self.dilation, self.filters = dilation, filters
        # One convolution for both halves: [filter | gate] = 2 * filters output channels.
        self.conv = nn.Conv1d(channels, 2 * filters, kernel_size=2, dilation=dilation)

    def gate(self, a: torch.Tensor) -> torch.Tensor:
        f, g = a.split(self.filters, dim=-1)
        return torch.tanh(f) * torch.sigmoid(g)

    def forward(self, stream: Stream) -> Stream:
        prefix, queries = stream
        n, d = prefix.shape[1], self.dilation
        w, b = self.conv.weight, self.conv.bias  # (2D, C, 2): tap 0 reads t - d, tap 1 reads t
        # Prefix: left-pad d zeros so output t only reads t and t - d.
        a = F.conv1d(F.pad(prefix.transpose(1, 2), (d, 0)), w, b, dilation=d).transpose(1, 2)
        # Each query sits at position n: it reads its own x_n and the prefix's x_{n-d} (zero when n - d < 0).
        aq = F.linear(queries, w[:, :, 1], b)
        if n - d >= 0:
            aq = aq + F.linear(prefix[:, n - d], w[:, :, 0]).unsqueeze(1)
        return torch.cat([prefix, self.gate(a)], -1), torch.cat([queries, self.gate(aq)], -1)


class TCBlock(nn.Sequential):
    """ceil(log2 T) dense blocks, dilations 1, 2, 4, ...: ``channels -> channels + ceil(log2 T) * filters``."""

    def __init__(self, channels: int, seq_len: int, filters: int):
        depth = max(1, math.ceil(math.log2(seq_len)))  # receptive field 1 + (1 + 2 + ... + 2^(depth-1)) >= T
        blocks = [DenseBlock(channels + i * filters, 2 ** i, filters) for i in range(depth)]
        super().__init__(*blocks)
        self.out_channels = channels + len(blocks) * filters


class AttentionBlock(nn.Module):
    """Causal single-head attention, softmax over the keys, read appended: ``channels -> channels + value_size``."""

    def __init__(self, channels: int, key_size: int, value_size: int):
        super().__init__()
        self.key, self.query, self.value = (nn.Linear(channels, key_size), nn.Linear(channels, key_size),
                                            nn.Linear(channels, value_size))
        self.scale, self.out_channels = 1.0 / math.sqrt(key_size), channels + value_size

    def weights(self, prefix: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix attention ``(B, n, n)``, query attention ``(B, m, n + 1)``; last column = the query itself).
        Each row sums to 1 over the keys it may see; a key later than the row's position gets 0."""
        k, q = self.key(prefix), self.query(prefix)
        n = prefix.shape[1]
        logits = (q @ k.transpose(1, 2)) * self.scale
        logits = logits.masked_fill(~causal_mask(n, prefix.device), float("-inf"))
        qq = self.query(queries)
        own = (qq * self.key(queries)).sum(-1, keepdim=True)  # each query sees itself, not the other queries
        qlogits = torch.cat([qq @ k.transpose(1, 2), own], -1) * self.scale
        return torch.softmax(logits, dim=-1), torch.softmax(qlogits, dim=-1)  # dim=-1: over the keys

    def forward(self, stream: Stream) -> Stream:
        prefix, queries = stream
        attn, qattn = self.weights(prefix, queries)
        v, vq = self.value(prefix), self.value(queries)
        n = prefix.shape[1]
        read_q = qattn[..., :n] @ v + qattn[..., n:] * vq
        return torch.cat([prefix, attn @ v], -1), torch.cat([queries, read_q], -1)


class SNAIL(nn.Module):
    """The Omniglot SNAIL for ``ways``-way ``shots``-shot episodes (``T = ways * shots + 1``)."""

    task = SNAIL_TASK

    def __init__(self, ways: int, shots: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28,
                 pool: str = "max"):
        super().__init__()
        for name, value in (("ways", ways), ("shots", shots), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"{name}: must be an integer >= 1, got {value!r}")
        self.ways, self.shots, self.seq_len = ways, shots, ways * shots + 1
        self.embed = Conv4Embedding(in_channels, hidden=hidden, image_size=image_size, pool=pool)
        self.out_features = ways
        c = self.embed.out_features + ways
        layers: list[nn.Module] = []
        for block in (AttentionBlock(c, 64, 32), None, (256, 128), None, (512, 256)):
            if block is None:
                block = TCBlock(c, self.seq_len, 128)
            elif isinstance(block, tuple):
                block = AttentionBlock(c, *block)
            layers.append(block)
            c = block.out_channels
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, ways)

    def forward(self, x: torch.Tensor, stats_rows: int | None = None) -> torch.Tensor:
        """The image embedding ``(n, C, H, W) -> (n, hidden)`` (what MLflow logs); batch norm with the first
        ``stats_rows`` rows' statistics (the support's), so no query changes another's embedding."""
        return self.embed(x, stats_rows=stats_rows)

    def sequence_logits(self, support: torch.Tensor, support_y: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Logits at each query's last step: support features ``(B, n, F)`` with labels ``(B, n)``, query features
        ``(B, m, F)`` -> ``(B, m, ways)``; the prefix runs once (see the module docstring)."""
        onehot = F.one_hot(support_y, self.ways).to(support.dtype)
        prefix = torch.cat([support, onehot], -1)
        queries = torch.cat([queries, queries.new_zeros(*queries.shape[:-1], self.ways)], -1)
        _, out = self.body((prefix, queries))
        return self.head(out)

    def prefix_logits(self, features: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """The plain sequence forward: ``(B, L, F)`` features and ``(B, L, ways)`` label inputs (zeros where unknown)
        -> logits at every position ``(B, L, ways)``, each seeing only itself and earlier positions."""
        x = torch.cat([features, onehot.to(features.dtype)], -1)
        out, _ = self.body((x, x[:, :0]))
        return self.head(out)

    def episode_logits(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """One episode's images to ``(m, ways)`` query logits: embed (batch norm on the support's statistics), then
        :meth:`sequence_logits`."""
        n = support_x.shape[0]
        feats = self.embed(torch.cat([support_x, query_x]), stats_rows=n)
        return self.sequence_logits(feats[None, :n], support_y[None], feats[None, n:])[0]

    def reset_parameters(self) -> None:
        self.embed.reset_parameters()
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d)):
                m.reset_parameters()
