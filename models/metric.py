"""Networks of the metric-based meta-learners: an embedding and a similarity instead of an inner loop.

Each model's ``forward(x)`` is its image embedding (what MLflow logs and a user embeds with); the episode-level
parts (prototypes, attention, relation scores, pair scores) are sub-modules that the algorithms in
``pipeline/algorithms/{protonet,matching,relation,siamese}.py`` run functionally on parameter subsets. Batch norm,
as everywhere here, uses the current batch's statistics (one episode's support and query images together).

    >>> net = Conv4Embedding()                       # Prototypical and Siamese embedding: 1x28x28 -> 64
    >>> net(torch.zeros(10, 1, 28, 28)).shape        # (10, 64)
    >>> MatchingNetwork(fce=True)                    # + bidirectional LSTM g and attention LSTM f over the support
    >>> RelationNetwork()                            # feature maps 64x7x7 + relation module -> score in [0, 1]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from metatrain.models.base import ModelConfigError
from metatrain.models.conv4 import Conv4, ConvBlock
from torch import nn

EMBEDDING_TASK = "embedding"


def squared_euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 for ``(n, d)`` and ``(m, d)`` -> ``(n, m)``."""
    return (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1)


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """cos(a_i, b_j) for ``(n, d)`` and ``(m, d)`` -> ``(n, m)``."""
    return F.normalize(a, dim=-1, eps=eps) @ F.normalize(b, dim=-1, eps=eps).T


