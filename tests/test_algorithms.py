"""Algorithms: meta-gradients against finite differences and `higher`, first-order identities, the batched path
against the per-task loop, and the bad-input errors. Synthetic tensors only; tiny models, float64 where exact."""

from __future__ import annotations

import dataclasses

import higher
import pytest
import torch
import torch.nn.functional as F
from metatrain.models import Conv4, FewShotModel, SinusoidMLP
from metatrain.tasks.episode import Episode, stack_episodes
from metatrain.tasks.errors import MetatrainError
from torch import nn
from torch.func import functional_call

from metatrain.pipeline.algorithms import (
    AlgorithmConfig,
    AlgorithmConfigError,
    NonFiniteGradientError,
    TaskMismatchError,
    anil,
    evaluate_tasks,
    fomaml,
    get_algorithm,
    init_params,
    maml,
    measure_task_batching,
    meta_gradient_tasks,
    metasgd,
    reptile,
    use_batched,
)
from metatrain.pipeline.algorithms.gradient.inner_loop import LR_PREFIX

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyBody(nn.Module):
    def __init__(self, d_in: int, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, width)

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class TinyClassifier(FewShotModel):
    """4 -> 6 (tanh) -> ways: smooth, so finite differences are clean."""

    task = "classification"

    def __init__(self, ways: int = 3, d_in: int = 4, width: int = 6) -> None:
        super().__init__()
        self.body, self.head, self.out_features = TinyBody(d_in, width), nn.Linear(width, ways), ways


def vector_episode(seed: int, ways: int = 3, shots: int = 2, queries: int = 3, d: int = 4,
                   dtype=torch.float64) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.randn(ways * shots, d, generator=g, dtype=dtype), torch.arange(ways).repeat(shots),
                   torch.randn(ways * queries, d, generator=g, dtype=dtype), torch.arange(ways).repeat(queries),
                   torch.arange(ways), torch.zeros(ways, dtype=torch.int64), (0, 0, seed))


def image_episode(seed: int, ways: int = 3, shots: int = 1, queries: int = 2, side: int = 28,
                  dtype=torch.float32) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.rand(ways * shots, 1, side, side, generator=g, dtype=dtype),
                   torch.arange(ways).repeat_interleave(shots),
                   torch.rand(ways * queries, 1, side, side, generator=g, dtype=dtype),
                   torch.arange(ways).repeat_interleave(queries), torch.arange(ways),
                   torch.zeros(ways, dtype=torch.int64), (7, 1, seed))


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


def maml_query_loss(model, params, episode, lr, steps) -> torch.Tensor:
    """Independent reference: plain autograd, the textbook inner loop."""
    fast = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, fast, (episode.support_x,)), episode.support_y)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads)}
    return F.cross_entropy(functional_call(model, fast, (episode.query_x,)), episode.query_y)


# --------------------------------------------------------------------------------------------- exactness of MAML


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_matches_central_finite_differences(steps):
    torch.manual_seed(0)
    model = TinyClassifier().double()
    params, ep = params_of(model), vector_episode(1)
    cfg = AlgorithmConfig(name="maml", inner_lr=0.5, inner_steps=steps)
    grads, _ = maml.meta_gradient(params, ep, cfg, model)
    analytic = flat(grads)
    base = flat(params)
    shapes = [(k, v.shape, v.numel()) for k, v in params.items()]

    def loss_at(vec: torch.Tensor) -> float:
        p, i = {}, 0
        for k, shape, n in shapes:
            p[k] = vec[i:i + n].view(shape).requires_grad_(True)
            i += n
        return float(maml_query_loss(model, p, ep, cfg.inner_lr, steps).detach())

    eps = 1e-6
    numeric = torch.zeros_like(base)
    for i in range(base.numel()):
        e = torch.zeros_like(base)
        e[i] = eps
        numeric[i] = (loss_at(base + e) - loss_at(base - e)) / (2 * eps)
    rel = (analytic - numeric).norm() / numeric.norm()
    assert rel < 1e-5, rel


