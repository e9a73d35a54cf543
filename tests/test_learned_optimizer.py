"""Learned optimizers (#18, shared piece): log/sign preprocessing against hand-computed values, the coordinate-wise
LSTM's shapes, weight sharing and batching, the meta cell against its printed equations and as exact SGD, and the
LSTM weights' gradients against finite differences (torch.autograd.gradcheck)."""

from __future__ import annotations

import math

import pytest
import torch
from metatrain.models import ModelConfigError, SinusoidMLP
from metatrain.models.learned_optimizer import (
    DEFAULT_P,
    CoordinateLSTM,
    LSTMState,
    MetaLSTMCell,
    ParamLayout,
    preprocess,
)
from torch.func import functional_call

D = torch.float64

# ---- preprocessing -------------------------------------------------------------------------------------------------


def test_preprocess_matches_hand_computed_values_on_both_sides_of_the_threshold():
    x = torch.tensor([100.0, 1.0, 1e-3, -math.exp(-5), 1e-6, -1e-6, 0.0], dtype=D)
    expected = torch.tensor([
        [math.log(100) / 10, 1.0],     # |x| >= e^-10: (log|x| / p, sign x)
        [0.0, 1.0],
        [math.log(1e-3) / 10, 1.0],    # -0.6908
        [-0.5, -1.0],                  # log(e^-5) / 10
        [-1.0, math.exp(10) * 1e-6],   # |x| < e^-10 = 4.54e-5: (-1, e^p x) = (-1, 0.0220)
        [-1.0, -math.exp(10) * 1e-6],
        [-1.0, 0.0],                   # 0: the linear branch, no log(0)
    ], dtype=D)
    assert DEFAULT_P == 10.0
    torch.testing.assert_close(preprocess(x), expected, rtol=0, atol=1e-15)


def test_preprocess_p5_moves_the_threshold_to_e_minus_5():
    x = torch.tensor([1e-3, 0.1], dtype=D)
    # e^-5 = 6.7e-3: 1e-3 is in the linear branch at p = 5 but the log branch at p = 10.
    torch.testing.assert_close(preprocess(x, p=5.0), torch.tensor(
        [[-1.0, math.exp(5) * 1e-3], [math.log(0.1) / 5, 1.0]], dtype=D), rtol=0, atol=1e-15)
    torch.testing.assert_close(preprocess(x, p=10.0), torch.tensor(
        [[math.log(1e-3) / 10, 1.0], [math.log(0.1) / 10, 1.0]], dtype=D), rtol=0, atol=1e-15)


@pytest.mark.parametrize("p", [5.0, 10.0])
def test_preprocess_is_continuous_at_the_threshold(p):
    t = math.exp(-p)
    below, above = preprocess(torch.tensor([t * (1 - 1e-9), -t * (1 - 1e-9)], dtype=D), p), \
        preprocess(torch.tensor([t * (1 + 1e-9), -t * (1 + 1e-9)], dtype=D), p)
    torch.testing.assert_close(below, above, rtol=0, atol=1e-8)
    torch.testing.assert_close(above, torch.tensor([[-1.0, 1.0], [-1.0, -1.0]], dtype=D), rtol=0, atol=1e-8)


def test_preprocess_keeps_the_shape_and_has_a_finite_gradient_at_zero():
    assert preprocess(torch.zeros(3, 4)).shape == (3, 4, 2)
    x = torch.tensor([0.0, 1e-7, 2.0], dtype=D, requires_grad=True)
    preprocess(x).sum().backward()
    # d/dx: e^p in the linear branch (0 and 1e-7), 1 / (p x) in the log branch; never NaN from log(0).
    torch.testing.assert_close(x.grad, torch.tensor([math.exp(10), math.exp(10), 1 / 20], dtype=D))


@pytest.mark.parametrize("p", [0.0, -1.0, float("nan")])
def test_preprocess_rejects_a_non_positive_p(p):
    with pytest.raises(ModelConfigError, match="p: must be > 0"):
        preprocess(torch.ones(2), p)


# ---- flattening ----------------------------------------------------------------------------------------------------


def test_param_layout_round_trips_and_keeps_gradients_flowing():
    params = dict(SinusoidMLP(hidden=(5, 3)).named_parameters())
    layout = ParamLayout.of(params)
    flat = layout.flatten(params)
    assert flat.shape == (layout.numel,) == (sum(p.numel() for p in params.values()),)
    back = layout.unflatten(flat)
    assert list(back) == list(params)
    assert all(torch.equal(back[k], params[k]) for k in params)
    leaf = flat.detach().requires_grad_()
    sum(t.sum() for t in layout.unflatten(leaf).values()).backward()
    assert torch.equal(leaf.grad, torch.ones_like(leaf))


