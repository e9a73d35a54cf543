"""Nichol, Achiam & Schulman (2018), "On first-order meta-learning algorithms", section 5: to first order in the
inner step size alpha, with k = 2 inner steps (minibatch 1 to adapt, minibatch 2 for the meta-gradient)

    E[g_FOMAML] = A - alpha B,    E[g_MAML] = A - 2 alpha B,    E[g_Reptile] = 2A - alpha B,

with A = E[g1] (the average gradient at the initialisation) and B = E[H2 g1] (the "gradient inner product" term).
Checked on a quadratic toy problem, where everything has a closed form: linear regression with MSE, so minibatch i
has gradient g_i(phi) = (2/n) X_i^T (X_i phi - y_i) and Hessian H_i = (2/n) X_i^T X_i. The expectation is over tasks
*and* over which minibatch comes first (each task is used in both orders), which makes E[g1] = E[g2] = A and
E[H2 g1] = E[H1 g2] = B hold exactly, so the identities can be tested to rounding:

* FOMAML and Reptile are exactly linear in alpha here (A - alpha B and 2A - alpha B, no alpha^2 term at all);
* MAML is A - 2 alpha B + alpha^2 C: we check the leading terms and that the rest is exactly quadratic (its ratio
  to alpha^2 does not depend on alpha), without pinning the constant C.

Our Reptile returns ``params - adapted`` = alpha (g1 + g2(phi - alpha g1)); Nichol's g_Reptile is that / alpha.
"""

from __future__ import annotations

import pytest
import torch
from metatrain.models import SinusoidMLP
from metatrain.tasks.episode import Episode

from metatrain.pipeline.algorithms import AlgorithmConfig, fomaml, maml, reptile

D, N, TASKS = 3, 5, 6  # features, examples per minibatch, tasks


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def features(x: torch.Tensor) -> torch.Tensor:
    """The model's prediction is [x, 1] . phi (head weight and bias), so its design matrix is [X, 1]."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = SinusoidMLP(in_features=D, hidden=()).double()  # no hidden layer: a linear regression head
    g = torch.Generator().manual_seed(1)
    phi = torch.randn(D + 1, generator=g, dtype=torch.float64)
    params = {"head.weight": phi[:D].view(1, D).clone(), "head.bias": phi[D:].clone()}
    orders = []  # (minibatch 1, minibatch 2) pairs, each task in both orders
    for t in range(TASKS):
        true_w = torch.randn(D, generator=g, dtype=torch.float64)
        batches = []
        for _ in range(2):
            x = torch.randn(N, D, generator=g, dtype=torch.float64) * (1 + t % 3)
            y = (x @ true_w + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).view(N, 1)
            batches.append((x, y))
        orders += [(batches[0], batches[1]), (batches[1], batches[0])]

    def grad(x, y, at):
        f = features(x)
        return 2.0 / N * f.T @ (f @ at - y.view(-1))

    def hess(x):
        f = features(x)
        return 2.0 / N * f.T @ f

    A = torch.stack([grad(*b1, phi) for b1, _ in orders]).mean(0)
    B = torch.stack([hess(b2[0]) @ grad(*b1, phi) for b1, b2 in orders]).mean(0)
    episodes = [Episode(b1[0], b1[1], b2[0], b2[1], torch.tensor([-1]), torch.tensor([0]), (0, 0, i))
                for i, (b1, b2) in enumerate(orders)]
    return model, params, episodes, A, B


def mean_meta_gradient(module, cfg, problem) -> torch.Tensor:
    model, params, episodes, _, _ = problem
    total = 0
    for ep in episodes:
        grads, _ = module.meta_gradient(params, ep, cfg, model)
        total = total + torch.cat([grads["head.weight"].view(-1), grads["head.bias"].view(-1)])
    return total / len(episodes)


def test_fomaml_is_a_minus_alpha_b(problem):
    *_, A, B = problem
    for alpha in (0.05, 0.01):
        g = mean_meta_gradient(fomaml, AlgorithmConfig(name="fomaml", inner_lr=alpha, inner_steps=1), problem)
        torch.testing.assert_close(g, A - alpha * B, rtol=1e-10, atol=1e-12)


def test_reptile_is_two_a_minus_alpha_b(problem):
    *_, A, B = problem
    for alpha in (0.05, 0.01):
        # Two SGD steps, the first on minibatch 1 (the support set), the second on minibatch 2 (the query set).
        cfg = AlgorithmConfig(name="reptile", inner_lr=alpha, inner_steps=2, reptile_batch_size=N,
                              reptile_shuffle=False)
        g = mean_meta_gradient(reptile, cfg, problem) / alpha
        torch.testing.assert_close(g, 2 * A - alpha * B, rtol=1e-10, atol=1e-12)


def test_maml_is_a_minus_two_alpha_b_to_first_order(problem):
    *_, A, B = problem
    residuals = {}
    for alpha in (0.02, 0.01, 0.005):
        g = mean_meta_gradient(maml, AlgorithmConfig(name="maml", inner_lr=alpha, inner_steps=1), problem)
        residuals[alpha] = (g - (A - 2 * alpha * B)) / alpha**2
    # What is left after the leading terms is exactly alpha^2 times a constant: no first-order term remains.
    torch.testing.assert_close(residuals[0.02], residuals[0.005], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(residuals[0.01], residuals[0.005], rtol=1e-6, atol=1e-9)
    # And the slope at alpha -> 0 is -2B, twice FOMAML's: (g(a) - g(a/2)) / (a/2) = -2B + O(a).
    g1 = mean_meta_gradient(maml, AlgorithmConfig(name="maml", inner_lr=2e-6, inner_steps=1), problem)
    g2 = mean_meta_gradient(maml, AlgorithmConfig(name="maml", inner_lr=1e-6, inner_steps=1), problem)
    torch.testing.assert_close((g1 - g2) / 1e-6, -2 * B, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g2, A, rtol=1e-3, atol=1e-6)  # g(alpha -> 0) = A
    assert B.norm() > 0.1 * A.norm()  # the problem is not degenerate: B matters