def test_maml_meta_gradient_matches_finite_differences_through_batch_norm():
    """The same on a (tiny) Conv4: batch norm, max-pool and the fast pooling's double backward included."""
    torch.manual_seed(0)
    model = Conv4(2, hidden=2, image_size=16).double()
    params = params_of(model)
    ep = image_episode(3, ways=2, shots=2, queries=2, side=16, dtype=torch.float64)
    cfg = AlgorithmConfig(name="maml", inner_lr=0.3, inner_steps=2)
    grads, _ = maml.meta_gradient(params, ep, cfg, model)
    g = torch.Generator().manual_seed(0)
    for key in ("body.0.conv.weight", "body.2.norm.weight", "body.3.norm.bias", "head.weight"):
        # A random direction per tensor: one directional derivative each, compared with central differences.
        d = torch.randn(params[key].shape, generator=g, dtype=torch.float64)
        eps = 1e-6

        def at(t, key=key, d=d):
            p = {k: (v + t * d if k == key else v).requires_grad_(True) for k, v in params.items()}
            return float(maml_query_loss(model, p, ep, cfg.inner_lr, cfg.inner_steps).detach())

        numeric = (at(eps) - at(-eps)) / (2 * eps)
        analytic = float((grads[key] * d).sum())
        assert abs(analytic - numeric) <= 1e-5 * abs(numeric) + 1e-9, (key, analytic, numeric)


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_meta_gradient_matches_higher(steps):
    torch.manual_seed(0)
    model = Conv4(3, hidden=4).double()
    ep = image_episode(5, dtype=torch.float64)
    lr = 0.2
    cfg = AlgorithmConfig(name="maml", inner_lr=lr, inner_steps=steps)
    ours, _ = maml.meta_gradient(params_of(model), ep, cfg, model)

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.cross_entropy(fmodel(ep.support_x), ep.support_y))
        query_loss = F.cross_entropy(fmodel(ep.query_x), ep.query_y)
        theirs = torch.autograd.grad(query_loss, list(model.parameters()))
    for (k, a), b in zip(ours.items(), theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=k)


# ------------------------------------------------------------------------------------------ first-order identities


def test_fomaml_is_the_query_gradient_at_the_adapted_parameters():
    torch.manual_seed(0)
    model = TinyClassifier().double()
    params, ep = params_of(model), vector_episode(2)
    cfg = AlgorithmConfig(name="fomaml", inner_lr=0.3, inner_steps=3)
    grads, metrics = fomaml.meta_gradient(params, ep, cfg, model)
    fast = fomaml.adapt(params, ep, cfg, model)
    fast = {k: v.requires_grad_(True) for k, v in fast.items()}
    loss = F.cross_entropy(functional_call(model, fast, (ep.query_x,)), ep.query_y)
    expected = torch.autograd.grad(loss, list(fast.values()))
    for (k, a), b in zip(grads.items(), expected):
        torch.testing.assert_close(a, b, msg=k)
    assert metrics["query_loss"] == pytest.approx(float(loss.detach()))


def test_reptile_one_sgd_step_is_lr_times_the_task_gradient():
    torch.manual_seed(0)
    model = TinyClassifier().double()
    params, ep = params_of(model), vector_episode(3)
    cfg = AlgorithmConfig(name="reptile", inner_lr=0.1, inner_steps=1, reptile_optimizer="sgd")
    grads, _ = reptile.meta_gradient(params, ep, cfg, model)
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    x, y = torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y])
    expected = torch.autograd.grad(F.cross_entropy(functional_call(model, p, (x,)), y), list(p.values()))
    for (k, a), b in zip(grads.items(), expected):
        torch.testing.assert_close(a, cfg.inner_lr * b, msg=k)


