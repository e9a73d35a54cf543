"""l2l_gd as an algorithm of the pipeline: its record and uniform interface, its config (the optimizee section and
the combinations refused with one line), and end to end through `metatrain train` on a real local Ray: eval.json,
the registered model, LearnedOptimizer built from the run and from the registry, MLflow serving the packed step,
`metatrain eval`, and `metatrain predict` refusing it."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from metatrain.models import CoordinateLSTM, PackedOptimizerStep
from metatrain.tasks.optimizees import MLPSampler, QuadraticSampler
from mlflow.tracking import MlflowClient

from metatrain.pipeline.algorithms import AlgorithmConfig, get_record, l2l_gd, meta_gradient_tasks, use_batched
from metatrain.pipeline.cli import main
from metatrain.pipeline.components import build_model, build_sampler, example_input, initial_params
from metatrain.pipeline.config import ConfigError, load_config
from metatrain.pipeline.learned_optimizer import LearnedOptimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = ["algorithm.unroll=10", "algorithm.truncation=5"]


def test_the_record_says_what_l2l_gd_is():
    rec = get_record("l2l_gd")
    assert rec.family == "learned" and rec.optimizee_tasks and rec.predict == "none"
    assert rec.models == ("coordinate_lstm",) and rec.param_prefix is None  # its weights are the network's own
    cfg = load_config("configs/quadratic_l2l_gd.yaml")
    model = build_model(cfg, None)
    assert isinstance(model, CoordinateLSTM) and (model.hidden, model.layers, model.p) == (20, 2, 10.0)
    params = initial_params(cfg, model)
    assert set(params) == {k for k, _ in model.named_parameters()}
    # seeded by train.seed: the same draw as a CoordinateLSTM constructed under that seed
    torch.manual_seed(cfg.train.seed)
    fresh = dict(CoordinateLSTM().named_parameters())
    assert all(torch.equal(params[k], fresh[k]) for k in params)
    assert not use_batched(cfg.algorithm, params)  # optimizees never stack, not even on a GPU
    assert example_input(cfg).shape == (8, 1 + 2 * 2 * 20)


def test_the_interface_is_the_trajectory_gradient_and_the_learned_optimize():
    cfg = load_config("configs/quadratic_l2l_gd.yaml", [*QUICK, "algorithm.server_update=trajectory"])
    model = build_model(cfg, None)
    params = initial_params(cfg, model)
    sampler = build_sampler(cfg, None, "train")
    tasks = [sampler.episode(1, s) for s in range(3)]
    direct = [l2l_gd.trajectory_gradient(params, t, model, unroll=10, truncation=5)[0] for t in tasks]
    total, n, metrics = meta_gradient_tasks(params, tasks, cfg.algorithm, model)
    assert n == 3 and set(metrics) == {"meta_loss", "loss_first", "loss_last"}
    for k in params:
        torch.testing.assert_close(total[k], direct[0][k] + direct[1][k] + direct[2][k])
    curve, final = l2l_gd.optimize(params, tasks[0], model, 10)
    m = l2l_gd.evaluate(params, tasks[0], cfg.algorithm, model)
    assert m["initial_loss"] == curve[0] and m["final_loss"] == curve[-1]
    assert m["log10_final_loss"] == pytest.approx(np.log10(curve[-1]))
    adapted = l2l_gd.adapt(params, tasks[0], cfg.algorithm, model)
    assert torch.equal(adapted["theta"], final["theta"])
    # held-out optimizees are other draws: val and test seeds apart from train.seed and from each other
    seeds = {build_sampler(cfg, None, s).seed for s in ("train", "val", "test")}
    assert len(seeds) == 3 and build_sampler(cfg, None, "test").task(0, 0).key[0] in seeds


def test_the_mlp_family_reads_the_optimizee_section():
    cfg = load_config("configs/digits_l2l_gd.yaml", ["optimizee.hidden=[40]", "optimizee.activation=relu",
                                                     "optimizee.batch_size=64", "algorithm.server_update=trajectory"])
    sampler = build_sampler(cfg, None, "train")
    assert isinstance(sampler, MLPSampler) and (sampler.hidden, sampler.activation, sampler.batch_size) == \
        ((40,), "relu", 64)
    task = sampler.episode(2, 1)
    assert task.key == (0, 2, 1) and task.init_params()["w0"].shape == (40, 64)
    m = l2l_gd.evaluate(initial_params(cfg, build_model(cfg, None)), task,
                        AlgorithmConfig(name="l2l_gd", unroll=5, truncation=5), build_model(cfg, None))
    assert 0 <= m["final_acc"] <= 1 and m["final_loss"] > 0
    assert isinstance(build_sampler(load_config("configs/quadratic_l2l_gd.yaml", ["optimizee.dim=3"]), None,
                                    "val"), QuadraticSampler)


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.dataset=quadratc"], "data.dataset must be an optimizee family (quadratic, mlp) for algorithm.name=l2l_gd"),
    (["optimizee.source=mnst"], "optimizee.source must be one of 'digits' | 'omniglot' | 'mnist', got 'mnst' "
                                "(did you mean 'mnist'?)"),
    (["optimizee.hidden=[]"], "optimizee.hidden must be a non-empty list of widths >= 1"),
    (["algorithm.unroll=10"], "algorithm.unroll: 10 steps is shorter than its truncation window of 20"),
    (["model.name=conv4"], "model.name must be 'coordinate_lstm' for algorithm.name=l2l_gd, got 'conv4'"),
    (["algorithm.task_batching=batched"], "algorithm.task_batching must be loop or auto for l2l_gd"),
    (["algorithm.first_order=true"], "algorithm.first_order: l2l_gd is first-order by construction"),
    (["train.mode=async"], "algorithm.server_update window needs train.mode: sync"),
])
def test_bad_l2l_gd_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/digits_l2l_gd.yaml", overrides)
    assert str(err.value).startswith(message)


def test_the_wrong_data_for_each_learned_algorithm_is_one_line_exit_2(tmp_path, capsys):
    cases = [
        (["configs/omniglot_fomaml_5w1s.yaml", "--set", "algorithm.name=l2l_gd"],
         "data.dataset must be an optimizee family (quadratic, mlp) for algorithm.name=l2l_gd: it learns an "
         "optimizer, not a few-shot learner; got 'omniglot'"),
        (["configs/omniglot_fomaml_5w1s.yaml", "--set", "data.dataset=mlp"],
         "algorithm.name fomaml learns from few-shot episodes; data.dataset=mlp is an optimizee family"),
        (["configs/sinusoid_maml.yaml", "--set", "algorithm.name=meta_lstm"],
         "algorithm.name meta_lstm needs image data, not sinusoids"),
        (["configs/digits_l2l_gd.yaml", "--set", "optimizee.source=mnist", "--set", f"data.path={tmp_path}/none"],
         "MNIST file train-images-idx3-ubyte not found"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert main(["train", *args, "--out", str(out), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()


def test_the_packed_step_is_one_optimizer_step():
    opt = CoordinateLSTM(hidden=4, layers=2)
    grad = torch.randn(7)
    state = opt.init_state(7)
    update, new = opt(grad, state)
    packed = PackedOptimizerStep(opt)
    out = packed(torch.cat([grad.unsqueeze(1), torch.zeros(7, packed.width - 1)], dim=1))
    assert out.shape == (7, packed.width) and packed.width == 1 + 2 * 2 * 4
    torch.testing.assert_close(out[:, 0], update)
    torch.testing.assert_close(out[:, 1:], torch.cat([*new.h, *new.c], dim=1))
    # feeding the state columns back is the next step
    grad2 = torch.randn(7)
    update2, _ = opt(grad2, new)
    torch.testing.assert_close(packed(torch.cat([grad2.unsqueeze(1), out[:, 1:]], dim=1))[:, 0], update2)


def test_a_run_of_another_algorithm_is_not_an_optimizer(monkeypatch):
    # the checkpoint a fomaml run stores (its config names the algorithm), as checkpoint_of hands it over
    import metatrain.pipeline.jobs.runs as runs_job
    state = {"params": {"w": torch.zeros(3)}, "config": {"algorithm": {"name": "fomaml"}}}
    monkeypatch.setattr(runs_job, "checkpoint_of", lambda run, model, uri: (state, run or model))
    net = torch.nn.Linear(2, 2)
    with pytest.raises(Exception, match="run: abc trained 'fomaml', not the learned optimizer l2l_gd"):
        LearnedOptimizer(net.parameters(), run="abc")
    with pytest.raises(Exception, match="model: models:/protos/1 trained 'fomaml'"):
        LearnedOptimizer(net.parameters(), model="models:/protos/1")
    with pytest.raises(Exception, match="give exactly one of weights=, run=, model= \\(got run, model\\)"):
        LearnedOptimizer(net.parameters(), run="abc", model="models:/protos/1")


@pytest.mark.usefixtures("ray_module", "no_env_tracking")
def test_l2l_gd_trains_through_metatrain_train_and_is_used_as_an_optimizer(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "run"
    assert main(["train", "configs/quadratic_l2l_gd.yaml", "--out", str(out), "--tracking-uri", uri,
                 "--register", "l2l-quadratic", "--set", "train.steps=4", "--set", "train.val_every=2",
                 "--set", "train.val_tasks=4", "--set", "train.eval_tasks=6", "--set", "tracking.system_metrics=false",
                 *[a for q in QUICK for a in ("--set", q)]]) == 0 or pytest.fail(capsys.readouterr().err)
    summary = json.loads((out / "eval.json").read_text())
    assert summary["algorithm"] == "l2l_gd" and summary["metric"] == "final_loss" and summary["tasks"] == 6
    assert summary["steps"] == 10 and summary["optimizee"] == "quadratic" and summary["split"] == "test"
    assert summary["final_loss"] > 0 and summary["log10_final_loss"] == pytest.approx(np.log10(summary["final_loss"]))
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs(client.search_experiments()[0].experiment_id)[0]
    assert run.info.status == "FINISHED"
    assert {"train/meta_loss", "train/loss_last", "val/final_loss", "test/final_loss"} <= set(run.data.metrics)
    run_id = run.info.run_id
    # the run and the registry entry are optimizers for a plain PyTorch loop
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    for source in ({"run": run_id}, {"model": "models:/l2l-quadratic/1"}):
        net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Sigmoid(), torch.nn.Linear(16, 3))
        opt = LearnedOptimizer(net.parameters(), tracking_uri=uri, **source)
        before = F.cross_entropy(net(x), y).item()
        for _ in range(30):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        assert F.cross_entropy(net(x), y).item() < before, source
    # MLflow serves the packed step (pt2, no pickle): the trained optimizer's first update on a gradient
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/l2l-quadratic/1")
    grad = np.linspace(-1, 1, 5, dtype=np.float32)
    packed = np.zeros((5, 81), dtype=np.float32)
    packed[:, 0] = grad
    got = np.asarray(served.predict(packed))
    state = torch.load(out / "checkpoints" / "final.pt", weights_only=True)
    net = CoordinateLSTM()
    net.load_state_dict(state["params"])
    want, _ = net(torch.from_numpy(grad), net.init_state(5))
    np.testing.assert_allclose(got[:, 0], want.detach().numpy(), rtol=1e-5, atol=1e-7)
    mlflow.set_tracking_uri(None)
    capsys.readouterr()
    assert main(["eval", "--run", run_id, "--tracking-uri", uri, "--tasks", "3", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["tasks"] == 3
    # predict has nothing to predict with an optimizer: one line, exit 2, nothing written
    capsys.readouterr()
    preds, task = tmp_path / "preds.json", tmp_path / "task"
    task.mkdir()
    assert main(["predict", "--run", run_id, "--tracking-uri", uri, "--support", str(task),
                 "--query", str(task), "--json", str(preds)]) == 2
    assert "l2l_gd learns an optimizer, not a classifier" in capsys.readouterr().err and not preds.exists()
    # a checkpoint of another shape: refused with one line, by the CLI and by LearnedOptimizer
    capsys.readouterr()
    assert main(["eval", "--run", run_id, "--tracking-uri", uri, "--tasks", "3", "--out", str(tmp_path / "ev2"),
                 "--set", "algorithm.lstm_hidden=10"]) == 2
    assert "was written for a different model or config" in capsys.readouterr().err
    assert not (tmp_path / "ev2").exists()
    with pytest.raises(Exception, match="not the weights of a 2-layer, 8-unit"):
        LearnedOptimizer(torch.nn.Linear(2, 2).parameters(), weights=state["params"], hidden=8)


@pytest.mark.usefixtures("ray_module", "no_env_tracking")
def test_l2l_gd_trains_on_digits_mlps_through_metatrain_train(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "configs/digits_l2l_gd.yaml", "--out", str(out), "--tracking-uri",
                 f"sqlite:///{tmp_path}/mlflow.db", "--set", "train.steps=2", "--set", "train.val_every=0",
                 "--set", "train.eval_tasks=3", "--set", "tracking.system_metrics=false",
                 *[a for q in QUICK for a in ("--set", q)]]) == 0 or pytest.fail(capsys.readouterr().err)
    summary = json.loads((out / "eval.json").read_text())
    assert summary["optimizee"] == "mlp" and 0 <= summary["final_acc"] <= 1 and summary["initial_loss"] > 0


def test_server_update_window_is_the_per_window_gradient_of_the_replayed_trajectory():
    """server_update: window -- step s is window s % W of trajectory s // W; its gradient equals the in-process
    per-window gradient of that window when the weights did not change in between (replay = the same unroll)."""
    cfg = load_config("configs/quadratic_l2l_gd.yaml", [*QUICK, "algorithm.server_update=window"])
    model = build_model(cfg, None)
    params = initial_params(cfg, model)
    sampler = build_sampler(cfg, None, "train")
    plain = build_sampler(load_config("configs/quadratic_l2l_gd.yaml", [*QUICK, "algorithm.server_update=trajectory"]),
                          None, "train")
    seen = []
    l2l_gd.trajectory_gradient(params, plain.task(3, 0), model, unroll=10, truncation=5, per_window=seen.append)
    for step, window in ((6, 0), (7, 1)):  # trajectory 3, both its windows
        item = sampler.episode(step, 0)
        assert item.window == window and item.key == (0, 3, 0)
        grads, _ = l2l_gd.meta_gradient(params, item, cfg.algorithm, model)
        for k in params:
            torch.testing.assert_close(grads[k], seen[window][k])
    assert not isinstance(build_sampler(cfg, None, "test"), type(sampler))  # evaluation unrolls whole trajectories
    with pytest.raises(ConfigError, match=r"^algorithm.server_update: unknown 'windows'"):
        load_config("configs/quadratic_l2l_gd.yaml", ["algorithm.server_update=windows"])
