"""SNAIL (Mishra et al. 2018): each defining equation on a hand-computed case, the shared support prefix against each
query's own sequence, gradients, batched against the loop, bad input, and training + predict through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_stack_equals_loop, prototype_episode
from metatrain.models.snail import SNAIL, AttentionBlock, DenseBlock, TCBlock, causal_mask
from metatrain.tasks.episode import Episode
from mlflow.tracking import MlflowClient

from metatrain.pipeline.algorithms import AlgorithmConfig
from metatrain.pipeline.algorithms.errors import TaskMismatchError
from metatrain.pipeline.algorithms.sequence import snail
from metatrain.pipeline.cli import main
from metatrain.pipeline.config import ConfigError, load_config
from tests.test_jobs import assert_predicts_a_user_task, predict_error_lines

CFG = AlgorithmConfig(name="snail")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(ways: int = 3, shots: int = 2, dtype=torch.float64) -> tuple[SNAIL, dict]:
    torch.manual_seed(0)
    model = SNAIL(ways, shots, hidden=4).to(dtype)
    return model, {k: v.detach().clone() for k, v in model.named_parameters()}


def episode(slot: int, ways: int = 3, shots: int = 2, queries: int = 2, dtype=torch.float64) -> Episode:
    e = prototype_episode(slot, ways=ways, shots=shots, queries=queries)
    return Episode(e.support_x.to(dtype), e.support_y, e.query_x.to(dtype), e.query_y, e.classes, e.rotations, e.key)


def set_linear(layer: torch.nn.Linear, weight: float) -> None:
    with torch.no_grad():
        layer.weight.fill_(weight)
        layer.bias.zero_()


# ---- equations on hand-computed cases --------------------------------------------------------------------------------


def test_attention_is_causal_and_normalised_over_the_keys_by_hand():
    att = AttentionBlock(1, key_size=1, value_size=1).double()
    for layer in (att.key, att.query, att.value):
        set_linear(layer, 1.0)
    x = torch.tensor([[[1.0], [2.0], [3.0]]], dtype=torch.float64)  # one sequence, positions 0, 1, 2
    a, _ = att.weights(x, x[:, :0])
    # logits(t, s) = q_t k_s / sqrt(1) = x_t x_s on s <= t; softmax over s (the keys)
    want = torch.tensor([[1, 0, 0],
                         [math.exp(2) / (math.exp(2) + math.exp(4)), math.exp(4) / (math.exp(2) + math.exp(4)), 0],
                         [*(torch.softmax(torch.tensor([3.0, 6.0, 9.0], dtype=torch.float64), 0).tolist())]],
                        dtype=torch.float64)
    torch.testing.assert_close(a[0], want)
    torch.testing.assert_close(a[0].sum(-1), torch.ones(3, dtype=torch.float64))  # each row over the keys: 1
    assert not torch.allclose(a[0].sum(0), torch.ones(3, dtype=torch.float64))  # over the queries: not 1
    out, _ = att((x, x[:, :0]))
    torch.testing.assert_close(out[0], torch.cat([x[0], want @ x[0]], -1))  # [x, A V], V = x
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_dense_block_is_a_gated_dilated_causal_conv_concatenated_to_its_input_by_hand():
    block = DenseBlock(1, dilation=2, filters=1).double()
    with torch.no_grad():  # filter half: 0.5 x_{t-2} + 2 x_t + 0.1; gate half: -1 x_{t-2} + 1 x_t + 0.2
        block.conv.weight.copy_(torch.tensor([[[0.5, 2.0]], [[-1.0, 1.0]]]))
        block.conv.bias.copy_(torch.tensor([0.1, 0.2]))
    xs = [0.3, -0.7, 1.1, 0.4]
    x = torch.tensor(xs, dtype=torch.float64).view(1, 4, 1)
    out, _ = block((x, x[:, :0]))
    prev = lambda t: xs[t - 2] if t >= 2 else 0.0  # noqa: E731 - zero before the start
    want = [math.tanh(0.5 * prev(t) + 2 * xs[t] + 0.1) * (1 / (1 + math.exp(-(-prev(t) + xs[t] + 0.2))))
            for t in range(4)]
    assert out.shape == (1, 4, 2) and torch.equal(out[0, :, 0], x[0, :, 0])  # the input, then the new channel
    torch.testing.assert_close(out[0, :, 1], torch.tensor(want, dtype=torch.float64))


def test_tc_block_has_ceil_log2_t_dense_blocks_with_doubling_dilations():
    for seq_len, n in ((2, 1), (6, 3), (21, 5), (26, 5), (101, 7)):
        tc = TCBlock(10, seq_len, 128)
        assert [b.dilation for b in tc] == [2 ** i for i in range(n)]
        assert [b.conv.in_channels for b in tc] == [10 + 128 * i for i in range(n)]
        assert tc.out_channels == 10 + 128 * n


def test_channels_grow_as_the_paper_5w1s():
    model = SNAIL(5, 1)  # T = 6: ceil(log2 6) = 3 dense blocks per TC
    widths = [m.out_channels for m in model.body]
    assert widths == [69 + 32, 101 + 384, 485 + 128, 613 + 384, 997 + 256] and model.head.in_features == 1253
    assert model.seq_len == 6 and model.embed.out_features == 64


def test_no_position_sees_a_later_one():
    model, _ = tiny()
    feats = torch.randn(1, 7, 4, dtype=torch.float64)
    labels = F.one_hot(torch.tensor([[0, 0, 1, 1, 2, 2, 0]]), 3).double()
    base = model.prefix_logits(feats, labels)
    for t in range(7):
        changed = feats.clone()
        changed[0, t] += 1.0
        out = model.prefix_logits(changed, labels)
        assert torch.equal(out[0, :t], base[0, :t]) and not torch.allclose(out[0, t], base[0, t])


# ---- the shared prefix, gradients, batching --------------------------------------------------------------------------


def alone(model: SNAIL, e: Episode) -> torch.Tensor:
    """Each query's own n + 1 sequence through the plain forward: its last-step logits ``(queries, ways)``."""
    n, rows = len(e.support_y), []
    for q in e.query_x:
        feats = model(torch.cat([e.support_x, q[None]]), stats_rows=n)
        labels = torch.cat([F.one_hot(e.support_y, model.ways).double(), torch.zeros(1, model.ways).double()])
        rows.append(model.prefix_logits(feats[None], labels[None])[0, -1])
    return torch.stack(rows)