def test_reptile_adam_takes_sign_like_first_step():
    """Adam's first step with bias correction moves every weight by ~lr * sign(g) (a check of the update rule)."""
    torch.manual_seed(0)
    model = TinyClassifier().double()
    params, ep = params_of(model), vector_episode(3)
    cfg = AlgorithmConfig(name="reptile", inner_lr=1e-3, inner_steps=1, reptile_optimizer="adam")
    grads, _ = reptile.meta_gradient(params, ep, cfg, model)
    sgd, _ = reptile.meta_gradient(params, ep, dataclasses.replace(cfg, reptile_optimizer="sgd"), model)
    for k in grads:
        nz = sgd[k].abs() > 1e-6
        torch.testing.assert_close(grads[k][nz], 1e-3 * sgd[k][nz].sign(), rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("query_bn", ["support", "batch"])
def test_reptile_scores_queries_with_the_batch_norm_statistics_query_bn_names(query_bn):
    """support: queries normalised with the adapted model's support-set statistics, so a query's score does not
    depend on the other queries (Nichol et al.'s non-transductive setting); batch: the query set's own (their
    transductive one), so it does."""
    torch.manual_seed(0)
    model = Conv4(3, hidden=8).double()
    ep = image_episode(5, queries=4, dtype=torch.float64)
    cfg = AlgorithmConfig(name="reptile", inner_lr=0.1, inner_steps=1, eval_inner_steps=2, reptile_optimizer="sgd",
                          query_bn=query_bn)
    params = init_params(model, cfg)
    fast, n = reptile.adapt(params, ep, cfg, model, steps=2), ep.support_x.shape[0]
    if query_bn == "support":
        logits = functional_call(model, fast, (torch.cat([ep.support_x, ep.query_x]),), {"stats_rows": n})[n:]
    else:
        logits = functional_call(model, fast, (ep.query_x,))
    assert reptile.evaluate(params, ep, cfg, model)["query_loss"] == pytest.approx(
        float(F.cross_entropy(logits, ep.query_y)), rel=1e-9)
    alone = reptile.evaluate(params, dataclasses.replace(ep, query_x=ep.query_x[:1], query_y=ep.query_y[:1]), cfg,
                             model)["query_loss"]
    same = alone == pytest.approx(float(F.cross_entropy(logits[:1], ep.query_y[:1])), rel=1e-9)
    assert same == (query_bn == "support")


def test_reptile_metrics_are_the_inner_loops_first_and_last_minibatch():
    """support_* = the first minibatch with the initial parameters; query_* = the last minibatch, before the last
    step (by hand: plain SGD over the same fixed order); one full-batch step scores the same data twice."""
    torch.manual_seed(0)
    model = TinyClassifier().double()
    params, ep = params_of(model), vector_episode(3)  # 15 examples
    cfg = AlgorithmConfig(name="reptile", inner_lr=0.5, inner_steps=3, reptile_optimizer="sgd",
                          reptile_batch_size=4, reptile_shuffle=False)
    _, m = reptile.meta_gradient(params, ep, cfg, model)
    x, y = torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y])
    p = dict(params)
    seen = []
    for s in range(3):
        idx = (s * 4 + torch.arange(4)) % 15
        p = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        out = functional_call(model, p, (x[idx],))
        loss = F.cross_entropy(out, y[idx])
        seen.append((float(loss.detach()), float((out.argmax(1) == y[idx]).double().mean())))
        p = {k: v - 0.5 * g for (k, v), g in zip(p.items(), torch.autograd.grad(loss, list(p.values())))}
    assert m["support_loss"] == pytest.approx(seen[0][0], rel=1e-9)
    assert m["support_acc"] == pytest.approx(seen[0][1])
    assert m["query_loss"] == pytest.approx(seen[2][0], rel=1e-9)
    assert m["query_acc"] == pytest.approx(seen[2][1])
    assert seen[2][0] < seen[0][0]  # the last minibatch is scored by partly adapted weights
    _, one = reptile.meta_gradient(params, ep, dataclasses.replace(cfg, inner_steps=1, reptile_batch_size=0), model)
    assert one["support_loss"] == one["query_loss"] == pytest.approx(float(F.cross_entropy(
        functional_call(model, params, (x,)), y)), rel=1e-9)