def test_param_layout_rejects_mismatched_inputs():
    layout = ParamLayout.of({"a": torch.zeros(2, 3), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match="named"):
        layout.flatten({"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="a: expected shape"):
        layout.flatten({"a": torch.zeros(3, 2), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match="10 coordinates"):
        layout.unflatten(torch.zeros(9))


# ---- CoordinateLSTM ------------------------------------------------------------------------------------------------


def model_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    x = torch.linspace(-2, 2, 16)[:, None]
    loss = (model(x) - torch.sin(x)).pow(2).mean()
    names, params = zip(*model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params)))


def test_coordinate_lstm_update_has_the_shape_of_the_flattened_gradients():
    torch.manual_seed(0)
    model, opt = SinusoidMLP(hidden=(8, 8)), CoordinateLSTM()
    assert (opt.hidden, opt.layers, opt.output_scale, opt.p) == (20, 2, 0.1, 10.0)
    grads = model_grads(model)
    layout = ParamLayout.of(grads)
    state = opt.init_state(layout.numel)
    assert len(state.h) == len(state.c) == 2
    assert all(t.shape == (layout.numel, 20) and not t.any() for t in (*state.h, *state.c))
    update, state = opt(layout.flatten(grads), state)
    assert update.shape == (layout.numel,) and update.dtype == torch.float32
    assert all(t.shape == (layout.numel, 20) for t in (*state.h, *state.c))
    new = layout.unflatten(layout.flatten(dict(model.named_parameters())) + update)
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in grads.items()}
    # The output scale bounds the step: |linear(h)| <= sum |W| + |b| with |h| < 1.
    bound = opt.output_scale * (opt.out.weight.abs().sum() + opt.out.bias.abs()).item()
    assert update.abs().max().item() <= bound


def test_coordinate_lstm_is_deterministic_under_a_seed():
    grad = torch.randn(50, generator=torch.Generator().manual_seed(1))
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        opt = CoordinateLSTM()
        state = opt.init_state(50)
        ups = []
        for _ in range(3):
            up, state = opt(grad, state)
            ups.append(up)
        runs.append(torch.stack(ups))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(124)
    assert not torch.equal(CoordinateLSTM()(grad, CoordinateLSTM().init_state(50))[0], runs[0][0])


def test_coordinate_lstm_is_coordinate_wise_with_shared_weights():
    """A coordinate's update depends on its own gradient history only, whatever tensor it sits in."""
    torch.manual_seed(0)
    opt = CoordinateLSTM(use_loss=True)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(12, generator=gen) * 10 ** torch.randint(-6, 1, (12,), generator=gen) for _ in range(3)]
    perm = torch.randperm(12, generator=gen)
    full, sub = opt.init_state(12), opt.init_state(5)
    for t, g in enumerate(grads):
        up_full, full = opt(g, full, loss=1.0 + t)
        up_sub, sub = opt(g[perm[:5]], sub, loss=1.0 + t)
        torch.testing.assert_close(up_sub, up_full[perm[:5]], rtol=1e-6, atol=1e-9)
    # The same numbers split into two tensors or kept as one give the same flat vector, hence the same update.
    split = {"w": grads[0][:8].view(2, 4), "b": grads[0][8:]}
    one = {"all": grads[0]}
    a = opt(ParamLayout.of(split).flatten(split), opt.init_state(12), loss=2.0)[0]
    b = opt(ParamLayout.of(one).flatten(one), opt.init_state(12), loss=2.0)[0]
    assert torch.equal(a, b)
    assert torch.equal(ParamLayout.of(split).unflatten(a)["b"], a[8:])


@pytest.mark.parametrize("sizes", [[(30,), (2, 5)], [(3,)] * 10 + [(2, 5), (1,)]])
def test_coordinate_lstm_makes_one_cell_call_per_layer_per_step(sizes):
    opt = CoordinateLSTM(hidden=4, layers=3)
    calls = []
    for cell in opt.cells:
        cell.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    grads = {f"p{i}": torch.randn(s) for i, s in enumerate(sizes)}
    layout = ParamLayout.of(grads)
    state = opt.init_state(layout.numel)
    for _ in range(2):
        _, state = opt(layout.flatten(grads), state)
    # 2 steps x 3 layers, each over all coordinates at once, however many tensors the model has.
    assert calls == [layout.numel] * 6