def prototypes(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """v_c = mean of the features of class c: ``(n, d)``, labels ``(n,)`` in ``0..ways-1`` -> ``(ways, d)``."""
    onehot = F.one_hot(labels, ways).to(features.dtype)
    return (onehot.T @ features) / onehot.sum(0).clamp(min=1).unsqueeze(1)


class Conv4Embedding(Conv4):
    """Conv4's four blocks without the classifier head: the embedding of Prototypical, Matching and Siamese nets."""

    task = EMBEDDING_TASK

    def __init__(self, in_channels: int = 1, hidden: int = 64, image_size: int = 28, pool: str = "max"):
        super().__init__(1, in_channels=in_channels, hidden=hidden, image_size=image_size, pool=pool)
        side = image_size
        for _ in range(4):
            side = side // 2 if pool == "max" else (side + 1) // 2
        self.head = nn.Identity()
        self.out_features = hidden if pool == "stride" else hidden * side * side


class MatchingNetwork(nn.Module):
    """Vinyals et al. 2016: embeddings f (queries) and g (support) with optional full-context embeddings (FCE).

    Without FCE, f = g = the Conv4 embedding. With FCE: g(x_i) = embed(x_i) + forward and backward LSTM states over
    the support sequence (the skip connection), and f(x) runs ``read_steps`` steps of an attention LSTM over g(S):
    h_t, c_t = LSTM(f'(x), [h_{t-1}, r_{t-1}], c_{t-1}); h_t += f'(x); r_t = sum_i a(h_t, g(x_i)) g(x_i), with
    a = softmax of dot products; f(x) = h_K.
    """

    task = EMBEDDING_TASK

    def __init__(self, in_channels: int = 1, hidden: int = 64, image_size: int = 28, fce: bool = False,
                 read_steps: int = 5):
        super().__init__()
        if read_steps < 1:
            raise ModelConfigError(f"read_steps: must be >= 1, got {read_steps}")
        self.embed = Conv4Embedding(in_channels, hidden, image_size)
        d = self.embed.out_features
        self.fce, self.read_steps, self.out_features = fce, read_steps, d
        if fce:
            self.g_lstm = nn.LSTM(d, d, batch_first=True, bidirectional=True)
            self.f_lstm = nn.LSTMCell(d, 2 * d)  # hidden = [h, r] concatenated, as in the paper's formulation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def context_support(self, s: torch.Tensor) -> torch.Tensor:
        """g(S): ``(n, d)`` support embeddings -> ``(n, d)``; identity without FCE."""
        if not self.fce:
            return s
        out, _ = self.g_lstm(s.unsqueeze(0))
        d = s.shape[-1]
        return s + out[0, :, :d] + out[0, :, d:]

    def context_query(self, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """f(x): ``(m, d)`` query embeddings read ``read_steps`` times over g(S) ``(n, d)``; identity without FCE."""
        if not self.fce:
            return q
        d = q.shape[-1]
        h, c = q, torch.zeros(q.shape[0], 2 * d, device=q.device, dtype=q.dtype)
        r = torch.zeros_like(q)
        for _ in range(self.read_steps):
            hc, c = self.f_lstm(q, (torch.cat([h, r], -1), c))
            h = hc[:, :d] + q
            r = torch.softmax(h @ g.T, dim=-1) @ g
        return h

    def reset_parameters(self) -> None:
        self.embed.reset_parameters()
        if self.fce:
            self.g_lstm.reset_parameters()
            self.f_lstm.reset_parameters()


class RelationNetwork(nn.Module):
    """Sung et al. 2018: an embedding to feature maps and a relation module scoring a concatenated pair in [0, 1].

    Embedding: four conv blocks, the first two pooled (28 -> 14 -> 7), so 64 x 7 x 7 maps. Relation module: two conv
    blocks with pooling on the 128-channel concatenation (7 -> 3 -> 1), then FC(64 -> 8), ReLU, FC(8 -> 1), sigmoid.
    """

    task = EMBEDDING_TASK

    def __init__(self, in_channels: int = 1, hidden: int = 64, image_size: int = 28, relation_hidden: int = 8):
        super().__init__()
        if image_size < 16:
            raise ModelConfigError(f"image_size: relation nets need at least 16 pixels, got {image_size}")
        blocks = [ConvBlock(in_channels if i == 0 else hidden, hidden, "max" if i < 2 else "none", 1)
                  for i in range(4)]
        self.embed_blocks = nn.ModuleList(blocks)
        self.relation_blocks = nn.ModuleList([ConvBlock(2 * hidden, hidden, "max", 1),
                                              ConvBlock(hidden, hidden, "max", 1)])
        side = image_size // 4 // 2 // 2
        self.fc1 = nn.Linear(hidden * side * side, relation_hidden)
        self.fc2 = nn.Linear(relation_hidden, 1)
        self.out_features = hidden
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps ``(n, hidden, 7, 7)`` for 28x28 inputs."""
        for block in self.embed_blocks:
            x = block(x)
        return x

    def relate(self, pairs: torch.Tensor) -> torch.Tensor:
        """Relation scores in [0, 1] for concatenated feature maps ``(p, 2*hidden, h, w)`` -> ``(p,)``."""
        for block in self.relation_blocks:
            pairs = block(pairs)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pairs.flatten(1))))).squeeze(-1)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu") if isinstance(m, nn.Conv2d) \
                    else nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class SiameseNetwork(nn.Module):
    """Koch et al. 2015: a twin embedding and p(same) = sigmoid(w . |f(x_i) - f(x_j)| + b), symmetric by design."""

    task = EMBEDDING_TASK

    def __init__(self, in_channels: int = 1, hidden: int = 64, image_size: int = 28):
        super().__init__()
        self.embed = Conv4Embedding(in_channels, hidden, image_size)
        self.out_features = self.embed.out_features
        self.score = nn.Linear(self.out_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def pair_logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Logit of p(same class) for every pair: ``(n, d)``, ``(m, d)`` -> ``(n, m)``."""
        return self.score((a.unsqueeze(1) - b.unsqueeze(0)).abs()).squeeze(-1)

    def pair_logit(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Logit of p(same class) of each row's pair: ``(n, d)``, ``(n, d)`` -> ``(n,)``."""
        return self.score((a - b).abs()).squeeze(-1)

    def reset_parameters(self) -> None:
        self.embed.reset_parameters()
        self.score.reset_parameters()