def test_metasgd_with_uniform_rates_equals_maml_and_learns_its_rates():
    torch.manual_seed(0)
    model = TinyClassifier().double()
    ep = vector_episode(4)
    cfg = AlgorithmConfig(name="metasgd", inner_lr=0.3, inner_steps=2)
    params = {**params_of(model), **metasgd.init_extra_params(model, cfg)}
    grads, _ = metasgd.meta_gradient(params, ep, cfg, model)
    ref, _ = maml.meta_gradient(params_of(model), ep, dataclasses.replace(cfg, name="maml"), model)
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], msg=k)
    # d/d lr of the query loss, by central differences on one rate entry.
    key = LR_PREFIX + "head.weight"

    def at(t):
        p = dict(params)
        p[key] = params[key].clone()
        p[key][0, 0] += t
        fast = metasgd.adapt(p, ep, cfg, model)
        with torch.no_grad():
            return float(F.cross_entropy(functional_call(model, {k: fast[k] for k in ref}, (ep.query_x,)),
                                         ep.query_y))

    numeric = (at(1e-6) - at(-1e-6)) / 2e-6
    assert float(grads[key][0, 0]) == pytest.approx(numeric, rel=1e-6)


def test_metasgd_per_layer_step_rates_and_multi_step_loss():
    torch.manual_seed(0)
    model = TinyClassifier().double()
    ep = vector_episode(5)
    cfg = AlgorithmConfig(name="metasgd", inner_lr=0.2, inner_steps=3, metasgd_lr="per_layer_step",
                          multi_step_loss=True, msl_weights=(0.2, 0.3, 0.5))
    params = {**params_of(model), **metasgd.init_extra_params(model, cfg)}
    assert params[LR_PREFIX + "body.fc.weight"].shape == (3,)
    params[LR_PREFIX + "head.bias"] = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    grads, _ = metasgd.meta_gradient(params, ep, cfg, model)
    # Reference: the weighted query losses after 1, 2, 3 steps of the differentiable adapt().
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    total = 0.0
    for steps, w in zip((1, 2, 3), cfg.msl_weights):
        fast = metasgd.adapt(p, ep, cfg, model, steps=steps, create_graph=True)
        out = functional_call(model, {k: v for k, v in fast.items() if not k.startswith(LR_PREFIX)},
                              (ep.query_x,))
        total = total + w * F.cross_entropy(out, ep.query_y)
    expected = torch.autograd.grad(total, list(p.values()))
    for (k, a), b in zip(grads.items(), expected):
        torch.testing.assert_close(a, b, msg=k)
    assert metasgd.msl_weights(3, 0, 10) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    late = metasgd.msl_weights(3, 100, 10)
    assert late[:2] == pytest.approx((0.01, 0.01)) and late[2] == pytest.approx(0.98)


def test_anil_adapts_only_the_head_and_differentiates_through_it():
    torch.manual_seed(0)
    model = TinyClassifier().double()
    params, ep = params_of(model), vector_episode(6)
    cfg = AlgorithmConfig(name="anil", inner_lr=0.4, inner_steps=2)
    fast = anil.adapt(params, ep, cfg, model)
    assert torch.equal(fast["body.fc.weight"], params["body.fc.weight"])
    assert not torch.equal(fast["head.weight"], params["head.weight"])
    grads, _ = anil.meta_gradient(params, ep, cfg, model)
    # Reference: MAML's loop restricted to the head, by hand.
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    head = {k: p[k] for k in ("head.weight", "head.bias")}
    for _ in range(2):
        loss = F.cross_entropy(functional_call(model, {**p, **head}, (ep.support_x,)), ep.support_y)
        g = torch.autograd.grad(loss, list(head.values()), create_graph=True)
        head = {k: v - 0.4 * gi for (k, v), gi in zip(head.items(), g)}
    loss = F.cross_entropy(functional_call(model, {**p, **head}, (ep.query_x,)), ep.query_y)
    expected = torch.autograd.grad(loss, list(p.values()))
    for (k, a), b in zip(grads.items(), expected):
        torch.testing.assert_close(a, b, msg=k)


def test_adapt_with_create_graph_composes_into_the_meta_gradient():
    torch.manual_seed(0)
    model = TinyClassifier().double()
    params, ep = params_of(model), vector_episode(7)
    cfg = AlgorithmConfig(name="maml", inner_lr=0.3, inner_steps=2)
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    fast = maml.adapt(p, ep, cfg, model, create_graph=True)
    loss = F.cross_entropy(functional_call(model, fast, (ep.query_x,)), ep.query_y)
    expected = torch.autograd.grad(loss, list(p.values()))
    grads, _ = maml.meta_gradient(params, ep, cfg, model)
    for (k, a), b in zip(grads.items(), expected):
        torch.testing.assert_close(a, b, msg=k)


