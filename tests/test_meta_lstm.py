"""The LSTM meta-learner (meta_lstm): its unroll against the printed equations, its meta-gradient against finite
differences of the cell-state chain, batch-norm modes, support batches, the batched path, bad input, and the
algorithm end to end through `metatrain train`, `metatrain evaluate` and `metatrain predict`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from metatrain.models import Conv4, MetaLSTMCell, ParamLayout
from metatrain.models.layers import query_logits
from metatrain.tasks.episode import Episode
from mlflow.tracking import MlflowClient

from metatrain.pipeline.algorithms import AlgorithmConfig, init_params, meta_gradient_tasks, meta_lstm
from metatrain.pipeline.algorithms.errors import AlgorithmConfigError, TaskMismatchError
from metatrain.pipeline.cli import main
from tests.test_jobs import assert_predicts_a_user_task, user_task


def tiny(dtype=torch.float32, ways=3, hidden=2, size=16):
    torch.manual_seed(0)
    model = Conv4(ways, in_channels=1, hidden=hidden, image_size=size).to(dtype)
    return model


def episode(ways=3, shots=1, queries=2, size=16, dtype=torch.float32, slot=0):
    g = torch.Generator().manual_seed(slot)
    sx = torch.rand(ways * shots, 1, size, size, generator=g, dtype=dtype)
    qx = torch.rand(ways * queries, 1, size, size, generator=g, dtype=dtype)
    return Episode(sx, torch.arange(ways).repeat_interleave(shots), qx, torch.arange(ways).repeat_interleave(queries),
                   torch.arange(ways), torch.zeros(ways, dtype=torch.long), (0, 1, slot))


def cfg(**kw):
    return AlgorithmConfig(name="meta_lstm", **{"inner_steps": 3, "eval_inner_steps": 3, **kw})


def params_for(model, c, dtype=torch.float32):
    return {k: v.to(dtype) for k, v in init_params(model, c).items()}


def by_hand(params, ep, c, model):
    """The unroll written from the paper's equations, with an nn.LSTMCell holding the LSTM weights."""
    learner = {k: v for k, v in params.items() if not k.startswith("meta_lstm.")}
    w = {k[len("meta_lstm."):]: v for k, v in params.items() if k.startswith("meta_lstm.")}
    layout = ParamLayout.of(learner)
    theta = layout.flatten(learner)
    n = theta.shape[0]
    h = cell = torch.zeros(n, c.lstm_hidden, dtype=theta.dtype)
    f_prev = i_prev = torch.zeros(n, dtype=theta.dtype)
    lstm = torch.nn.LSTMCell(4, c.lstm_hidden).to(theta.dtype)
    for _ in range(c.inner_steps):
        x = theta.detach().requires_grad_(True)
        loss = F.cross_entropy(torch.func.functional_call(model, layout.unflatten(x), (ep.support_x,)), ep.support_y)
        (grad,) = torch.autograd.grad(loss, x)
        inp = torch.cat([meta_lstm_preprocess(loss.detach().expand(n), c.lstm_p),
                         meta_lstm_preprocess(grad, c.lstm_p)], -1)
        h, cell = torch.func.functional_call(lstm, {k[len("lstm."):]: v for k, v in w.items()
                                                    if k.startswith("lstm.")}, (inp, (h, cell)))
        f = torch.sigmoid(h @ w["w_f"][:-2] + theta * w["w_f"][-2] + f_prev * w["w_f"][-1] + w["b_f"])
        i = torch.sigmoid(h @ w["w_i"][:-2] + theta * w["w_i"][-2] + i_prev * w["w_i"][-1] + w["b_i"])
        theta = f * theta - i * grad
        f_prev, i_prev = f, i
    return layout.unflatten(theta)


