"""The key-value memory module of Kaiser et al. 2017 ("Learning to Remember Rare Events"), and its conv encoder.

Memory M = (K, V, A): ``K`` keys ``(size, key_size)``, each row unit-length (or all zeros while the slot is empty),
``V`` integer values (labels; -1 = empty) and ``A`` ages. A query ``q`` is the encoder's L2-normalised output.

    nearest      the k slots of largest q . K[i] among the filled ones; n1 = the nearest; prediction V[n1]
    loss         p = the nearest of the k with V[p] = v (if none of the k has it, the nearest slot anywhere with
                 V = v), b = the nearest of the k with V[b] != v; loss = max(0, q.K[b] - q.K[p] + alpha), alpha 0.1
    update       V[n1] = v:  K[n1] <- normalise(q + K[n1]), A[n1] <- 0
                 otherwise:  n' = a slot of the largest age (ties drawn at random), K[n'] <- q, V[n'] <- v, A[n'] <- 0
                 every other age += 1

The memory is *state*, not a parameter: keys are stored detached (the paper stops the gradient at the memory), so the
loss trains the encoder through ``q`` alone. In a few-shot episode the memory starts empty, the support examples are
written in order, and each query is scored and predicted against it (queries are not written: they would leak
into each other's predictions). Where the loss needs a slot that does not exist (no slot holds v, or every filled slot
holds v) that query contributes 0.

    >>> enc = KeyEncoder(key_size=128)
    >>> mem = Memory.empty(size=128, key_size=128)
    >>> for q, v in zip(enc(support_x), support_y): mem = mem.update(q.detach(), int(v), generator)
    >>> loss, correct = mem.loss(enc(query_x), query_y, k=256, margin=0.1), mem.predict(enc(query_x)) == query_y
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from metatrain.models.base import ModelConfigError
from metatrain.models.conv4 import Conv4

EMPTY = -1


@dataclass(frozen=True)
class Memory:
    """(K, V, A); every method returns a new Memory (the old one is left as it was)."""

    keys: torch.Tensor
    """``(size, key_size)`` float: unit rows, or zero rows for empty slots."""
    values: torch.Tensor
    """``(size,)`` int64 labels, ``EMPTY`` (-1) for empty slots."""
    ages: torch.Tensor
    """``(size,)`` int64 steps since the slot was last written or hit."""

    @classmethod
    def empty(cls, size: int, key_size: int, device: torch.device | str = "cpu") -> Memory:
        if size < 1 or key_size < 1:
            raise ModelConfigError(f"memory size and key_size must be >= 1, got {size} and {key_size}")
        return cls(torch.zeros(size, key_size, device=device), torch.full((size,), EMPTY, device=device),
                   torch.zeros(size, dtype=torch.long, device=device))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def similarities(self, q: torch.Tensor) -> torch.Tensor:
        """q . K[i] for queries ``(n, key_size)`` -> ``(n, size)``; empty slots are -inf (never a neighbour)."""
        sims = q @ self.keys.T
        return sims.masked_fill(self.values == EMPTY, float("-inf"))

    def nearest(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities, slot indices) of the ``k`` nearest slots per query, nearest first: ``(n, k)`` each."""
        return torch.topk(self.similarities(q), min(k, self.size), dim=-1)

    def predict(self, q: torch.Tensor) -> torch.Tensor:
        """V[n1] per query (``EMPTY`` when the memory is empty)."""
        return self.values[self.similarities(q).argmax(-1)]

    def loss(self, q: torch.Tensor, v: torch.Tensor, k: int = 256, margin: float = 0.1) -> torch.Tensor:
        """Per-query memory loss ``(n,)`` (see the module docstring); differentiable in ``q``."""
        sims = self.similarities(q)
        top_sims, top_idx = torch.topk(sims, min(k, self.size), dim=-1)
        top_vals = self.values[top_idx]
        filled = torch.isfinite(top_sims)
        neg_inf = torch.tensor(float("-inf"), device=q.device, dtype=sims.dtype)
        match = top_vals == v[:, None]
        # Positive: the best matching neighbour; if none of the k matches, the best matching slot anywhere.
        pos_top = torch.where(match & filled, top_sims, neg_inf).max(-1).values
        pos_any = torch.where(self.values[None, :] == v[:, None], sims, neg_inf).max(-1).values
        pos = torch.where(torch.isfinite(pos_top), pos_top, pos_any)
        neg = torch.where(~match & filled, top_sims, neg_inf).max(-1).values
        ok = torch.isfinite(pos) & torch.isfinite(neg)
        # Zero the missing ones before subtracting: -inf - -inf is NaN, and a NaN stays in the backward pass.
        pos, neg = torch.where(ok, pos, 0.0), torch.where(ok, neg, 0.0)
        return torch.where(ok, F.relu(neg - pos + margin), 0.0)

    def update(self, q: torch.Tensor, v: int, generator: torch.Generator | None = None) -> Memory:
        """Write one (query, value): average into the nearest slot if it holds ``v``, else the oldest slot."""
        q = q.detach()
        keys, values, ages = self.keys.clone(), self.values.clone(), self.ages + 1
        sims = self.similarities(q[None])[0]
        n1 = int(sims.argmax()) if bool(torch.isfinite(sims).any()) else -1
        if n1 >= 0 and int(values[n1]) == v:
            keys[n1] = F.normalize(q + keys[n1], dim=0)
            ages[n1] = 0
        else:
            oldest = (ages == ages.max()).nonzero().flatten()
            pick = torch.randint(len(oldest), (1,), generator=generator).item() if len(oldest) > 1 else 0
            slot = int(oldest[pick])
            keys[slot], values[slot], ages[slot] = q, v, 0
        return Memory(keys, values, ages)

    def write_all(self, qs: torch.Tensor, vs: torch.Tensor, generator: torch.Generator | None = None) -> Memory:
        """``update`` with each row of ``qs`` in order."""
        mem = self
        for q, v in zip(qs, vs.tolist()):
            mem = mem.update(q, int(v), generator)
        return mem


class KeyEncoder(Conv4):
    """Conv4 trunk + linear layer to ``key_size``, L2-normalised: the memory module's query (replaces the softmax)."""

    task = "memory"

    def __init__(self, key_size: int = 128, in_channels: int = 1, hidden: int = 64, image_size: int = 28,
                 pool: str = "max"):
        if not isinstance(key_size, int) or key_size < 1:
            raise ModelConfigError(f"key_size: must be an integer >= 1, got {key_size!r}")
        super().__init__(key_size, in_channels=in_channels, hidden=hidden, image_size=image_size, pool=pool)
        self.key_size = key_size

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        return F.normalize(super().forward(x, step), dim=-1)
