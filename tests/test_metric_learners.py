"""Metric-based learners (#6): the defining equations on small tensors, gradients and batching, bad input, and each
learner end to end through `metatrain train` with 2 Ray workers and MLflow."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import prototype_episode
from metatrain.models.metric import (
    Conv4Embedding,
    MatchingNetwork,
    RelationNetwork,
    SiameseNetwork,
    cosine,
    prototypes,
    squared_euclidean,
)
from metatrain.tasks.episode import Episode
from mlflow.tracking import MlflowClient

from metatrain.pipeline.algorithms import AlgorithmConfig, get_algorithm, meta_gradient_tasks
from metatrain.pipeline.algorithms.errors import TaskMismatchError
from metatrain.pipeline.algorithms.metric.embedding import call
from metatrain.pipeline.algorithms.metric.matching import attention
from metatrain.pipeline.config import ConfigError, load_config
from metatrain.pipeline.jobs.train import train


def episode(slot: int) -> Episode:
    return prototype_episode(slot, ways=3, shots=2, queries=2, step=2)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


MODELS = {"protonet": lambda: Conv4Embedding(hidden=8), "matching": lambda: MatchingNetwork(hidden=8, fce=True,
                                                                                             read_steps=2),
          "relation": lambda: RelationNetwork(hidden=8), "siamese": lambda: SiameseNetwork(hidden=8)}


# ---- equations ------------------------------------------------------------------------------------------------------


def test_prototype_is_the_class_mean_and_protonet_logits_are_negative_squared_distances():
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 5.0], [3.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert torch.equal(prototypes(feats, labels, 2), torch.tensor([[1.0, 0.0], [2.0, 4.0]]))
    assert torch.equal(squared_euclidean(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0], [4.0, 5.0]])),
                       torch.tensor([[1.0, 25.0]]))
    torch.manual_seed(0)
    net, ep = Conv4Embedding(hidden=8), episode(0)
    loss, logits = get_algorithm("protonet").scores(params_of(net), ep, AlgorithmConfig(name="protonet"), net)
    f = net(torch.cat([ep.support_x, ep.query_x]))
    s, q = f[:6], f[6:]
    expected = -((q[:, None] - prototypes(s, ep.support_y, 3)[None]) ** 2).sum(-1)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(loss, F.cross_entropy(expected, ep.query_y))
    _, cos_logits = get_algorithm("protonet").scores(params_of(net), ep, AlgorithmConfig(
        name="protonet", distance="cosine", cosine_scale=5.0), net)
    torch.testing.assert_close(cos_logits, 5.0 * cosine(q, prototypes(s, ep.support_y, 3)))


def test_matching_attention_sums_to_one_and_fce_changes_the_embeddings():
    a = attention(torch.randn(4, 8), torch.randn(6, 8))
    assert a.shape == (4, 6) and torch.allclose(a.sum(-1), torch.ones(4)) and (a >= 0).all()
    torch.manual_seed(0)
    plain, fce = MatchingNetwork(hidden=8), MatchingNetwork(hidden=8, fce=True, read_steps=3)
    s, q = torch.randn(5, 8), torch.randn(3, 8)
    assert torch.equal(plain.context_support(s), s) and torch.equal(plain.context_query(q, s), q)
    g = fce.context_support(s)
    assert g.shape == (5, 8) and not torch.allclose(g, s)
    assert fce.context_query(q, g).shape == (3, 8)
    ep = episode(1)
    _, log_probs = get_algorithm("matching").scores(params_of(fce), ep, AlgorithmConfig(name="matching"), fce)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(len(ep.query_y)), atol=1e-5)


def test_matching_attention_is_the_softmax_of_scaled_cosines_summed_per_class():
    """P(y=c | x) = sum over c's support items of softmax_i(s cos(f(x), f(x_i))), s = algorithm.cosine_scale; s = 1
    is the paper's attention, and a larger s only sharpens it (the argmax, so the accuracy, is the same)."""
    torch.manual_seed(0)
    net, ep = MatchingNetwork(hidden=8), episode(1)
    feats = net(torch.cat([ep.support_x, ep.query_x]))
    cos = cosine(feats[len(ep.support_y):], feats[:len(ep.support_y)])  # (queries, supports)
    onehot = F.one_hot(ep.support_y, 3).float()
    for scale in (1.0, 10.0):
        loss, log_probs = get_algorithm("matching").scores(params_of(net), ep, AlgorithmConfig(
            name="matching", cosine_scale=scale), net)
        expected = torch.softmax(scale * cos, dim=-1) @ onehot
        torch.testing.assert_close(log_probs.exp(), expected)
        torch.testing.assert_close(loss, F.nll_loss(expected.log(), ep.query_y))
    # Two perfect matches: the cosines (1, -1) give 0.88 at s = 1 and all but 2e-9 at s = 10.
    a = attention(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [-1.0, 0.0]]), 10.0)
    torch.testing.assert_close(a, torch.softmax(torch.tensor([[10.0, -10.0]]), -1))