def test_checkpointed_inner_loop_gives_the_same_gradients():
    torch.manual_seed(0)
    model = Conv4(3, hidden=4, bn_steps=4).double()
    ep = image_episode(8, dtype=torch.float64)
    for name in ("maml", "metasgd", "anil"):
        cfg = AlgorithmConfig(name=name, inner_lr=0.2, inner_steps=3, per_step_bn=True, multi_step_loss=True)
        params = {**params_of(model), **get_algorithm(name).init_extra_params(model, cfg)}
        algo = get_algorithm(name)
        plain, m1 = algo.meta_gradient(params, ep, cfg, model)
        ckpt, m2 = algo.meta_gradient(params, ep, dataclasses.replace(cfg, checkpoint_inner=True), model)
        assert m1 == m2
        for k in plain:
            torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-10, atol=1e-12, msg=f"{name} {k}")


# ---------------------------------------------------------------------------------------- batched == per-task loop

BATCH_CASES = {
    "maml": dict(name="maml"),
    "maml_per_step_bn_checkpoint": dict(name="maml", per_step_bn=True, checkpoint_inner=True),
    "fomaml": dict(name="fomaml"),
    "reptile_sgd": dict(name="reptile", inner_steps=3),
    "reptile_adam_minibatch": dict(name="reptile", inner_steps=3, reptile_optimizer="adam", reptile_batch_size=2,
                                   inner_lr=1e-3),
    "reptile_transductive": dict(name="reptile", inner_steps=3, query_bn="batch"),
    "metasgd": dict(name="metasgd"),
    "metasgd_maml++": dict(name="metasgd", metasgd_lr="per_layer_step", multi_step_loss=True, per_step_bn=True),
    "anil": dict(name="anil"),
    "anil_first_order": dict(name="anil", first_order=True),
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_batched_path_equals_per_task_loop(case):
    """Float64: equal to rounding, element by element (the same mathematics). Float32: equal at float32
    tolerance; compared per tensor in norm because a ReLU or max-pool near-tie can flip under float32 rounding in
    either path and reroute a few gradient entries (seen once at 1e-3 relative, against float64 in the loop path)."""
    torch.manual_seed(0)
    settings = {"inner_lr": 0.1, "inner_steps": 2, "eval_inner_steps": 3, **BATCH_CASES[case]}
    cfg = AlgorithmConfig(**settings)
    model32 = Conv4(3, hidden=8, bn_steps=cfg.bn_steps_needed)
    model64 = Conv4(3, hidden=8, bn_steps=cfg.bn_steps_needed).double()
    model64.load_state_dict(model32.state_dict())
    eps32 = [image_episode(s) for s in range(4)]
    eps64 = [dataclasses.replace(e, support_x=e.support_x.double(), query_x=e.query_x.double()) for e in eps32]
    for model, episodes, tol in ((model64, eps64, 1e-9), (model32, eps32, 2e-3)):
        params = init_params(model, cfg)
        g_loop, n_loop, m_loop = meta_gradient_tasks(params, episodes, cfg, model, batched=False)
        g_vmap, n_vmap, m_vmap = meta_gradient_tasks(params, episodes, cfg, model, batched=True)
        assert n_loop == n_vmap == 4
        assert set(g_loop) == set(params) and all(g_loop[k].shape == params[k].shape for k in params)
        assert all(g.dtype == params[k].dtype for k, g in g_vmap.items())
        for k in g_loop:
            if tol < 1e-6:
                torch.testing.assert_close(g_vmap[k], g_loop[k], rtol=tol, atol=tol, msg=k)
            else:
                err = (g_vmap[k] - g_loop[k]).norm()
                assert err <= tol * g_loop[k].norm() + 1e-5, (k, float(err), float(g_loop[k].norm()))
        assert m_vmap == pytest.approx(m_loop, rel=max(tol, 1e-5), abs=1e-6)
        e_loop = evaluate_tasks(params, episodes, cfg, model, batched=False)
        e_vmap = evaluate_tasks(params, episodes, cfg, model, batched=True)
        assert e_vmap == pytest.approx(e_loop, rel=max(tol, 1e-5), abs=1e-6)
    # The summed gradient really is the sum of the per-task ones.
    one, _ = get_algorithm(cfg.name).meta_gradient(params, episodes[0], cfg, model)
    rest, _, _ = meta_gradient_tasks(params, episodes[1:], cfg, model, batched=False)
    for k in g_loop:
        torch.testing.assert_close(one[k] + rest[k], g_loop[k], rtol=1e-5, atol=1e-6)


def test_meta_gradient_batched_direct_call_and_regression_metrics():
    torch.manual_seed(0)
    model = SinusoidMLP(hidden=(8, 8))
    cfg = AlgorithmConfig(name="maml", inner_lr=0.01, inner_steps=1)
    g = torch.Generator().manual_seed(0)
    eps = []
    for i in range(3):
        xs, xq = torch.rand(10, 1, generator=g) * 10 - 5, torch.rand(12, 1, generator=g) * 10 - 5
        eps.append(Episode(xs, torch.sin(xs), xq, torch.sin(xq), torch.tensor([-1]), torch.tensor([0]), (0, 0, i)))
    params = init_params(model, cfg)
    grads, metrics = maml.meta_gradient_batched(params, stack_episodes(eps), cfg, model)
    assert set(metrics) == {"support_loss", "query_loss"}  # regression: MSEs, no accuracy
    loop, _, loop_metrics = meta_gradient_tasks(params, eps, cfg, model, batched=False)
    for k in grads:
        torch.testing.assert_close(grads[k], loop[k], rtol=1e-5, atol=1e-6)
    assert metrics == pytest.approx(loop_metrics, rel=1e-5)


def test_mixed_shapes_are_grouped_and_measure_picks_a_path():
    torch.manual_seed(0)
    model = Conv4(3, hidden=4, image_size=16)
    cfg = AlgorithmConfig(name="fomaml", inner_lr=0.1)
    episodes = [image_episode(0, side=16), image_episode(1, side=16, queries=3), image_episode(2, side=16)]
    params = init_params(model, cfg)
    g1, n, _ = meta_gradient_tasks(params, episodes, cfg, model, batched=True)
    g2, _, _ = meta_gradient_tasks(params, episodes, cfg, model, batched=False)
    assert n == 3
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-5)
    assert measure_task_batching(params, episodes[:2], cfg, model, repeats=1) in ("loop", "batched")
    assert not use_batched(cfg, params)  # auto: the per-task loop on a CPU
    assert use_batched(dataclasses.replace(cfg, task_batching="batched"), params)


