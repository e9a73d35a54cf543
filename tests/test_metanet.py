"""Meta Networks (Munkhdalai & Yu 2017): the memory read and layer augmentation on hand-computed cases, per-example
gradients against a loop of single-example autograd, the vectorised episode against a plain per-example/per-query
loop (values and meta-gradient), finite differences, bad input, and training + eval + predict through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_stack_equals_loop, prototype_episode
from metatrain.models.learned_optimizer import preprocess
from metatrain.models.metanet import (
    TASK_CHUNKS,
    Learner,
    MetaNet,
    augmented,
    blocks_for,
    chunk_means,
    cosine_read,
    example_gradients,
)
from metatrain.tasks.episode import Episode
from mlflow.tracking import MlflowClient

from metatrain.pipeline.algorithms import AlgorithmConfig
from metatrain.pipeline.algorithms.errors import AlgorithmConfigError, TaskMismatchError
from metatrain.pipeline.algorithms.fastweight import metanet
from metatrain.pipeline.cli import main
from metatrain.pipeline.config import ConfigError, load_config
from tests.test_jobs import assert_predicts_a_user_task, predict_error_lines

CFG = AlgorithmConfig(name="metanet", lstm_p=7.0)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(ways: int = 3) -> tuple[MetaNet, dict]:
    """8x8 images: 3 conv blocks (8 -> 4 -> 2 -> 1) of 4 filters, meta-learners of 3 units, float64."""
    torch.manual_seed(0)
    model = MetaNet(ways, hidden=4, image_size=8, meta_hidden=3).double()
    with torch.no_grad():  # fast weights well away from zero, so the fast paths carry real signal in the checks
        for m in (model.task_conv, model.task_fc, model.example_conv, model.example_fc):
            m.out.weight.normal_(0.0, 0.3)
    return model, {k: v.detach().clone() for k, v in model.named_parameters()}


def episode(slot: int, ways: int = 3, shots: int = 2, queries: int = 2) -> Episode:
    e = prototype_episode(slot, ways=ways, shots=shots, queries=queries, size=8)
    return Episode(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y, e.classes, e.rotations, e.key)


# ---- equations on hand-computed cases --------------------------------------------------------------------------------


def test_memory_read_is_the_softmax_of_cosine_similarity_weighted_sum_by_hand():
    keys = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    memory = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, -1.0]], dtype=torch.float64)
    queries = torch.tensor([[1.0, 1.0], [5.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
    e = math.e
    # cos: (1/sqrt2, 1/sqrt2) -> equal weights; (1, 0) -> e/(e+1), 1/(e+1); (0, -1) -> 1/(1+e^-1), e^-1/(1+e^-1)
    w = [(0.5, 0.5), (e / (e + 1), 1 / (e + 1)), (1 / (1 + 1 / e), (1 / e) / (1 + 1 / e))]
    want = torch.tensor([[a * 1 + b * 3, a * 2 + b * 4, -b] for a, b in w], dtype=torch.float64)
    torch.testing.assert_close(cosine_read(keys, memory, queries), want)


def test_layer_augmentation_is_relu_slow_plus_relu_fast_by_hand():
    assert augmented(torch.tensor([2.0, -1.0]), torch.tensor([-3.0, 0.5])).tolist() == [2.0, 0.5]
    # one block on a 2x2 image, one filter whose only non-zero tap is the centre: conv(x) = w x per pixel
    center = lambda v: torch.zeros(1, 1, 3, 3, dtype=torch.float64).index_put_(  # noqa: E731
        (torch.tensor(0), torch.tensor(0), torch.tensor(1), torch.tensor(1)), torch.tensor(v, dtype=torch.float64))
    slow = {"conv0": center(1.0), "fc1": torch.tensor([[2.0]], dtype=torch.float64),
            "fc2": torch.tensor([[1.5]], dtype=torch.float64)}
    fast = {"conv0": center(-1.0), "fc1": torch.tensor([[-0.5]], dtype=torch.float64),
            "fc2": torch.tensor([[0.25]], dtype=torch.float64)}
    x = torch.tensor([[[[1.0, -2.0], [3.0, -4.0]]]], dtype=torch.float64)
    # slow alone: max-pool of ReLU(x) = 3; augmented: max of ReLU(x) + ReLU(-x) = |x| -> 4
    assert Learner.trunk(slow, x).item() == 3.0 and Learner.trunk(slow, x, fast).item() == 4.0
    # fc1 augmented: ReLU(2 * 4) + ReLU(-0.5 * 4) = 8; output layer linear: 1.5 * 8 + 0.25 * 8 = 14
    assert Learner.logits(slow, x, fast).item() == 14.0 and Learner.logits(slow, x).item() == 1.5 * 2 * 3
    # the key: fc1's pre-activations, slow + fast, no ReLU: 2 * 4 - 0.5 * 4 = 6
    assert Learner.key(slow, x, fast).item() == 6.0


def test_shapes_as_the_paper_at_28x28():
    model = MetaNet(5)
    assert blocks_for(28) == 5 and blocks_for(84) == 7 and blocks_for(1) == 1
    shapes = {k: tuple(v.shape) for k, v in model.base.named_parameters()}
    assert shapes == {"conv0": (64, 1, 3, 3), **{f"conv{i}": (64, 64, 3, 3) for i in range(1, 5)},
                      "fc1": (64, 64), "fc2": (5, 64)}
    assert {k: v.shape for k, v in model.keynet.named_parameters()} == \
        {k: v.shape for k, v in model.base.named_parameters()}
    assert model.task_conv.cells[0].weight_ih.shape == (80, 2) and model.task_conv.out.weight.shape == (1, 20)
    assert [tuple(m.weight.shape) for m in (model.example_fc.l1, model.example_fc.l2, model.example_fc.out)] == \
        [(20, 2), (20, 20), (1, 20)]


# ---- per-example gradients, the vectorised episode against a loop, finite differences ----------------------------


def test_per_example_gradients_equal_a_loop_of_single_example_autograd():
    model, _ = tiny()
    e = episode(0)
    w = model.base.weights()
    got = example_gradients(w, e.support_x, e.support_y)
    for i in range(len(e.support_y)):
        loss = F.cross_entropy(Learner.logits(w, e.support_x[i:i + 1]), e.support_y[i:i + 1])
        ref = torch.autograd.grad(loss, list(w.values()))
        for (k, g), r in zip(got.items(), ref):
            torch.testing.assert_close(g[i], r, rtol=1e-12, atol=1e-14, msg=k)
        assert all(g.grad_fn is None for g in got.values())  # inputs, not differentiated through
    # a chunk's mean of per-example gradients is the gradient of that chunk's mean loss
    flat = torch.cat([g.flatten(1) for g in got.values()], 1)
    loss = F.cross_entropy(Learner.logits(w, e.support_x[2:4]), e.support_y[2:4])
    ref = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(w.values()))])
    torch.testing.assert_close(chunk_means(flat, 3)[1], ref, rtol=1e-12, atol=1e-14)


def loop_logits(model: MetaNet, e: Episode) -> torch.Tensor:
    """The same episode written as the authors' loops: one backward per support example, one pass per query."""
    def grads(learner: Learner, rows: slice) -> torch.Tensor:
        w = {k: v.detach().requires_grad_(True) for k, v in learner.weights().items()}
        loss = F.cross_entropy(Learner.logits(w, e.support_x[rows]), e.support_y[rows])
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(w.values()))])

    n, n_conv = len(e.support_y), sum(p.numel() for k, p in model.keynet.named_parameters() if k.startswith("conv"))
    bounds = [len(c) for c in torch.arange(n).tensor_split(min(TASK_CHUNKS, n))]
    starts = [sum(bounds[:i]) for i in range(len(bounds))]
    key_fast = []
    for lstm, part in ((model.task_conv, slice(0, n_conv)), (model.task_fc, slice(n_conv, None))):
        state = None
        for s, b in zip(starts, bounds):
            g = grads(model.keynet, slice(s, s + b))[part]
            state = lstm.init_state(g.numel(), dtype=g.dtype) if state is None else state
            out, state = lstm(g, state)
        key_fast.append(out)
    key_w = dict(zip(model.keynet.weights(), torch.cat(key_fast).split(
        [p.numel() for p in model.keynet.weights().values()])))
    key_w = {k: v.view_as(model.keynet.weights()[k]) for k, v in key_w.items()}
    key = lambda x: Learner.key(model.keynet.weights(), x[None], key_w)[0]  # noqa: E731
    memory = []
    for i in range(n):
        g = grads(model.base, slice(i, i + 1))
        memory.append(torch.cat([model.example_conv(preprocess(g[:n_conv], model.p)),
                                 model.example_fc(preprocess(g[n_conv:], model.p))]))
    keys = [key(x) for x in e.support_x]
    rows = []
    for q in e.query_x:
        kq = key(q)
        sims = torch.stack([kq @ k / (kq.norm() * k.norm()) for k in keys])
        a = torch.exp(sims) / torch.exp(sims).sum()
        fast = model.unflatten_fast(sum(a[i] * memory[i] for i in range(n)))
        rows.append(Learner.logits(model.base.weights(), q[None], fast)[0])
    return torch.stack(rows)