def test_relation_scores_are_in_the_unit_interval():
    torch.manual_seed(0)
    net, ep = RelationNetwork(hidden=8), episode(2)
    loss, rel = get_algorithm("relation").scores(params_of(net), ep, AlgorithmConfig(name="relation"), net)
    assert rel.shape == (6, 3) and ((rel >= 0) & (rel <= 1)).all()
    torch.testing.assert_close(loss, F.mse_loss(rel, F.one_hot(ep.query_y, 3).float()))


def test_relation_class_map_is_the_mean_so_repeated_shots_change_nothing():
    """K copies of each support image give the 1-shot scores: a class map does not grow with the shots. (The queries
    are repeated too, so that the episode's batch-norm statistics, which the embedding uses, stay the same.)"""
    torch.manual_seed(0)
    net, ep = RelationNetwork(hidden=8), episode(2)
    five = dataclasses.replace(ep, support_x=ep.support_x.repeat(5, 1, 1, 1), support_y=ep.support_y.repeat(5),
                               query_x=ep.query_x.repeat(5, 1, 1, 1), query_y=ep.query_y.repeat(5))
    algo, cfg = get_algorithm("relation"), AlgorithmConfig(name="relation")
    _, one_shot = algo.scores(params_of(net), ep, cfg, net)
    _, five_shot = algo.scores(params_of(net), five, cfg, net)
    torch.testing.assert_close(five_shot[:len(ep.query_y)], one_shot, rtol=1e-4, atol=1e-5)


def test_siamese_score_is_symmetric_and_predicts_the_best_match():
    torch.manual_seed(0)
    net = SiameseNetwork(hidden=8)
    a, b = torch.randn(4, 8), torch.randn(5, 8)
    torch.testing.assert_close(net.pair_logits(a, b), net.pair_logits(b, a).T)
    ep = episode(3)
    _, per_class = get_algorithm("siamese").scores(params_of(net), ep, AlgorithmConfig(name="siamese"), net)
    f = net(torch.cat([ep.support_x, ep.query_x]))
    logits = net.pair_logits(f[6:], f[:6])
    best_support_class = ep.support_y[logits.argmax(1)]
    assert torch.equal(per_class.argmax(1), best_support_class)


def pair_task(slot: int) -> Episode:
    """A verification task of 6 pairs from a 3-way episode's images: pairs 0-2 one class, 3-5 two classes."""
    ep = prototype_episode(slot, ways=3, shots=2, queries=2, step=2)
    left = ep.support_x[[0, 2, 4, 0, 2, 4]]
    right = torch.cat([ep.support_x[[1, 3, 5]], ep.query_x[[2, 4, 0]]])
    same = torch.tensor([1, 1, 1, 0, 0, 0])
    return Episode(left, same, right, same.clone(), torch.zeros(6, 2, dtype=torch.long),
                   torch.zeros(6, 2, dtype=torch.long), (0, 2, slot), pairs=True)


def test_siamese_verification_is_the_bce_of_each_pair_and_batches_exactly():
    torch.manual_seed(0)
    net, algo, cfg = SiameseNetwork(hidden=8), get_algorithm("siamese"), AlgorithmConfig(name="siamese",
                                                                                        verification=True)
    params, task = params_of(net), pair_task(1)
    loss, scores = algo.scores(params, task, cfg, net)
    f = net(torch.cat([task.support_x, task.query_x]))
    logit = net.score((f[:6] - f[6:]).abs()).squeeze(-1)  # each pair alone, not every cross pair
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logit, task.query_y.float()))
    assert torch.equal(scores.argmax(1), (logit > 0).long())  # "same" exactly where p(same) > 0.5
    grads, metrics = algo.meta_gradient(params, task, cfg, net)
    assert metrics["query_acc"] == pytest.approx(float(((logit > 0).long() == task.query_y).float().mean()))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    tasks = [pair_task(s) for s in range(3)]
    loop, n, _ = meta_gradient_tasks(params, tasks, cfg, net, batched=False)
    batch, _, _ = meta_gradient_tasks(params, tasks, cfg, net, batched=True)
    assert n == 3 and all(torch.allclose(loop[k], batch[k], atol=1e-5) for k in loop)
    with pytest.raises(ConfigError, match="algorithm.verification: protonet cannot train on same/different pairs"):
        load_config("configs/omniglot_protonet_5w1s.yaml", ["algorithm.verification=true"])
    with pytest.raises(ConfigError, match="verification_pairs: must be even"):
        load_config("configs/omniglot_siamese_5w1s.yaml", ["algorithm.verification_pairs=7"])