def test_batched_path_falls_back_to_vmap_for_models_without_forward_tasks():
    torch.manual_seed(0)
    model = TinyClassifier().double()  # its body has no forward_tasks: the batched path vmaps functional_call
    episodes = [vector_episode(s) for s in range(3)]
    for name in ("maml", "anil", "reptile", "metasgd"):
        cfg = AlgorithmConfig(name=name, inner_lr=0.3, inner_steps=2)
        params = init_params(model, cfg)
        g_loop, _, m_loop = meta_gradient_tasks(params, episodes, cfg, model, batched=False)
        g_vmap, _, m_vmap = meta_gradient_tasks(params, episodes, cfg, model, batched=True)
        for k in g_loop:
            torch.testing.assert_close(g_vmap[k], g_loop[k], rtol=1e-10, atol=1e-12, msg=f"{name} {k}")
        assert m_vmap == pytest.approx(m_loop, rel=1e-6)  # accuracies are float32 means


# ------------------------------------------------------------------------------------------------ purity, metrics


def test_meta_gradient_is_pure_and_reports_metrics():
    torch.manual_seed(0)
    model = Conv4(3, hidden=4)
    ep = image_episode(0)
    params = dict(model.named_parameters())  # the module's own leaves, requiring grad
    before = {k: v.detach().clone() for k, v in params.items()}
    for name in ("maml", "fomaml", "reptile", "metasgd", "anil"):
        cfg = AlgorithmConfig(name=name, inner_lr=0.1)
        p = {**params, **get_algorithm(name).init_extra_params(model, cfg)}
        grads, metrics = get_algorithm(name).meta_gradient(p, ep, cfg, model)
        assert set(grads) == set(p) and all(grads[k].shape == p[k].shape for k in p)
        assert set(metrics) == {"support_loss", "support_acc", "query_loss", "query_acc"}
        assert all(isinstance(v, float) for v in metrics.values())
        assert 0.0 <= metrics["query_acc"] <= 1.0
        ev = get_algorithm(name).evaluate(p, ep, cfg, model)
        assert set(ev) == set(metrics)
    for k, v in model.named_parameters():
        assert v.grad is None and torch.equal(v.detach(), before[k])