def meta_lstm_preprocess(x, p):
    """Andrychowicz et al.'s rule, written out: (log|x|/p, sign x) if |x| >= e^-p else (-1, e^p x)."""
    big = x.abs() >= torch.exp(torch.tensor(-p, dtype=x.dtype))
    first = torch.where(big, torch.log(x.abs().clamp_min(1e-300)) / p, torch.full_like(x, -1.0))
    second = torch.where(big, torch.sign(x), x * torch.exp(torch.tensor(p, dtype=x.dtype)))
    return torch.stack([first, second], -1)


def test_adapt_follows_the_printed_equations():
    model, c = tiny(torch.float64), cfg()
    params, ep = params_for(model, c, torch.float64), episode(dtype=torch.float64)
    got = meta_lstm.adapt(params, ep, c, model)
    want = by_hand(params, ep, c, model)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(got[k], params[k]) for k in params if k.startswith("meta_lstm."))


def test_meta_gradient_matches_finite_differences_of_the_cell_state_chain():
    """With the learner's losses and gradients held fixed (the paper's independence assumption), the query loss is a
    function of c_0 and the LSTM weights alone; its central differences must equal the meta-gradient."""
    model, c = tiny(torch.float64), cfg(inner_steps=2)
    params, ep = params_for(model, c, torch.float64), episode(dtype=torch.float64)
    grads, metrics = meta_lstm.meta_gradient(params, ep, c, model)
    assert set(grads) == set(params) and all(grads[k].shape == params[k].shape for k in params)
    assert metrics["query_loss"] > 0 and 0 <= metrics["query_acc"] <= 1
    learner = {k: v for k, v in params.items() if not k.startswith("meta_lstm.")}
    layout = ParamLayout.of(learner)
    cell = MetaLSTMCell(hidden=c.lstm_hidden).double()
    inputs = []  # (gradient, loss) at each update, recorded once at the unperturbed parameters
    theta, state = layout.flatten(learner), cell.init_state(layout.numel)
    w = {k[len("meta_lstm."):]: v for k, v in params.items() if k.startswith("meta_lstm.")}
    for _ in range(c.inner_steps):
        x = theta.detach().requires_grad_(True)
        loss = F.cross_entropy(torch.func.functional_call(model, layout.unflatten(x), (ep.support_x,)), ep.support_y)
        (g,) = torch.autograd.grad(loss, x)
        inputs.append((g, loss.detach()))
        theta, state = torch.func.functional_call(cell, w, (g, loss.detach(), theta, state))

    def query_loss(p):
        th = layout.flatten({k: v for k, v in p.items() if not k.startswith("meta_lstm.")})
        ww = {k[len("meta_lstm."):]: v for k, v in p.items() if k.startswith("meta_lstm.")}
        st = cell.init_state(layout.numel)
        for g, loss in inputs:
            th, st = torch.func.functional_call(cell, ww, (g, loss, th, st))
        logits = query_logits(model, layout.unflatten(th), ep.support_x, ep.query_x, c.query_bn)
        return float(F.cross_entropy(logits, ep.query_y))

    gen = torch.Generator().manual_seed(1)
    checked = 0
    for key in ("meta_lstm.w_f", "meta_lstm.w_i", "meta_lstm.b_f", "meta_lstm.b_i", "meta_lstm.lstm.weight_ih",
                "meta_lstm.lstm.bias_hh", "head.weight", "body.0.conv.weight"):
        for _ in range(2):
            idx = int(torch.randint(params[key].numel(), (1,), generator=gen))
            eps = 1e-6
            up, down = dict(params), dict(params)
            up[key], down[key] = bump(params[key], idx, eps), bump(params[key], idx, -eps)
            fd = (query_loss(up) - query_loss(down)) / (2 * eps)
            assert grads[key].view(-1)[idx].item() == pytest.approx(fd, rel=1e-4, abs=1e-8), key
            checked += 1
    assert checked == 16


def bump(t, idx, eps):
    out = t.clone()
    out.view(-1)[idx] += eps
    return out