def test_queries_sharing_the_prefix_equal_each_querys_own_sequence_values_and_gradients():
    model, params = tiny()
    e = episode(0, queries=3)
    loss, logits = snail.scores(params, e, CFG, model)
    torch.testing.assert_close(logits, alone(model, e), rtol=1e-12, atol=1e-12)
    # gradients: the split path's meta-gradient against autograd through every query's own sequence
    grads, metrics = snail.meta_gradient(params, e, CFG, model)
    ref_loss = F.cross_entropy(alone(model, e), e.query_y)
    ref = torch.autograd.grad(ref_loss, list(model.parameters()), allow_unused=True)
    for (k, g), r in zip(grads.items(), ref):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, rtol=1e-9, atol=1e-12, msg=k)
    assert metrics["query_loss"] == pytest.approx(float(ref_loss.detach()))
    # and one coordinate against central finite differences
    k = "body.2.value.weight"
    h, bumped = 1e-6, []
    for s in (1, -1):
        p = dict(params)
        p[k] = params[k].clone()
        p[k][0, 0] += s * h
        bumped.append(float(snail.scores(p, e, CFG, model)[0]))
    assert float(grads[k][0, 0]) == pytest.approx((bumped[0] - bumped[1]) / (2 * h), rel=1e-5, abs=1e-9)


def test_support_is_read_in_label_order_and_batched_equals_the_loop():
    model, params = tiny()
    e = episode(1)
    perm = torch.tensor([2, 0, 4, 1, 3, 5])  # classes interleaved, each class's drawings in their order
    shuffled = Episode(e.support_x[perm], e.support_y[perm], e.query_x, e.query_y, e.classes, e.rotations, e.key)
    torch.testing.assert_close(snail.scores(params, shuffled, CFG, model)[1], snail.scores(params, e, CFG, model)[1])
    assert_stack_equals_loop(snail, params, [episode(s) for s in range(3)] + [shuffled], CFG, model)


