"""Models: shapes of the paper's configurations, batch norm without state, the fast max-pool's exactness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from metatrain.models import Conv4, EpisodeBatchNorm2d, ModelConfigError, SinusoidMLP, max_pool2x2
from metatrain.tasks.errors import MetatrainError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_conv4_omniglot_is_the_paper_network():
    net = Conv4.omniglot(5)
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 5)
    assert net.head.in_features == 64  # 28 -> 14 -> 7 -> 3 -> 1 with 64 filters
    # 4 convs (1->64, then 64->64, no bias: BN cancels it), 4 BN (gain+bias), head 64->5.
    assert n_params(net) == 9 * 64 + 3 * 9 * 64 * 64 + 4 * 128 + (64 * 5 + 5) == 112005
    assert all(block.conv.bias is None for block in net.body)
    assert [m.conv.stride for m in net.body] == [(1, 1)] * 4


def test_conv4_strided_variant_averages_space():
    net = Conv4.omniglot(20, pool="stride")
    assert [m.conv.stride for m in net.body] == [(2, 2)] * 4
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 20)
    assert net.head.in_features == 64


def test_conv4_mini_imagenet_config():
    net = Conv4.mini_imagenet(5)
    assert net.body[0].conv.in_channels == 3 and net.body[0].conv.out_channels == 32
    assert net.head.in_features == 32 * 5 * 5  # 84 -> 42 -> 21 -> 10 -> 5
    assert net(torch.rand(2, 3, 84, 84)).shape == (2, 5)


def test_sinusoid_mlp_is_1_40_40_1():
    net = SinusoidMLP()
    assert net(torch.rand(10, 1)).shape == (10, 1)
    assert n_params(net) == (40 + 40) + (40 * 40 + 40) + (40 + 1)
    assert net.task == "regression"


def test_batch_norm_uses_batch_statistics_and_owns_no_state():
    torch.manual_seed(0)
    net = Conv4(5, hidden=8)
    assert list(net.buffers()) == []  # no running statistics that a forward could mutate
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(6, 1, 28, 28)
    train_out = net(x)
    net.eval()
    # Same output in eval mode: always the batch's statistics (MAML's transductive setting).
    torch.testing.assert_close(net(x), train_out)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # Per-example normalisation: the output for one example depends on the rest of its batch.
    assert not torch.allclose(net(x[:3])[0], train_out[0])


def test_per_step_batch_norm_rows():
    bn = EpisodeBatchNorm2d(4, steps=3)
    assert bn.weight.shape == (3, 4)
    with torch.no_grad():
        bn.weight[2] = 2.0
        bn.bias[2] = 1.0
    x = torch.randn(5, 4, 3, 3)
    ref = F.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(bn(x, step=0), ref)
    torch.testing.assert_close(bn(x, step=2), 2 * ref + 1)
    net = Conv4(5, hidden=8, bn_steps=4)
    assert net.body[1].norm.weight.shape == (4, 8)


def test_bad_model_settings_raise_named_errors():
    with pytest.raises(MetatrainError, match="pool"):
        Conv4(5, pool="avg")
    with pytest.raises(ModelConfigError, match="image_size"):
        Conv4(5, image_size=12)
    with pytest.raises(ValueError, match="ways"):  # also a ValueError, for callers that catch that
        Conv4(0)
    with pytest.raises(ModelConfigError, match="hidden"):
        SinusoidMLP(hidden=(40, 0))


@pytest.mark.parametrize("shape", [(3, 4, 28, 28), (2, 3, 14, 14), (2, 3, 9, 11), (2, 1, 7, 7)])
def test_fast_max_pool_matches_aten_values_gradients_and_double_backward(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    x[..., :4, :4] = 0.5  # ties, as in the blank background of Omniglot images
    x.requires_grad_(True)
    v = torch.randn_like(F.max_pool2d(x, 2))
    outs = {}
    for name, pool in (("aten", lambda t: F.max_pool2d(t, 2)), ("fast", max_pool2x2)):
        vv = v.clone().requires_grad_(True)
        y = pool(x)
        (g,) = torch.autograd.grad((y * vv).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad((g * torch.cos(x.detach())).sum(), vv)
        outs[name] = (y.detach(), g.detach(), gg)
    for a, b in zip(outs["aten"], outs["fast"]):
        assert torch.equal(a, b)


def test_fast_max_pool_under_vmap():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 16, 16, requires_grad=True)
    y = torch.vmap(max_pool2x2)(x)
    torch.testing.assert_close(y, F.max_pool2d(x.flatten(0, 1), 2).view(3, 4, 2, 8, 8))
    (g1,) = torch.autograd.grad(y.square().sum(), x)
    (g2,) = torch.autograd.grad(F.max_pool2d(x.flatten(0, 1), 2).square().sum(), x)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("kwargs", [dict(), dict(pool="stride"), dict(bn_steps=3)])
def test_conv4_forward_tasks_equals_per_task_forward(kwargs):
    """The grouped-convolution forward for T tasks: per-task and shared parameters, as the batched path uses."""
    torch.manual_seed(0)
    net = Conv4(4, hidden=6, image_size=16, **kwargs).double()
    tasks = 3
    x = torch.rand(tasks, 5, 1, 16, 16, dtype=torch.float64)
    shared = {k: v.detach() for k, v in net.named_parameters()}
    per_task = {k: v + 0.1 * torch.randn(tasks, *v.shape, dtype=v.dtype) for k, v in shared.items()}
    mixed = {k: (per_task[k] if k.startswith("head") else shared[k]) for k in shared}  # ANIL's layout
    for params in (shared, per_task, mixed):
        out = net.forward_tasks(params, x, step=2 if net.bn_steps > 1 else 0)
        for t in range(tasks):
            p = {k: (v[t] if v.dim() > shared[k].dim() else v) for k, v in params.items()}
            kw = {"step": 2} if net.bn_steps > 1 else {}
            torch.testing.assert_close(out[t], torch.func.functional_call(net, p, (x[t],), kw))


def test_mlp_forward_tasks_equals_per_task_forward():
    torch.manual_seed(0)
    net = SinusoidMLP(hidden=(7, 5)).double()
    x = torch.rand(4, 10, 1, dtype=torch.float64)
    params = {k: v.detach() + 0.1 * torch.randn(4, *v.shape, dtype=v.dtype) for k, v in net.named_parameters()}
    out = net.forward_tasks(params, x)
    for t in range(4):
        torch.testing.assert_close(out[t], torch.func.functional_call(net, {k: v[t] for k, v in params.items()},
                                                                      (x[t],)))