def test_evaluate_uses_eval_inner_steps_and_zero_steps_scores_the_initialisation():
    torch.manual_seed(0)
    model = TinyClassifier().double()
    params, ep = params_of(model), vector_episode(9)
    cfg = AlgorithmConfig(name="maml", inner_lr=0.5, inner_steps=1, eval_inner_steps=3)
    fast = maml.adapt(params, ep, cfg, model, steps=3)
    with torch.no_grad():
        expected = float(F.cross_entropy(functional_call(model, fast, (ep.query_x,)), ep.query_y))
        at_init = float(F.cross_entropy(functional_call(model, params, (ep.query_x,)), ep.query_y))
    assert maml.evaluate(params, ep, cfg, model)["query_loss"] == pytest.approx(expected)
    assert maml.evaluate(params, ep, cfg, model, steps=0)["query_loss"] == pytest.approx(at_init)


# ------------------------------------------------------------------------------------------------------ bad input


def test_unknown_algorithm_name_suggests_the_closest():
    with pytest.raises(AlgorithmConfigError, match=r"'mamll'.*did you mean 'maml'"):
        get_algorithm("mamll")
    with pytest.raises(AlgorithmConfigError, match=r"name.*did you mean 'reptile'"):
        AlgorithmConfig(name="reptil")
    with pytest.raises(AlgorithmConfigError, match=r"did you mean 'inner_lr'"):
        AlgorithmConfig.from_dict({"inner_rl": 0.1})
    assert AlgorithmConfig.from_dict({"name": "metasgd", "msl_weights": [0.5], "multi_step_loss": True}).msl_weights \
        == (0.5,)


@pytest.mark.parametrize("settings, field", [
    (dict(inner_steps=0), "inner_steps"),
    (dict(inner_steps=-2), "inner_steps"),
    (dict(eval_inner_steps=-1), "eval_inner_steps"),
    (dict(inner_lr=0.0), "inner_lr"),
    (dict(inner_lr=-0.1), "inner_lr"),
    (dict(inner_lr=float("nan")), "inner_lr"),
    (dict(first_order=True), "first_order"),
    (dict(reptile_optimizer="rmsprop"), "reptile_optimizer"),
    (dict(metasgd_lr="per_layer"), "metasgd_lr"),
    (dict(task_batching="gpu"), "task_batching"),
    (dict(multi_step_loss=True, msl_weights=(1.0, 2.0)), "msl_weights"),
    (dict(name="reptile", multi_step_loss=True), "multi_step_loss"),
    (dict(reptile_adam_betas=(0.9, 1.5)), "reptile_adam_betas"),
    (dict(inner_steps=1.5), "inner_steps"),
])
def test_bad_settings_raise_naming_the_field(settings, field):
    with pytest.raises(AlgorithmConfigError, match=rf"^{field}:"):
        AlgorithmConfig(**settings)
    assert issubclass(AlgorithmConfigError, MetatrainError)