def test_query_bn_support_scores_each_query_alone_and_batch_does_not():
    model, ep = tiny(), episode(queries=3)
    for mode, alone in (("support", True), ("batch", False)):
        c = cfg(query_bn=mode)
        params = params_for(model, c)
        learner = {k: v for k, v in params.items() if not k.startswith("meta_lstm.")}
        every = query_logits(model, learner, ep.support_x, ep.query_x, c.query_bn)
        first = query_logits(model, learner, ep.support_x, ep.query_x[:1], c.query_bn)
        assert torch.allclose(every[:1], first, atol=1e-5) == alone, mode


def test_support_batches_are_a_pure_function_of_the_key_and_whole_batches():
    a = meta_lstm.support_batches((0, 3, 7), 25, 10, 6)
    assert [t.tolist() for t in a] == [t.tolist() for t in meta_lstm.support_batches((0, 3, 7), 25, 10, 6)]
    assert all(len(t) == 10 for t in a)
    assert len(set(torch.cat(a[:2]).tolist())) == 20  # one pass: 2 whole batches of distinct images (5 dropped)
    assert a[0].tolist() != meta_lstm.support_batches((0, 3, 8), 25, 10, 6)[0].tolist()
    assert meta_lstm.support_batches((0, 0, 0), 5, 0, 3) == [None] * 3
    assert meta_lstm.support_batches((0, 0, 0), 5, 5, 2) == [None] * 2


def test_the_batched_path_equals_the_task_loop():
    model, c = tiny(), cfg(inner_steps=2, support_batch=2)
    params = params_for(model, c)
    eps = [episode(shots=2, slot=s) for s in range(3)]
    loop, n1, m1 = meta_gradient_tasks(params, eps, c, model, batched=False)
    stacked, n2, m2 = meta_gradient_tasks(params, eps, c, model, batched=True)
    assert n1 == n2 == 3
    for k in loop:
        torch.testing.assert_close(loop[k], stacked[k], rtol=1e-5, atol=1e-7)
    assert m1 == pytest.approx(m2)


def test_bad_input_is_one_clear_error():
    model, c = tiny(), cfg()
    params = params_for(model, c)
    ep = episode()
    with pytest.raises(TaskMismatchError, match="^support_y: meta_lstm classifies"):
        meta_lstm.meta_gradient(params, Episode(ep.support_x, ep.support_y.float(), ep.query_x, ep.query_y,
                                                ep.classes, ep.rotations, ep.key), c, model)
    with pytest.raises(AlgorithmConfigError, match=r"no meta_lstm\.\* weights"):
        meta_lstm.meta_gradient({k: v for k, v in params.items() if not k.startswith("meta_lstm.")}, ep, c, model)
    with pytest.raises(AlgorithmConfigError, match="^lstm_hidden: "):
        meta_lstm.meta_gradient(params, ep, cfg(lstm_hidden=7), model)
    with pytest.raises(TaskMismatchError, match="has 2 classes but this meta_lstm learner's head has exactly 3"):
        two = episode(ways=2)
        meta_lstm.scores(params, two, c, model)
    for field, value in (("query_bn", "transductive"), ("support_batch", -1), ("lstm_p", 0)):
        with pytest.raises(AlgorithmConfigError, match=f"^{field}: "):
            cfg(**{field: value})
    with pytest.raises(AlgorithmConfigError, match="^first_order: "):
        cfg(first_order=True)


