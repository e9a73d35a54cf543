"""The distributed engine on a real local Ray: worker-count independence, a killed worker, a killed parameter server.

One Ray per module (``ray.init(num_cpus=2)``). Runs are tiny (Conv4 with 8 filters, 4 tasks per step) so that each
takes seconds; what is checked is exact bookkeeping: the final parameters of a faulty run equal a clean run's.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
import torch
from metatrain.models import CoordinateLSTM

from metatrain.pipeline.components import initial_params
from metatrain.pipeline.config import load_config
from metatrain.pipeline.distributed.engine import Engine, proportional_counts, split_slots
from metatrain.pipeline.distributed.trainer import Trainer

pytestmark = pytest.mark.data

STEPS = 5


class RecordingTracker:
    """Stands in for the MLflow tracker: keeps what the trainer logs."""

    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tiny(store, *extra):
    return load_config(None, [f"data.path={store}", "model.hidden=8", "algorithm.name=fomaml",
                              "algorithm.inner_steps=2", f"train.steps={STEPS}", "train.meta_batch=4",
                              "train.val_every=0", "train.checkpoint_every=2", "workers.cpus=1", *extra])


def run(cfg, tmp_path, name, hook=None):
    """Train cfg for STEPS steps on a fresh engine; ``hook(engine, trainer)`` may inject a fault. Returns weights."""
    engine = Engine(cfg, str(tmp_path / name / "checkpoints"), log=lambda s: None)
    try:
        trainer = Trainer(cfg, engine, RecordingTracker(), tmp_path / name, quiet=True)
        if hook:
            hook(engine, trainer)
        last = trainer.run(1)
        version, ref = engine.get_weights()
        return last, version, ray.get(ref), engine.faults, trainer.tracker.metrics
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def clean(omniglot_store, tmp_path_factory):
    return run(tiny(omniglot_store, "workers.count=2"), tmp_path_factory.mktemp("clean"), "two")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"parameter {k} differs")


def test_split_slots_is_contiguous_and_complete():
    assert split_slots(range(10), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert split_slots(range(2), 4) == [[0], [1]]


def test_one_and_two_workers_give_the_same_parameters(clean, omniglot_store, tmp_path):
    last, version, weights, faults, metrics = clean
    assert last == version == STEPS and faults.worker_failures == 0
    assert [s for s, _ in metrics] == list(range(1, STEPS + 1))
    first = metrics[0][1]
    assert {"train/loss", "train/acc", "ps/staleness", "ps/rejected", "time/step_s", "time/tasks_per_s"} <= set(first)
    assert first["ps/staleness"] == 0 and first["ps/rejected"] == 0
    one = run(tiny(omniglot_store, "workers.count=1"), tmp_path, "one")
    assert one[1] == STEPS
    assert_same(one[2], weights)
    # The reduction tree makes it exact, not merely close: every float32 addition is the same.
    assert all(torch.equal(one[2][k], weights[k]) for k in weights)
    initial = run(tiny(omniglot_store, "workers.count=1", "train.steps=1"), tmp_path, "init")[2]
    assert not torch.allclose(initial["head.weight"], weights["head.weight"])  # training moved the weights


def test_meta_lstm_one_and_two_workers_give_the_same_parameters(omniglot_store, tmp_path):
    """The learned update rule through the same workers and server: c_0 and the meta_lstm.* weights are
    bit-identical whether one worker or two computed the tasks."""
    cfgs = [tiny(omniglot_store, "algorithm.name=meta_lstm", "algorithm.inner_steps=2", "train.steps=2",
                 "optim.clip_norm=0.25", f"workers.count={n}") for n in (1, 2)]
    (_, v1, one, *_), (_, v2, two, *_) = (run(c, tmp_path, f"w{i}") for i, c in enumerate(cfgs))
    assert v1 == v2 == 2 and one.keys() == two.keys() and any(k.startswith("meta_lstm.") for k in one)
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_l2l_gd_one_and_two_workers_give_the_same_parameters(tmp_path):
    """The learned optimizer through the same workers and server: a slot is one optimizee trajectory, and the LSTM's
    weights after 2 steps of 4 trajectories are bit-identical whether one worker or two unrolled them."""
    cfgs = [load_config("configs/quadratic_l2l_gd.yaml", ["algorithm.unroll=10", "algorithm.truncation=5",
                                                          "train.steps=2", "train.meta_batch=4", "train.val_every=0",
                                                          "workers.cpus=1", f"workers.count={n}"]) for n in (1, 2)]
    (_, v1, one, *_), (_, v2, two, *_) = (run(c, tmp_path, f"l2l{i}") for i, c in enumerate(cfgs))
    assert v1 == v2 == 2 and set(one) == {k for k, _ in CoordinateLSTM().named_parameters()}
    assert all(torch.equal(one[k], two[k]) for k in one)
    fresh = initial_params(cfgs[0], CoordinateLSTM())
    assert not all(torch.equal(one[k], fresh[k]) for k in one)  # the server did update the optimizer


def test_proportional_counts_follow_the_speeds():
    assert proportional_counts(32, [1.0, 1.0]) == [16, 16]
    assert proportional_counts(32, [14.7, 12.5]) == [17, 15]
    assert proportional_counts(10, [3.0, 1.0, 1.0]) == [6, 2, 2]
    assert proportional_counts(5, [100.0, 1.0, 1.0]) == [3, 1, 1]  # nobody gets nothing while there is enough
    assert proportional_counts(3, [1.0] * 4) == [1, 1, 1]


def test_an_uneven_split_by_speed_gives_the_same_parameters_bit_for_bit(clean, omniglot_store, tmp_path):
    """workers.balance=speed: a worker measured 3x faster gets 3 of the 4 tasks; the parameters do not change."""
    splits = []

    def skew(engine, trainer):
        original = engine.compute

        def compute(*args, **kw):
            engine.speeds = {0: 3.0, 1: 1.0}  # as if worker 0 had measured 3x faster
            out = original(*args, **kw)
            splits.append([m["n_tasks"] for m, _ in out])
            return out

        engine.compute = compute

    last, version, weights, faults, _ = run(tiny(omniglot_store, "workers.count=2", "workers.balance=speed"),
                                            tmp_path, "skew", skew)
    assert last == version == STEPS and faults.worker_failures == 0
    assert splits == [[3, 1]] * STEPS
    assert all(torch.equal(weights[k], clean[2][k]) for k in weights)


def test_a_killed_worker_costs_one_restart_and_comes_back_with_the_result_unchanged(omniglot_store, tmp_path):
    steps = 10
    calls_after_crash = []

    def kill_worker_mid_step(engine, trainer):
        pid = ray.get(engine.workers[0].handle.ping.remote())["pid"]
        original = engine.dispatch

        def dispatch(jobs, call, **kw):
            # A longer run, compressed: once the crash is seen, the next step waits until Ray's restarted actor
            # has answered the engine's ping (a few seconds here), as steps would go on meanwhile in a real run.
            deadline = time.monotonic() + 120
            while engine.faults.worker_failures and not engine.workers[0].in_service and time.monotonic() < deadline:
                engine.alive()
                time.sleep(0.2)
            def call_and_kill(handle, job):
                if engine.faults.worker_failures:
                    calls_after_crash.append(handle is engine.workers[0].handle)
                refs = call(handle, job)
                if handle is engine.workers[0].handle and job[1] == [[0], [1]] and not state["killed"]:
                    state["killed"] = True
                    os.kill(pid, signal.SIGKILL)  # dies with the call in flight
                return refs
            return original(jobs, call_and_kill, **kw)

        state = {"killed": False}
        engine.dispatch = dispatch

    cfg = tiny(omniglot_store, "workers.count=2", f"train.steps={steps}")
    last, version, weights, faults, _ = run(cfg, tmp_path, "kill", kill_worker_mid_step)
    assert last == version == steps
    # One crash is one failure, however many calls Ray refused while it restarted the actor; the worker is not
    # retired, it takes work again once the restarted actor answers.
    assert faults.worker_failures == 1 and faults.recomputed_slots >= 2, faults.events
    assert any("worker 0 lost 2 slots" in e for e in faults.events)
    assert any("worker 0 is back in service" in e for e in faults.events), faults.events
    assert not any("retired" in e for e in faults.events)
    assert True in calls_after_crash and calls_after_crash[0] is False, calls_after_crash
    assert_same(weights, run(cfg, tmp_path, "clean")[2])


def test_a_killed_parameter_server_restarts_from_its_checkpoint(clean, omniglot_store, tmp_path):
    applied_steps = []

    def kill_ps_before_step_4(engine, trainer):
        original = engine.apply

        def apply(step, metas, grads):
            if step == 4 and not state["killed"]:
                state["killed"] = True
                os.kill(engine.ps_status()["pid"], signal.SIGKILL)
            out = original(step, metas, grads)
            if out["applied"]:
                applied_steps.append((engine.ps_status()["pid"], step))
            return out

        state = {"killed": False}
        engine.apply = apply

    cfg = tiny(omniglot_store, "workers.count=2")
    last, version, weights, faults, logged = run(cfg, tmp_path, "ps", kill_ps_before_step_4)
    assert last == version == STEPS and faults.ps_restarts == 1
    assert any("restored step 2" in e for e in faults.events)
    # Steps 1-3 on the first server, then (checkpoint at 2) steps 3-5 on the restarted one: each server applied
    # each step once, and the restarted one redid exactly the step lost with the first.
    pids = [p for p, _ in applied_steps]
    first, second = pids[0], pids[-1]
    assert first != second
    assert [s for p, s in applied_steps if p == first] == [1, 2, 3]
    assert [s for p, s in applied_steps if p == second] == [3, 4, 5]
    assert_same(weights, clean[2])
    # Step 3, applied twice (once per server), reached the tracker once, with the clean run's values.
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5]
    for (_, m), (_, c) in zip(logged, clean[4]):
        assert m["train/loss"] == pytest.approx(c["train/loss"], rel=1e-5)


def test_async_mode_applies_fresh_pushes_and_drops_stale_ones(omniglot_store, tmp_path):
    cfg = tiny(omniglot_store, "workers.count=2", "train.mode=async", "train.max_staleness=0", "train.steps=6")
    last, version, weights, faults, metrics = run(cfg, tmp_path, "async")
    assert last == version == 6
    steps = [s for s, m in metrics if "train/loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]
    # With two workers pushing and no staleness allowed, a worker's push computed on weights its peer has moved
    # since is dropped and counted; every applied push had staleness 0.
    applied = [m for _, m in metrics if "train/loss" in m]
    assert all(m["ps/staleness"] == 0 for m in applied)
    dropped = max(m.get("ps/stale_dropped", 0) for _, m in metrics)
    assert dropped >= 1
    assert all(torch.isfinite(w).all() for w in weights.values())
