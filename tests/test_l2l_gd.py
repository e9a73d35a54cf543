"""Learning to learn by gradient descent by gradient descent: the truncated unroll's meta-gradient against a
hand-written reference, the truncation, training lowering held-out quadratic losses, both training modes, bad
input, and LearnedOptimizer training a fresh MLP in a plain PyTorch loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from metatrain.models import CoordinateLSTM
from metatrain.tasks.optimizees import MLPSampler, QuadraticSampler

from metatrain.pipeline.algorithms.errors import AlgorithmConfigError
from metatrain.pipeline.algorithms.learned import l2l_gd
from metatrain.pipeline.learned_optimizer import LearnedOptimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_gradient(phi, task, opt, unroll, truncation):
    """Written out: per window, theta_{t+1} = theta_t + m(detached grad f(theta_t)); d(sum f(theta_t))/d phi."""
    theta = task.init_params()["theta"].clone()
    state = opt.init_state(theta.numel())
    total = {k: torch.zeros_like(v) for k, v in phi.items()}
    for begin in range(0, unroll, truncation):
        w = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
        theta, state = theta.detach(), state.detach()
        meta = 0.0
        for t in range(begin, begin + truncation):
            g = torch.func.grad(lambda th, t=t: task.loss({"theta": th}, t))(theta.detach())
            meta = meta + task.loss({"theta": theta}, t)
            update, state = torch.func.functional_call(opt, w, (g, state))
            theta = theta + update
        for k, gk in zip(w, torch.autograd.grad(meta, list(w.values()), allow_unused=True)):
            total[k] += gk if gk is not None else 0
    return total


def test_trajectory_gradient_matches_the_written_out_truncated_unroll():
    opt = CoordinateLSTM(hidden=5, layers=2)
    phi = l2l_gd.fresh_weights(opt, seed=0)
    task = QuadraticSampler(dim=4, seed=0).task(0, 0)
    got, metrics = l2l_gd.trajectory_gradient(phi, task, opt, unroll=6, truncation=3)
    want = reference_gradient(phi, task, opt, 6, 3)
    for k in phi:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    assert metrics["loss_first"] == pytest.approx(float(task.loss(task.init_params(), 0)))
    # the truncation matters: one window of 6 gives another gradient than two of 3
    whole, _ = l2l_gd.trajectory_gradient(phi, task, opt, unroll=6, truncation=6)
    assert not torch.allclose(whole["out.weight"], got["out.weight"])


def test_training_on_quadratics_lowers_held_out_losses_in_both_modes():
    opt = CoordinateLSTM()
    phi = l2l_gd.fresh_weights(opt, seed=0)
    train, heldout = QuadraticSampler(seed=0), [QuadraticSampler(seed=1).task(0, s) for s in range(10)]

    def final(w):
        return sum(l2l_gd.optimize(w, t, opt, 100)[0][-1] for t in heldout) / len(heldout)

    before = final(phi)
    for per_window in (False, True):
        w, history = l2l_gd.train_in_process(phi, (train.task(i, 0) for i in range(25)), opt, unroll=40,
                                             truncation=20, lr=1e-2, per_window=per_window)
        assert len(history) == 25 and final(w) < 0.5 * before, per_window
        assert not torch.equal(w["out.weight"], phi["out.weight"])


def test_bad_input_is_one_clear_error():
    opt = CoordinateLSTM()
    task = QuadraticSampler(seed=0).task(0, 0)
    phi = l2l_gd.fresh_weights(opt)
    with pytest.raises(AlgorithmConfigError, match="^unroll: 10 steps is shorter than its truncation window of 20"):
        l2l_gd.trajectory_gradient(phi, task, opt, unroll=10, truncation=20)
    with pytest.raises(AlgorithmConfigError, match="^truncation: must be an integer >= 1"):
        l2l_gd.check_unroll(100, 0)
    other = l2l_gd.fresh_weights(CoordinateLSTM(hidden=8))
    with pytest.raises(AlgorithmConfigError, match="not the weights of a 2-layer, 20-unit coordinate-wise LSTM"):
        l2l_gd.trajectory_gradient(other, task, opt, unroll=20, truncation=20)


def test_learned_optimizer_trains_a_fresh_mlp_in_a_plain_loop(tmp_path):
    opt = CoordinateLSTM()
    digits = MLPSampler(seed=0)
    phi, _ = l2l_gd.train_in_process(l2l_gd.fresh_weights(opt, seed=0), (digits.task(i, 0) for i in range(15)),
                                     opt, unroll=40, truncation=20, lr=1e-2, per_window=True)
    path = tmp_path / "lstm.pt"
    torch.save(phi, path)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 20), torch.nn.Sigmoid(), torch.nn.Linear(20, 10))
    x, y = digits.task(0, 0).x, digits.task(0, 0).y
    optimizer = LearnedOptimizer(net.parameters(), weights=path)
    start = float(F.cross_entropy(net(x), y).detach())
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(len(x), (128,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        optimizer.step()
    end = float(F.cross_entropy(net(x), y).detach())
    assert end < 0.7 * start, (start, end)
    assert all("h" in optimizer.state[p] for p in net.parameters())
    with pytest.raises(AlgorithmConfigError, match="not the weights of a 2-layer, 8-unit"):
        LearnedOptimizer(net.parameters(), weights=path, hidden=8)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AlgorithmConfigError, match="is not a saved dict of tensors"):
        LearnedOptimizer(net.parameters(), weights=tmp_path / "junk.pt")
    with pytest.raises(AlgorithmConfigError, match="exactly one of weights=, run=, model="):
        LearnedOptimizer(net.parameters())