def test_coordinate_lstm_equals_torch_nn_lstm_with_the_same_weights():
    torch.manual_seed(0)
    opt = CoordinateLSTM(hidden=6, layers=2).double()
    ref = torch.nn.LSTM(2, 6, num_layers=2).double()
    with torch.no_grad():
        for layer, cell in enumerate(opt.cells):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ref, f"{kind}_l{layer}").copy_(getattr(cell, kind))
    grads = torch.randn(4, 9, dtype=D)  # 4 steps of 9 coordinates
    state, ups = opt.init_state(9), []
    for g in grads:
        up, state = opt(g, state)
        ups.append(up)
    hs, _ = ref(preprocess(grads))  # (steps, coordinates, hidden): the coordinates are the batch
    torch.testing.assert_close(torch.stack(ups), opt.out(hs).squeeze(-1) * 0.1)


def test_coordinate_lstm_checks_its_inputs():
    opt = CoordinateLSTM(hidden=3)
    state = opt.init_state(4)
    with pytest.raises(ValueError, match="flat"):
        opt(torch.zeros(2, 2), state)
    with pytest.raises(ValueError, match="state was made for 4"):
        opt(torch.zeros(5), state)
    with pytest.raises(ValueError, match="use_loss"):
        opt(torch.zeros(4), state, loss=1.0)
    with pytest.raises(ValueError, match="use_loss"):
        CoordinateLSTM(hidden=3, use_loss=True)(torch.zeros(4), state)
    with pytest.raises(ValueError, match="scalar"):
        CoordinateLSTM(hidden=3, use_loss=True)(torch.zeros(4), state, loss=torch.ones(2))
    for kwargs, match in (({"hidden": 0}, "hidden"), ({"layers": 1.5}, "layers"), ({"output_scale": 0}, "output"),
                          ({"p": -5}, "p: must")):
        with pytest.raises(ModelConfigError, match=match):
            CoordinateLSTM(**kwargs)
    with pytest.raises(ModelConfigError, match="n_coords"):
        opt.init_state(0)


def test_lstm_state_detach_cuts_the_graph():
    opt = CoordinateLSTM(hidden=3)
    _, state = opt(torch.randn(4), opt.init_state(4))
    assert all(t.grad_fn is not None for t in state.h)
    cut = state.detach()
    assert isinstance(cut, LSTMState) and all(t.grad_fn is None for t in (*cut.h, *cut.c))


# ---- MetaLSTMCell --------------------------------------------------------------------------------------------------


def test_meta_cell_initialisation_starts_as_gradient_descent():
    torch.manual_seed(0)
    cell = MetaLSTMCell()
    assert cell.hidden == 20 and cell.w_f.shape == cell.w_i.shape == (22,)
    assert 4 <= cell.b_f.item() <= 6 and -5 <= cell.b_i.item() <= -4
    others = [p for n, p in cell.named_parameters() if n not in ("b_f", "b_i")]
    assert len(others) == 6 and all(p.abs().max() <= 0.01 for p in others)
    c0, grad = torch.randn(100), torch.randn(100)
    state = cell.init_state(100)
    c1, state = cell(grad, 1.5, c0, state)
    assert state.f.min() > 0.98 and 0.006 < state.i.min() <= state.i.max() < 0.02
    with pytest.raises(ModelConfigError, match="forget_bias"):
        MetaLSTMCell(forget_bias=(6.0, 4.0))


def by_hand(cell: MetaLSTMCell, grad, loss, c_prev, h, c, f_prev, i_prev):
    """The LSTM cell (PyTorch's gate order i, f, g, o) and the meta cell, written out from the printed equations."""
    x = torch.cat([preprocess(torch.tensor(loss, dtype=D)).expand(len(grad), 2), preprocess(grad)], -1)
    z = x @ cell.lstm.weight_ih.T + cell.lstm.bias_ih + h @ cell.lstm.weight_hh.T + cell.lstm.bias_hh
    zi, zf, zg, zo = z.chunk(4, -1)
    c = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
    h = torch.sigmoid(zo) * torch.tanh(c)
    n = cell.hidden
    f = torch.sigmoid(h @ cell.w_f[:n] + cell.w_f[n] * c_prev + cell.w_f[n + 1] * f_prev + cell.b_f)
    i = torch.sigmoid(h @ cell.w_i[:n] + cell.w_i[n] * c_prev + cell.w_i[n + 1] * i_prev + cell.b_i)
    return f * c_prev + i * (-grad), h, c, f, i