def test_call_runs_a_method_with_the_given_parameters_not_the_modules():
    torch.manual_seed(0)
    net = SiameseNetwork(hidden=8)
    params = {k: torch.zeros_like(v) for k, v in net.named_parameters()}
    a, b = torch.randn(2, 8), torch.randn(3, 8)
    assert torch.equal(call(net, params, "pair_logits", a, b), torch.zeros(2, 3))  # w = 0, b = 0
    assert not torch.equal(net.pair_logits(a, b), torch.zeros(2, 3))  # the module's own weights are untouched


# ---- gradients, batching, bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_meta_gradient_is_the_episode_loss_gradient_and_batches_exactly(name):
    torch.manual_seed(0)
    net, algo, cfg = MODELS[name](), get_algorithm(name), AlgorithmConfig(name=name)
    params = params_of(net)
    ep = episode(4)
    grads, metrics = algo.meta_gradient(params, ep, cfg, net)
    net.zero_grad()
    loss, _ = algo.scores(dict(net.named_parameters()), ep, cfg, net)
    loss.backward()
    for k, p in net.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grads[k], expected, rtol=1e-4, atol=1e-6)
    assert metrics["query_loss"] == pytest.approx(float(loss.detach()), rel=1e-5) and 0 <= metrics["query_acc"] <= 1
    eps = [episode(s) for s in range(3)]
    loop, n, _ = meta_gradient_tasks(params, eps, cfg, net, batched=False)
    batch, _, _ = meta_gradient_tasks(params, eps, cfg, net, batched=True)
    assert n == 3 and all(torch.allclose(loop[k], batch[k], atol=1e-5) for k in loop)


def test_bad_input_is_named():
    net, cfg = Conv4Embedding(hidden=8), AlgorithmConfig(name="protonet")
    ep = episode(0)
    orphan = Episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y + 3, ep.classes, ep.rotations, ep.key)
    with pytest.raises(TaskMismatchError, match="every query label needs support examples"):
        get_algorithm("protonet").meta_gradient(params_of(net), orphan, cfg, net)
    with pytest.raises(Exception, match="distance: unknown 'manhattan'"):
        AlgorithmConfig(name="protonet", distance="manhattan")
    with pytest.raises(ConfigError, match="model.name must be one of embedding for algorithm.name=protonet"):
        load_config("configs/omniglot_protonet_5w1s.yaml", ["model.name=conv4"])
    with pytest.raises(ConfigError, match="data.eval_ways must equal data.ways for maml"):
        load_config("configs/omniglot_maml_5w1s.yaml", ["data.eval_ways=20"])


# ---- end to end -----------------------------------------------------------------------------------------------------


@pytest.mark.data
@pytest.mark.parametrize("name, extra", [
    ("protonet", ["data.ways=10", "data.queries=3"]),  # trains 10-way, tests 5-way
    ("matching", ["model.fce=true", "model.fce_read_steps=2", "data.queries=3"]),
    ("relation", ["data.queries=3"]),
    ("siamese", ["data.queries=3"]),
    ("siamese", ["algorithm.verification=true", "algorithm.verification_pairs=8", "data.augment=true",
                 "data.queries=3"]),  # Koch et al.'s training: augmented pairs; tested on 5-way episodes
])
def test_each_learner_trains_through_metatrain_train_with_two_workers(ray_module, omniglot_store, tmp_path, name,
                                                                      extra, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / name
    result = train(f"configs/omniglot_{name}_5w1s.yaml",
                   [f"data.path={omniglot_store}", "model.hidden=8", "train.steps=3", "train.meta_batch=4",
                    "train.val_every=3", "train.val_tasks=8", "train.eval_tasks=20", "workers.count=2",
                    "tracking.system_metrics=false", *extra], out=str(out), quiet=True)
    summary = json.loads((out / "eval.json").read_text())
    assert summary["algorithm"] == name and summary["ways"] == 5 and summary["tasks"] == 20
    assert 0 <= summary["accuracy"] <= 1 and summary["inner_steps"] is None
    run = MlflowClient(tracking_uri=result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["algorithm.name"] == name
    assert {"train/loss", "train/acc", "val/acc", "test/accuracy"} <= set(run.data.metrics)