# ---- bad input -------------------------------------------------------------------------------------------------


def test_bad_input_is_one_line_naming_the_field():
    model, params = tiny(3, 2)
    with pytest.raises(TaskMismatchError, match=r"^data\.shots: 9 support images \+ the query = 10 steps exceed this "
                                                r"SNAIL model's T = 7"):
        snail.scores(params, episode(0, shots=3), CFG, model)
    with pytest.raises(TaskMismatchError, match=r"^data\.ways: this SNAIL model was built for 3-way episodes"):
        snail.scores(params, episode(0, ways=2, shots=2), CFG, model)
    e = episode(0)
    bad = Episode(e.support_x, e.support_y, e.query_x, e.query_y + 3, e.classes, e.rotations, e.key)
    with pytest.raises(TaskMismatchError, match=r"^query_y: every query label needs support examples"):
        snail.scores(params, bad, CFG, model)
    with pytest.raises(ConfigError, match=r"^data\.eval_ways must equal data\.ways for snail"):
        load_config("configs/omniglot_snail_5w1s.yaml", ["data.eval_ways=20"])
    assert snail.scores(params, episode(0, shots=1), CFG, model)[1].shape == (6, 3)  # shorter than T: fine


# ---- end to end ----------------------------------------------------------------------------------------------------


@pytest.mark.data
@pytest.mark.usefixtures("ray_module", "no_env_tracking")
def test_snail_trains_with_two_workers_evaluates_and_predicts(omniglot_store, omniglot_dir, tmp_path, capsys):
    uri, out = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run"
    assert main(["train", "configs/omniglot_snail_5w1s.yaml", "--out", str(out), "--tracking-uri", uri,
                 "--set", f"data.path={omniglot_store}", "--set", "model.hidden=8", "--set", "train.steps=2",
                 "--set", "train.meta_batch=4", "--set", "train.val_every=2", "--set", "train.val_tasks=4",
                 "--set", "train.eval_tasks=10", "--set", "workers.count=2",
                 "--set", "tracking.system_metrics=false"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["algorithm"] == "snail" and summary["ways"] == 5 and summary["tasks"] == 10
    assert 0 <= summary["accuracy"] <= 1
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs(client.search_experiments()[0].experiment_id)[0]
    assert run.info.status == "FINISHED" and {"train/loss", "val/acc", "test/accuracy"} <= set(run.data.metrics)
    assert_predicts_a_user_task(omniglot_dir, tmp_path, run.info.run_id, uri)
    # a 5-way model asked for 3 ways
    errors = predict_error_lines(omniglot_dir, tmp_path, run.info.run_id, uri, capsys, classes=3)
    assert errors == ["metatrain: error: data.ways: this SNAIL model was built for 5-way episodes (its one-hot labels "
                      "and head), got 3 ways"]
    # eval at more shots than the model's T was built for: the checkpoint is refused, one line
    assert main(["eval", "--run", run.info.run_id, "--tracking-uri", uri, "--tasks", "4", "--out",
                 str(tmp_path / "ev"), "--set", "data.shots=2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "checkpoint was written for a different model or config" in errors[0]


def test_the_checkpoint_fingerprint_holds_the_shots_even_where_the_shapes_agree():
    from metatrain.pipeline.components import build_model, fingerprint

    five, six = (load_config("configs/omniglot_snail_5w5s.yaml", [f"data.shots={k}"]) for k in (5, 6))
    m5, m6 = build_model(five, (1, 28, 28)), build_model(six, (1, 28, 28))
    # T = 26 and 31: ceil(log2 T) = 5 dense blocks both, the same parameters, yet a 5-shot model is not a 6-shot one
    assert [p.shape for p in m5.parameters()] == [p.shape for p in m6.parameters()]
    assert (m5.seq_len, m6.seq_len) == (26, 31) and fingerprint(five, m5) != fingerprint(six, m6)