def test_labels_beyond_the_heads_ways_are_rejected_before_computing():
    model = Conv4(3, hidden=4)
    ep = image_episode(0, ways=3)
    bad = dataclasses.replace(ep, query_y=ep.query_y + 1)  # labels 1..3 for a 3-way head
    for name in ("maml", "fomaml", "reptile", "metasgd", "anil"):
        cfg = AlgorithmConfig(name=name)
        params = init_params(model, cfg)
        with pytest.raises(TaskMismatchError, match=r"query_y: label 3 is outside the head's 3 ways"):
            get_algorithm(name).meta_gradient(params, bad, cfg, model)
    with pytest.raises(TaskMismatchError, match="support_y"):
        maml.adapt(init_params(model, AlgorithmConfig()), (ep.support_x, ep.support_y - 1), AlgorithmConfig(), model)


def test_non_finite_gradients_name_algorithm_step_and_parameter():
    model = Conv4(3, hidden=4)
    ep = image_episode(0)
    for name, first in (("maml", "body.0.conv.weight"), ("reptile", "body.0.conv.weight"), ("anil", "head.weight")):
        cfg = AlgorithmConfig(name=name)
        params = init_params(model, cfg)
        params["head.weight"] = params["head.weight"].clone()
        params["head.weight"][0, 0] = float("nan")  # NaN logits: every gradient that reaches them is NaN
        with pytest.raises(NonFiniteGradientError, match=rf"^{name}: non-finite gradient for parameter '{first}' "
                                                         r"at inner step 0 \(episode \(7, 1, 0\); \d+ of \d+ "):
            get_algorithm(name).meta_gradient(params, ep, cfg, model)
    # A meta-gradient that overflows only in the outer pass is reported as such.
    cfg = AlgorithmConfig(name="fomaml")
    params = init_params(model, cfg)
    bad = dataclasses.replace(ep, query_x=ep.query_x.clone().fill_(float("nan")))
    with pytest.raises(NonFiniteGradientError, match=r"at the meta-gradient"):
        fomaml.meta_gradient(params, bad, cfg, model)
    # In the stacked path the message points at the offending task.
    cfg = AlgorithmConfig(name="fomaml")
    eps = [image_episode(s) for s in range(3)]
    eps[1] = dataclasses.replace(eps[1], support_x=eps[1].support_x.clone().fill_(float("inf")))
    with pytest.raises(NonFiniteGradientError, match=r"inner step 0 \(episode \(7, 1, 1\);"):
        meta_gradient_tasks(init_params(model, cfg), eps, cfg, model, batched=True)


def test_model_and_settings_must_agree():
    cfg = AlgorithmConfig(name="maml", per_step_bn=True, inner_steps=2, eval_inner_steps=3)
    with pytest.raises(AlgorithmConfigError, match="per_step_bn: the model has bn_steps=1, these settings need 4"):
        maml.meta_gradient(init_params(Conv4(3, hidden=4), cfg), image_episode(0), cfg, Conv4(3, hidden=4))
    model = Conv4(3, hidden=4, bn_steps=4)
    with pytest.raises(AlgorithmConfigError, match="per_step_bn"):
        maml.meta_gradient(init_params(model, cfg), image_episode(0), AlgorithmConfig(), model)
    with pytest.raises(AlgorithmConfigError, match=r"steps: 5 inner steps need 6 per-step batch-norm rows"):
        maml.evaluate(init_params(model, cfg), image_episode(0), cfg, model, steps=5)
    params = init_params(model, cfg)
    del params["head.bias"]
    with pytest.raises(AlgorithmConfigError, match=r"params: not the model's parameters \(missing \['head.bias'\]"):
        maml.meta_gradient(params, image_episode(0), cfg, model)
    m_cfg = AlgorithmConfig(name="metasgd")
    with pytest.raises(AlgorithmConfigError, match=r"metasgd_lr: params\['inner_lr.body.0.conv.weight'\] is missing"):
        metasgd.meta_gradient(params_of(Conv4(3, hidden=4)), image_episode(0), m_cfg, Conv4(3, hidden=4))
    with pytest.raises(TaskMismatchError, match="integer labels"):
        ep = image_episode(0)
        maml.meta_gradient(init_params(Conv4(3, hidden=4), AlgorithmConfig()),
                           dataclasses.replace(ep, query_y=ep.query_y.float()), AlgorithmConfig(), Conv4(3, hidden=4))