def test_the_vectorised_episode_equals_the_loop_in_values_and_meta_gradient():
    model, params = tiny()
    e = episode(1, shots=2, queries=2)  # 6 support examples: 5 chunks (2 + 1 + 1 + 1 + 1)
    loss, logits = metanet.scores(params, e, CFG, model)
    ref_logits = loop_logits(model, e)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-12)
    grads, metrics = metanet.meta_gradient(params, e, CFG, model)
    ref = torch.autograd.grad(F.cross_entropy(ref_logits, e.query_y), list(model.parameters()), allow_unused=True)
    for (k, g), r in zip(grads.items(), ref):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, rtol=1e-9, atol=1e-12, msg=k)
    assert metrics["query_loss"] == pytest.approx(float(loss))
    assert float(grads["keynet.fc2"].abs().sum()) == 0.0  # only shapes the (detached) gradient inputs
    for k in ("base.conv0", "keynet.conv1", "task_conv.cells.0.weight_ih", "task_fc.out.weight",
              "example_conv.l1.weight", "example_fc.out.bias"):
        assert float(grads[k].abs().sum()) > 0, k


def test_meta_gradient_of_the_meta_learners_matches_finite_differences():
    """The LSTMs' and MLPs' weights do not touch the gradient inputs, so the loss as a function of them is exactly
    what the meta-gradient differentiates (the base and key networks also move their own inputs: not comparable)."""
    model, params = tiny()
    e = episode(2)
    grads, _ = metanet.meta_gradient(params, e, CFG, model)
    h = 1e-6
    for k, idx in (("task_conv.cells.0.weight_hh", (3, 1)), ("task_fc.out.weight", (0, 2)),
                   ("example_conv.l2.weight", (1, 0)), ("example_fc.l1.bias", (2,))):
        bumped = []
        for s in (1, -1):
            p = dict(params)
            p[k] = params[k].clone()
            p[k][idx] += s * h
            bumped.append(float(metanet.scores(p, e, CFG, model)[0]))
        assert float(grads[k][idx]) == pytest.approx((bumped[0] - bumped[1]) / (2 * h), rel=1e-5, abs=1e-9), k