def test_meta_cell_update_equals_the_printed_equations():
    torch.manual_seed(0)
    cell = MetaLSTMCell(hidden=5, init_range=0.5).double()  # large weights, so every term of the equations counts
    gen = torch.Generator().manual_seed(3)
    c_t = torch.randn(7, generator=gen, dtype=D)
    state = cell.init_state(7)
    ref = (c_t, state.h, state.c, state.f, state.i)
    for step, loss in enumerate([2.3, 0.7, 1e-6]):
        grad = torch.randn(7, generator=gen, dtype=D) * 10.0 ** -step
        c_t, state = cell(grad, loss, c_t, state)
        ref = by_hand(cell, grad, loss, *ref)
        for got, want in zip((c_t, state.h, state.c, state.f, state.i), ref):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_meta_cell_with_f_one_and_i_lr_is_exactly_sgd(dtype):
    cell = MetaLSTMCell(hidden=4).to(dtype)
    with torch.no_grad():
        cell.w_f.zero_()
        cell.w_i.zero_()
        cell.b_f.fill_(100.0)  # sigmoid(100) rounds to exactly 1
    target = torch.linspace(-1, 1, 6, dtype=dtype)
    for lr, b_i in ((0.5, 0.0), (0.01, math.log(0.01 / 0.99))):
        with torch.no_grad():
            cell.b_i.fill_(b_i)
        c = sgd = torch.full((6,), 3.0, dtype=dtype)
        state = cell.init_state(6)
        for _ in range(5):
            grad = 2 * (c - target)  # the gradient of ||c - target||^2
            c, state = cell(grad, (c - target).pow(2).sum(), c, state)
            assert torch.equal(state.f, torch.ones(6, dtype=dtype))
            # i = sigmoid(b_I) = lr: exactly for 0.5; logit(0.01) comes back to 0.01 only to rounding (1e-7 in float32).
            assert (state.i == lr).all() if lr == 0.5 else (state.i - lr).abs().max() < 1e-7
            sgd = sgd - state.i * (2 * (sgd - target))
            assert torch.equal(c, sgd)
        if lr == 0.5:  # lr 0.5 on this quadratic jumps to the minimum in one step
            assert torch.equal(c, target)


def test_meta_cell_checks_its_inputs():
    cell = MetaLSTMCell(hidden=3)
    state = cell.init_state(4)
    with pytest.raises(ValueError, match="c_prev"):
        cell(torch.zeros(4), 1.0, torch.zeros(5), state)
    with pytest.raises(ValueError, match="state was made for 4"):
        cell(torch.zeros(3), 1.0, torch.zeros(3), state)
    with pytest.raises(ValueError, match="scalar"):
        cell(torch.zeros(4), torch.ones(4), torch.zeros(4), state)
    assert all(t.grad_fn is None for t in vars(cell(torch.ones(4), 1.0, torch.ones(4), state)[1].detach()).values())


# ---- gradients of the LSTM weights ---------------------------------------------------------------------------------


def test_coordinate_lstm_weight_gradients_match_finite_differences():
    torch.manual_seed(0)
    opt = CoordinateLSTM(hidden=3, layers=2, use_loss=True).double()
    names, values = zip(*((n, p.detach().clone().requires_grad_()) for n, p in opt.named_parameters()))
    grads = torch.tensor([[0.3, -2.0, 1e-6, 0.05], [-0.1, 0.7, 2e-3, -4.0]], dtype=D)

    def unroll(*weights):
        params, state, theta = dict(zip(names, weights)), opt.init_state(4), torch.zeros(4, dtype=D)
        for t, g in enumerate(grads):
            up, state = functional_call(opt, params, (g, state), {"loss": 0.5 + t})
            theta = theta + up
        return theta

    assert torch.autograd.gradcheck(unroll, values, eps=1e-6, atol=1e-7)


def test_meta_cell_weight_gradients_match_finite_differences():
    torch.manual_seed(0)
    cell = MetaLSTMCell(hidden=3, init_range=0.3).double()
    names, values = zip(*((n, p.detach().clone().requires_grad_()) for n, p in cell.named_parameters()))
    c0 = torch.tensor([0.5, -1.0, 2.0], dtype=D, requires_grad=True)  # the learned c_0 the algorithm will own
    grads = torch.tensor([[0.3, -2.0, 1e-6], [-0.1, 0.7, 2e-3]], dtype=D)

    def unroll(c, *weights):
        params, state = dict(zip(names, weights)), cell.init_state(3)
        for g, loss in zip(grads, (1.2, 0.4)):
            c, state = functional_call(cell, params, (g, loss, c, state))
        return c

    assert torch.autograd.gradcheck(unroll, (c0, *values), eps=1e-6, atol=1e-7)
