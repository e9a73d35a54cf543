"""Optimizee task families: deterministic in (seed, step, slot), the quadratic's values, bad input."""

from __future__ import annotations

import pytest
import torch
from metatrain.tasks.errors import EpisodeError
from metatrain.tasks.optimizees import QuadraticSampler


def test_a_quadratic_task_is_a_pure_function_of_seed_step_slot():
    a, b = QuadraticSampler(dim=10, seed=3), QuadraticSampler(dim=10, seed=3)
    t = a.task(5, 2)
    assert t.W.shape == (10, 10) and t.y.shape == (10,) and t.key == (3, 5, 2)
    assert torch.equal(t.W, b.task(5, 2).W) and torch.equal(t.y, b.task(5, 2).y)
    assert torch.equal(a.initial_point(5, 2), b.initial_point(5, 2))
    others = [a.task(5, 3), a.task(6, 2), QuadraticSampler(dim=10, seed=4).task(5, 2)]
    assert all(not torch.equal(t.W, o.W) for o in others)
    # N(0, 1) entries: over 200 tasks the mean and variance are close to 0 and 1.
    w = torch.stack([a.task(0, s).W for s in range(200)])
    assert abs(w.mean().item()) < 0.02 and abs(w.var().item() - 1) < 0.03


def test_quadratic_loss_values_and_minimum():
    t = QuadraticSampler(dim=4, seed=0).task(0, 0)
    theta = torch.arange(4.0)
    assert torch.allclose(t.loss(theta), ((t.W @ theta - t.y) ** 2).sum())
    assert torch.allclose(t.loss(torch.zeros(4)), (t.y ** 2).sum())
    assert t.loss(t.minimum()).item() < 1e-8
    batch = torch.stack([theta, torch.zeros(4)])
    assert torch.allclose(t.loss(batch), torch.stack([t.loss(theta), t.loss(torch.zeros(4))]))
    with pytest.raises(EpisodeError, match="theta has 3 coordinates; this quadratic has 4"):
        t.loss(torch.zeros(3))


@pytest.mark.parametrize("kw, message", [({"dim": 0}, "dim must be a positive integer"),
                                         ({"seed": -1}, "seed must be a non-negative integer")])
def test_bad_sampler_settings_name_the_field(kw, message):
    with pytest.raises(EpisodeError, match=message):
        QuadraticSampler(**kw)