@pytest.mark.data
@pytest.mark.usefixtures("ray_module", "no_env_tracking")
def test_meta_lstm_trains_evaluates_and_predicts_end_to_end(omniglot_store, omniglot_dir, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "run"
    assert main(["train", "configs/omniglot_meta_lstm_5w1s.yaml", "--out", str(out), "--tracking-uri", uri,
                 "--set", f"data.path={omniglot_store}", "--set", "model.hidden=8", "--set", "train.steps=3",
                 "--set", "train.meta_batch=2", "--set", "algorithm.inner_steps=2",
                 "--set", "algorithm.eval_inner_steps=2", "--set", "train.val_every=0", "--set", "train.eval_tasks=10",
                 "--set", "tracking.system_metrics=false"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["algorithm"] == "meta_lstm" and summary["query_bn"] == "support" and summary["tasks"] == 10
    assert summary["inner_steps"] == 2 and 0 <= summary["accuracy"] <= 1
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs(client.search_experiments()[0].experiment_id)[0]
    assert run.info.status == "FINISHED" and {"train/loss", "test/accuracy"} <= set(run.data.metrics)
    capsys.readouterr()
    # evaluate again, transductively this time: the mode is named in the new eval.json
    assert main(["eval", "--run", run.info.run_id, "--tracking-uri", uri, "--tasks", "5",
                 "--out", str(tmp_path / "ev"), "--set", "algorithm.query_bn=batch"]) == 0 \
        or pytest.fail(capsys.readouterr().err)
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["query_bn"] == "batch"
    assert_predicts_a_user_task(omniglot_dir, tmp_path, run.info.run_id, uri)
    # a support set of 3 classes for a 5-way learner: one line, exit 2
    few, fq, _ = user_task(omniglot_dir, tmp_path / "few", classes=3)
    capsys.readouterr()
    assert main(["predict", "--run", run.info.run_id, "--tracking-uri", uri, "--support", str(few),
                 "--query", str(fq)]) == 2
    assert "has 3 classes but this meta_lstm learner's head has exactly 5 ways" in capsys.readouterr().err


def write_rgb_splits(root, rng):
    """train/ val/ test/ folders of RGB class folders (3 images each, random sizes), as mini-ImageNet is shipped."""
    from PIL import Image

    for split, classes in (("train", 6), ("val", 5), ("test", 5)):
        for c in range(classes):
            d = root / split / f"{split}_class{c}"
            d.mkdir(parents=True)
            for i in range(3):
                h, w = rng.integers(60, 120, size=2)
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.jpg")


@pytest.mark.usefixtures("ray_module", "no_env_tracking")
def test_the_rgb_imagefolder_config_runs_end_to_end(tmp_path):
    from metatrain.tasks.store import TaskStore

    src, store, out = tmp_path / "my_images", tmp_path / "store", tmp_path / "run"
    write_rgb_splits(src, np.random.default_rng(0))
    assert main(["prepare", "imagefolder", "--source", str(src), "--out", str(store), "--size", "84",
                 "--channels", "3"]) == 0
    s = TaskStore.open(store)
    assert s.images.shape == (48, 3, 84, 84) and sorted(set(s.class_split)) == ["test", "train", "val"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", "configs/imagefolder_meta_lstm_rgb84.yaml", "--out", str(out), "--tracking-uri", uri,
                 "--set", f"data.path={store}", "--set", "model.hidden=4", "--set", "data.queries=2",
                 "--set", "train.steps=2", "--set", "train.meta_batch=2", "--set", "algorithm.inner_steps=2",
                 "--set", "algorithm.eval_inner_steps=2", "--set", "train.val_every=0", "--set", "train.eval_tasks=4",
                 "--set", "tracking.system_metrics=false"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["split"] == "test" and summary["tasks"] == 4 and summary["query_bn"] == "support"


def test_a_meta_learner_of_another_size_has_another_checkpoint_fingerprint():
    from metatrain.pipeline.components import build_model, fingerprint
    from metatrain.pipeline.config import load_config

    def fp(*extra):
        c = load_config("configs/omniglot_meta_lstm_5w1s.yaml", list(extra))
        return fingerprint(c, build_model(c, (1, 28, 28)))

    assert fp() == fp("algorithm.query_bn=batch")  # not a shape
    assert fp() != fp("algorithm.lstm_hidden=10")
    maml = ["algorithm.name=maml", "model.hidden=32"]
    assert fp(*maml) == fp(*maml, "algorithm.lstm_hidden=10")  # maml's fingerprint ignores the LSTM's size
