"""Neural Turing Machine memory addressing and writes (Graves et al. 2014, section 3), as pure tensor functions.

Every function works on a batch: memory ``M`` is ``(B, N, W)`` (N locations of width W), weightings are ``(B, N)``
and sum to 1 over the locations. The full NTM address of a head is the chain

    w_c = content_weights(M, k, beta)          # softmax_i(beta * cos(k, M(i)))
    w_g = interpolate(w_c, w_prev, g)          # g * w_c + (1 - g) * w_prev
    w_s = shift(w_g, s)                        # circular convolution with the shift distribution s
    w   = sharpen(w_s, gamma)                  # w_s^gamma / sum(w_s^gamma), gamma >= 1

and a write is ``erase_add(M, w, e, a)``: M~(i) = M(i) * (1 - w(i) e), M(i) = M~(i) + w(i) a. MANN (models/mann.py)
reads with the content weighting alone (beta = 1) and writes with LRUA instead of erase/add.

    >>> M = torch.randn(2, 128, 40); k = torch.randn(2, 40)
    >>> w = address(M, k, beta=torch.ones(2, 1), g=torch.ones(2, 1), s=torch.tensor([[0., 1., 0.]] * 2),
    ...             gamma=torch.ones(2, 1), w_prev=torch.full((2, 128), 1 / 128))
    >>> r = read(M, w)                         # (2, 40)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8


def cosine_similarity(memory: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """cos(key, M(i)) for every location: memory ``(B, N, W)``, key ``(B, W)`` -> ``(B, N)``, or R keys per memory,
    ``(B, R, W)`` -> ``(B, R, N)`` (MANN's read heads, without copying the memory once per head).

    The epsilon sits inside the norms so that a zeroed location (LRUA zeroes one before every write, and memory
    starts near zero) gives a similarity near 0 rather than NaN.
    """
    if key.dim() == 3:
        dots = torch.einsum("bnw,brw->brn", memory, key)
        return dots / (memory.norm(dim=-1).unsqueeze(1) * key.norm(dim=-1, keepdim=True) + EPS)
    dots = torch.einsum("bnw,bw->bn", memory, key)
    return dots / (memory.norm(dim=-1) * key.norm(dim=-1, keepdim=True) + EPS)


def content_weights(memory: torch.Tensor, key: torch.Tensor, beta: torch.Tensor | float = 1.0) -> torch.Tensor:
    """w_c(i) = softmax_i(beta * cos(key, M(i))); ``beta`` >= 0 is the key strength, ``(B, 1)`` or a number
    (``(B, R, 1)`` for keys ``(B, R, W)``)."""
    return torch.softmax(beta * cosine_similarity(memory, key), dim=-1)


def interpolate(w_content: torch.Tensor, w_prev: torch.Tensor, g: torch.Tensor | float) -> torch.Tensor:
    """w_g = g * w_c + (1 - g) * w_prev, with the gate ``g`` in [0, 1] (``(B, 1)`` or a number)."""
    return g * w_content + (1 - g) * w_prev


def shift(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Circular convolution of ``w`` ``(B, N)`` with a shift distribution ``s`` ``(B, S)``, S odd.

    ``s[:, j]`` is the probability of a shift by ``j - S // 2`` locations: with S = 3, ``s = [0, 0, 1]`` moves every
    weight one location up (w~(i) = w(i - 1)), ``[0, 1, 0]`` leaves it, ``[1, 0, 0]`` moves it down.
    """
    size = s.shape[-1]
    if size % 2 != 1:
        raise ValueError(f"shift: the shift distribution needs an odd number of offsets, got {size}")
    half = size // 2
    # w~(i) = sum_j w(i - (j - half)) s(j): each offset is a roll of w weighted by its probability.
    return sum(torch.roll(w, shifts=j - half, dims=-1) * s[:, j:j + 1] for j in range(size))


def sharpen(w: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    """w(i) = w~(i)^gamma / sum_j w~(j)^gamma, gamma >= 1 (gamma = 1 returns ``w`` renormalised: the identity)."""
    powered = (w + EPS) ** gamma
    return powered / powered.sum(dim=-1, keepdim=True)


def address(memory: torch.Tensor, key: torch.Tensor, *, beta, g, s, gamma, w_prev: torch.Tensor) -> torch.Tensor:
    """The whole NTM addressing chain (content, interpolation, shift, sharpening) for one head."""
    return sharpen(shift(interpolate(content_weights(memory, key, beta), w_prev, g), s), gamma)


def read(memory: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """r = sum_i w(i) M(i): ``(B, N, W)``, ``(B, N)`` -> ``(B, W)``."""
    return torch.einsum("bn,bnw->bw", w, memory)


def erase_add(memory: torch.Tensor, w: torch.Tensor, erase: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """NTM write: M~(i) = M(i) * (1 - w(i) e), then M(i) = M~(i) + w(i) a; ``e`` in [0, 1]^W, ``a`` in R^W."""
    w = w.unsqueeze(-1)
    return memory * (1 - w * erase.unsqueeze(1)) + w * add.unsqueeze(1)


class NTMHead(nn.Module):
    """Maps a controller state to one head's addressing parameters (key, beta, g, s, gamma) and, for a write head,
    its erase and add vectors; ``forward`` returns the head's new weighting (and write vectors).

    The squashing follows Graves et al.: beta = softplus (>= 0), g = sigmoid, s = softmax over the shift offsets,
    gamma = 1 + softplus (>= 1), erase = sigmoid, add unconstrained.
    """

    def __init__(self, controller_size: int, width: int, shifts: int = 3, write: bool = False):
        super().__init__()
        if shifts % 2 != 1 or shifts < 1:
            raise ValueError(f"shifts: must be an odd number >= 1, got {shifts}")
        self.width, self.shifts, self.write = width, shifts, write
        self.sizes = [width, 1, 1, shifts, 1] + ([width, width] if write else [])
        self.proj = nn.Linear(controller_size, sum(self.sizes))

    def forward(self, h: torch.Tensor, memory: torch.Tensor, w_prev: torch.Tensor):
        parts = torch.split(self.proj(h), self.sizes, dim=-1)
        key, beta, g, s, gamma = parts[:5]
        w = address(memory, key, beta=F.softplus(beta), g=torch.sigmoid(g), s=torch.softmax(s, dim=-1),
                    gamma=1 + F.softplus(gamma), w_prev=w_prev)
        if not self.write:
            return w
        return w, torch.sigmoid(parts[5]), parts[6]
