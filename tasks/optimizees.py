"""Optimizee task families for learned optimizers: each task is a pure function of (seed, step, slot).

``QuadraticSampler`` draws the first experiment of Andrychowicz et al. 2016: f(theta) = ||W theta - y||^2 with
W (d x d) and y (d) entries N(0, 1), d = 10 in the paper. Like the episode samplers it keeps no state: the task's
generator is seeded from (seed, stream, step, slot) (``samplers.episode_rng``), so a worker that takes over a dead
worker's slot rebuilds the same task.

    >>> tasks = QuadraticSampler(dim=10, seed=0)
    >>> q = tasks.task(step=0, slot=3)                  # q.W: (10, 10), q.y: (10,)
    >>> q.loss(torch.zeros(10))                         # ||y||^2
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from metatrain.tasks.errors import EpisodeError
from metatrain.tasks.samplers import _positive_int, _stream, episode_rng


@dataclass(frozen=True)
class QuadraticTask:
    """One quadratic optimizee f(theta) = ||W theta - y||^2 (``theta`` of shape (dim,) or (batch, dim))."""

    W: torch.Tensor
    """(dim, dim) matrix, entries N(0, 1)."""
    y: torch.Tensor
    """(dim,) target, entries N(0, 1)."""
    key: tuple[int, int, int]
    """(seed, step, slot) the task was drawn from."""

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        if theta.shape[-1] != self.y.shape[0]:
            raise EpisodeError(f"theta has {theta.shape[-1]} coordinates; this quadratic has {self.y.shape[0]}")
        return ((theta @ self.W.T - self.y) ** 2).sum(-1)

    def minimum(self) -> torch.Tensor:
        """The least-squares minimiser (what an optimizer should approach; W is almost surely invertible)."""
        return torch.linalg.lstsq(self.W, self.y.unsqueeze(-1)).solution.squeeze(-1)


class QuadraticSampler:
    """Quadratic optimizees of ``dim`` coordinates; ``theta_0`` of a task is drawn with it (N(0, 1), as the paper)."""

    def __init__(self, *, dim: int = 10, seed: int = 0):
        self.dim = _positive_int("dim", dim)
        self.seed = seed
        self.stream = _stream("quadratic", str(self.dim))
        episode_rng(seed, self.stream, 0, 0)  # a bad seed fails here, not in a worker

    def task(self, step: int, slot: int) -> QuadraticTask:
        rng = episode_rng(self.seed, self.stream, step, slot)
        w = torch.from_numpy(rng.standard_normal((self.dim, self.dim))).float()
        y = torch.from_numpy(rng.standard_normal(self.dim)).float()
        return QuadraticTask(w, y, (int(self.seed), int(step), int(slot)))

    def initial_point(self, step: int, slot: int) -> torch.Tensor:
        """theta_0 of the task at (step, slot): its own stream, so it does not shift when the task's draw changes."""
        rng = episode_rng(self.seed, _stream("quadratic-theta0", str(self.dim)), step, slot)
        return torch.from_numpy(rng.standard_normal(self.dim)).float()