def test_support_order_does_not_matter_and_the_stack_equals_the_loop():
    model, params = tiny()
    e = episode(3)
    perm = torch.tensor([2, 0, 4, 1, 3, 5])  # classes interleaved, each class's drawings in their order
    shuffled = Episode(e.support_x[perm], e.support_y[perm], e.query_x, e.query_y, e.classes, e.rotations, e.key)
    torch.testing.assert_close(metanet.scores(params, shuffled, CFG, model)[1],
                               metanet.scores(params, e, CFG, model)[1])
    assert_stack_equals_loop(metanet, params, [episode(s) for s in range(3)], CFG, model, rel=1e-9)


# ---- bad input -------------------------------------------------------------------------------------------------


def test_bad_input_is_one_line_naming_the_field():
    model, params = tiny(3)
    with pytest.raises(TaskMismatchError, match=r"^data\.ways: this MetaNet model was built for 3-way episodes "
                                                r"\(its output layer\), got 2 ways$"):
        metanet.scores(params, episode(0, ways=2), CFG, model)
    e = episode(0)
    bad = Episode(e.support_x, e.support_y, e.query_x, e.query_y + 3, e.classes, e.rotations, e.key)
    with pytest.raises(TaskMismatchError, match=r"^query_y: every query label needs support examples"):
        metanet.scores(params, bad, CFG, model)
    with pytest.raises(AlgorithmConfigError, match=r"^name: metanet needs the MetaNet model, got Linear$"):
        metanet.scores(params, e, CFG, torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=r"^data\.eval_ways must equal data\.ways for metanet"):
        load_config("configs/omniglot_metanet_5w1s.yaml", ["data.eval_ways=20"])
    with pytest.raises(ValueError, match=r"^hidden: must be an integer >= 1, got 0$"):
        MetaNet(5, hidden=0)


# ---- end to end ----------------------------------------------------------------------------------------------------


@pytest.mark.data
@pytest.mark.usefixtures("ray_module", "no_env_tracking")
def test_metanet_trains_with_two_workers_evaluates_and_predicts(omniglot_store, omniglot_dir, tmp_path, capsys):
    uri, out = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run"
    assert main(["train", "configs/omniglot_metanet_5w1s.yaml", "--out", str(out), "--tracking-uri", uri,
                 "--set", f"data.path={omniglot_store}", "--set", "model.hidden=8", "--set", "algorithm.lstm_hidden=4",
                 "--set", "train.steps=2", "--set", "train.meta_batch=2", "--set", "train.val_every=2",
                 "--set", "train.val_tasks=2", "--set", "train.eval_tasks=6", "--set", "workers.count=2",
                 "--set", "tracking.system_metrics=false"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["algorithm"] == "metanet" and summary["ways"] == 5 and summary["tasks"] == 6
    assert 0 <= summary["accuracy"] <= 1
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs(client.search_experiments()[0].experiment_id)[0]
    assert run.info.status == "FINISHED" and {"train/loss", "val/acc", "test/accuracy"} <= set(run.data.metrics)
    assert run.data.params["optim.clip_norm"] == "10.0" and run.data.params["algorithm.lstm_p"] == "7.0"
    # eval of the trained run on fresh tasks, then predict on a user's 5-class task
    assert main(["eval", "--run", run.info.run_id, "--tracking-uri", uri, "--tasks", "4", "--out",
                 str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert again["algorithm"] == "metanet" and again["tasks"] == 4 and 0 <= again["accuracy"] <= 1
    assert_predicts_a_user_task(omniglot_dir, tmp_path, run.info.run_id, uri)
    # a 5-way model asked for 3 ways
    errors = predict_error_lines(omniglot_dir, tmp_path, run.info.run_id, uri, capsys, classes=3)
    assert errors == ["metatrain: error: data.ways: this MetaNet model was built for 5-way episodes (its output "
                      "layer), got 3 ways"]
