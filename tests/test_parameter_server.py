"""ParameterServerCore without Ray: weighted averaging, refusals, validation, staleness, checkpoints, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from metatrain.pipeline.config import OptimConfig
from metatrain.pipeline.distributed.parameter_server import ParameterServerCore, learning_rate

SGD1 = OptimConfig(name="sgd", lr=1.0)


def params():
    return {"w": torch.zeros(2, 3), "b": torch.ones(3)}


def contrib(step, version, value, n, worker=0, first=0):
    """One block of n tasks whose summed gradient is ``value`` everywhere."""
    grads = {"w": torch.full((2, 3), float(value)), "b": torch.full((3,), float(value))}
    meta = {"worker": worker, "step": step, "version": version, "n_tasks": n,
            "blocks": [list(range(first, first + n))]}
    return meta, [grads]


def core(optim=SGD1, **kw):
    return ParameterServerCore(params(), optim, total_steps=100, checkpoint_dir=kw.pop("checkpoint_dir", None),
                               checkpoint_every=kw.pop("checkpoint_every", 10), **kw)


def apply(ps, step, *contribs):
    return ps.apply_gradients(step, [m for m, _ in contribs], [g for _, g in contribs])


def test_packed_contributions_equal_the_list_form_and_are_checked():
    """Blocks packed along dim 0 (what TaskWorkerCore.compute sends) apply bit-identically to the list form."""
    gen = torch.Generator().manual_seed(1)
    blocks = [{"w": torch.randn(2, 3, generator=gen), "b": torch.randn(3, generator=gen)} for _ in range(4)]
    meta = {"worker": 0, "step": 1, "version": 0, "n_tasks": 4, "blocks": [[0], [1], [2], [3]]}
    packed = {k: torch.stack([b[k] for b in blocks]) for k in ("w", "b")}
    as_list, as_packed = core(OptimConfig(name="adam", lr=0.1)), core(OptimConfig(name="adam", lr=0.1))
    assert as_list.apply_gradients(1, [meta], [blocks])["applied"]
    assert as_packed.apply_gradients(1, [dict(meta)], [packed])["applied"]
    for k in ("w", "b"):
        assert torch.equal(as_list.get_weights()[1][k], as_packed.get_weights()[1][k])
    # Wrong block count along dim 0, and a NaN in one block: rejected, counted, nothing applied.
    ps = core()
    short = {k: v[:3] for k, v in packed.items()}
    out = ps.apply_gradients(1, [dict(meta)], [short])
    assert not out["applied"] and "packed gradients need 4 blocks" in out["rejected"][0]
    bad = {k: v.clone() for k, v in packed.items()}
    bad["b"][2, 1] = float("nan")
    out = ps.apply_gradients(1, [dict(meta)], [bad])
    assert not out["applied"] and "b has non-finite values" in out["rejected"][0]
    assert ps.counters["rejected"] == 2 and ps.version == 0


def test_weighted_average_and_exactly_one_step():
    ps = core()
    # Contributions are sums over tasks: (1*2 + 3*6) / (2 + 6) = 2.5 per element; SGD lr 1 moves by -2.5.
    out = apply(ps, 1, contrib(1, 0, 1 * 2, 2, worker=0), contrib(1, 0, 3 * 6, 6, worker=1, first=2))
    assert out["applied"] and out["version"] == 1 and out["tasks"] == 8
    version, w = ps.get_weights()
    assert version == 1
    assert torch.allclose(w["w"], torch.full((2, 3), -2.5)) and torch.allclose(w["b"], torch.full((3,), -1.5))


def test_blocks_are_added_in_slot_order_whoever_sent_them():
    """Sums of the same blocks, split differently over workers and arriving in any order, are bit-identical."""
    gen = torch.Generator().manual_seed(0)
    blocks = [{"w": torch.randn(2, 3, generator=gen) * 10 ** i, "b": torch.randn(3, generator=gen)} for i in range(6)]

    def contribution(worker, first, last):
        meta = {"worker": worker, "step": 1, "version": 0, "n_tasks": last - first,
                "blocks": [[i] for i in range(first, last)]}
        return meta, [dict(blocks[i]) for i in range(first, last)]

    one = core(OptimConfig(name="adam", lr=0.1))
    apply(one, 1, contribution(0, 0, 6))
    three = core(OptimConfig(name="adam", lr=0.1))
    apply(three, 1, contribution(2, 4, 6), contribution(0, 0, 1), contribution(1, 1, 4))
    for k in ("w", "b"):
        assert torch.equal(one.get_weights()[1][k], three.get_weights()[1][k])


def test_a_step_is_never_applied_twice():
    ps = core()
    assert apply(ps, 1, contrib(1, 0, 1.0, 1))["applied"]
    again = apply(ps, 1, contrib(1, 0, 1.0, 1))
    assert not again["applied"] and "already applied" in again["reason"]
    assert apply(ps, 0, contrib(0, 0, 1.0, 1))["applied"] is False
    assert ps.version == 1 and ps.counters["duplicates"] == 2
    assert torch.allclose(ps.get_weights()[1]["w"], torch.full((2, 3), -1.0))


@pytest.mark.parametrize("mutate, reason", [
    (lambda m, g: g[0].pop("b"), "missing \\['b'\\]"),
    (lambda m, g: g[0].update(extra=torch.zeros(1)), "unexpected \\['extra'\\]"),
    (lambda m, g: g[0].update(w=torch.zeros(3, 2)), "w has shape \\(3, 2\\), parameter has \\(2, 3\\)"),
    (lambda m, g: g[0]["w"].__setitem__((0, 0), float("nan")), "w has non-finite values"),
    (lambda m, g: g[0]["b"].__setitem__(1, float("inf")), "b has non-finite values"),
    (lambda m, g: m.update(n_tasks=0), "n_tasks must be the positive number of slots"),
    (lambda m, g: g[0].update(w=torch.zeros(2, 3, dtype=torch.int64)), "dtype torch.int64"),
    (lambda m, g: g.append(dict(g[0])), "meta\\['blocks'\\] must list the slots of each gradient block"),
    (lambda m, g: g.clear(), "expected a non-empty list of gradient blocks"),
])
def test_bad_contributions_are_rejected_reported_and_not_applied(mutate, reason):
    ps = core()
    bad = contrib(1, 0, 100.0, 1, worker=7)
    mutate(*bad)
    out = apply(ps, 1, contrib(1, 0, 2.0, 2, worker=0), bad)
    assert out["applied"] and out["tasks"] == 2  # the good one alone
    assert len(out["rejected"]) == 1 and out["rejected"][0].startswith("worker 7, step 1: ")
    import re
    assert re.search(reason, out["rejected"][0]), out["rejected"][0]
    assert ps.counters["rejected"] == 1
    assert torch.allclose(ps.get_weights()[1]["w"], torch.full((2, 3), -1.0))


def test_nothing_usable_means_no_step():
    ps = core()
    m, g = contrib(1, 0, 1.0, 1)
    g[0]["w"][0, 0] = float("nan")
    out = apply(ps, 1, (m, g))
    assert not out["applied"] and out["reason"] == "no usable contribution" and ps.version == 0
    assert torch.equal(ps.get_weights()[1]["w"], torch.zeros(2, 3))


def test_sync_refuses_gradients_of_old_weights():
    ps = core()
    apply(ps, 1, contrib(1, 0, 1.0, 1))
    out = apply(ps, 2, contrib(2, 0, 1.0, 1, worker=3))  # computed on version 0, current is 1
    assert not out["applied"] and "computed on weights version 0, current is 1" in out["rejected"][0]


def test_async_staleness_bound():
    ps = core(max_staleness=1)
    apply(ps, 1, contrib(1, 0, 1.0, 1))
    apply(ps, 2, contrib(2, 0, 1.0, 1))  # staleness 1: accepted
    assert ps.version == 2
    out = apply(ps, 3, contrib(3, 0, 1.0, 1))  # staleness 2 > 1: dropped
    assert not out["applied"] and out["stale_dropped"] == 1 and ps.counters["stale_dropped"] == 1
    out = apply(ps, 3, contrib(3, 2, 1.0, 1))
    assert out["applied"] and out["staleness"] == [0]


def test_checkpoint_restore_continues_identically(tmp_path):
    adam = OptimConfig(name="adam", lr=0.1)
    grads = [contrib(s, s - 1, (-1) ** s * s, 2) for s in range(1, 9)]

    ref = core(adam)
    for s, c in enumerate(grads, 1):
        apply(ref, s, c)

    a = core(adam, checkpoint_dir=tmp_path, checkpoint_every=4, fingerprint="fp")
    for s, c in enumerate(grads[:6], 1):
        apply(a, s, c)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-00000004.pt"]
    # A restarted server (a new core over the same folder) resumes at the checkpoint, with the optimizer state.
    b = core(adam, checkpoint_dir=tmp_path, checkpoint_every=4, fingerprint="fp")
    assert b.version == 4 and b.restored_from == "step 4"
    for s, c in enumerate(grads[4:], 5):
        assert apply(b, s, c)["applied"]
    assert torch.equal(b.get_weights()[1]["w"], ref.get_weights()[1]["w"])
    assert torch.equal(b.get_weights()[1]["b"], ref.get_weights()[1]["b"])


def test_restore_refuses_another_models_checkpoint(tmp_path):
    from metatrain.pipeline.checkpoint import CheckpointError

    a = core(checkpoint_dir=tmp_path, checkpoint_every=1, fingerprint="model-a")
    apply(a, 1, contrib(1, 0, 1.0, 1))
    with pytest.raises(CheckpointError, match="different model or config"):
        core(checkpoint_dir=tmp_path, fingerprint="model-b")


def test_learning_rate_schedules():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert learning_rate(cfg, 5, 110) == pytest.approx(0.5)
    assert learning_rate(cfg, 10, 110) == pytest.approx(1.0)
    assert learning_rate(cfg, 60, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(cfg, 110, 110) == pytest.approx(0.1)
    step = OptimConfig(lr=1.0, schedule="step", min_lr_ratio=0.5, step_every=10)
    assert [learning_rate(step, s, 100) for s in (1, 10, 11, 25)] == [1.0, 0.5, 0.5, 0.25]
    assert learning_rate(OptimConfig(lr=0.3), 77, 100) == 0.3


def test_gradient_clipping():
    ps = core(OptimConfig(name="sgd", lr=1.0, clip_norm=1.0))
    out = apply(ps, 1, contrib(1, 0, 3.0, 1))
    assert out["grad_norm"] == pytest.approx(3.0 * math.sqrt(9))
    delta = torch.cat([ps.get_weights()[1]["w"].flatten(), ps.get_weights()[1]["b"].flatten() - 1])
    assert delta.norm().item() == pytest.approx(1.0, rel=1e-5)
