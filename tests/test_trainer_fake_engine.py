"""The Trainer driven by a pure-Python stand-in for the Engine: no Ray is started.

``FakeEngine`` implements the engine methods the trainer uses, over a parameter dict that the fake parameter server
updates by plain SGD on fake gradients: the loss of every task is ``0.5 * ||w - TARGET||^2`` (gradient ``w - TARGET``),
so after ``n`` sync steps ``w = TARGET + (W0 - TARGET) * (1 - LR) ** n`` exactly. Faults follow the real engine's
contract: a dead parameter server surfaces as ``ActorLost`` (or ``WeightsLost``) from its calls and is answered by
``recover_parameter_server`` (restore the newest checkpoint, return its version); an async push whose worker died
surfaces as ``ActorLost`` from ``result`` while ``ps_alive()`` holds, and the trainer reports it via ``fail_worker``.
"""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import numpy as np
import pytest

from metatrain.pipeline.config import load_config
from metatrain.pipeline.distributed.engine import ActorLost, EngineError, FaultLog, WeightsLost, WorkerState
from metatrain.pipeline.distributed.trainer import Trainer

LR = 0.1
W0 = {"w": np.array([1.0, -2.0, 3.0]), "b": np.array([0.5])}
TARGET = {"w": np.array([0.0, 1.0, -1.0]), "b": np.array([2.0])}


def expected_after(n: int) -> dict:
    return {k: TARGET[k] + (W0[k] - TARGET[k]) * (1 - LR) ** n for k in W0}


def loss_of(params: dict) -> float:
    return float(sum(0.5 * np.sum((params[k] - TARGET[k]) ** 2) for k in params))


class RecordingTracker:
    """Stands in for the MLflow tracker: keeps what the trainer logs."""

    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def steps_with(self, key: str) -> list[int]:
        return [s for s, m in self.metrics if key in m]


class FakeEngine:
    """The engine's public surface, in-process. ``fail`` maps (method, step) to an exception raised once there."""

    def __init__(self, cfg, workers: int = 2, checkpoint_every: int = 2, fail: dict | None = None,
                 constant_grad: bool = False):
        self.cfg = cfg
        self.faults = FaultLog()
        self.params = {k: v.copy() for k, v in W0.items()}
        self.version = 0
        self.checkpoint_every = checkpoint_every
        self.snapshots = {0: self._copy()}  # version -> params: the "checkpoints" a restart restores
        self.workers = [WorkerState(handle=None, index=i) for i in range(workers)]
        self.fail = dict(fail or {})
        self.constant_grad = constant_grad  # async: gradients independent of the weights, so order doesn't matter
        self.calls: list[tuple] = []
        self.extra: dict = {}
        self.checkpoints: list[str | None] = []
        self.ps_up = True
        self._tokens = itertools.count()
        self._pending: dict = {}  # meta token -> (worker, step, meta, grads)
        self._grads_by_ref: dict = {}  # grads token -> grads, once its meta was fetched

    def _copy(self) -> dict:
        return {k: v.copy() for k, v in self.params.items()}

    def _maybe_fail(self, method: str, step: int) -> None:
        err = self.fail.pop((method, step), None)
        if err is not None:
            if isinstance(err, ActorLost) and method != "result":
                self.ps_up = False  # the parameter server "died": its state goes back to the newest checkpoint
            raise err

    def _grads(self, weights: dict, slots) -> dict:
        n = len(slots)
        if self.constant_grad:
            return {k: np.ones_like(v) * n for k, v in weights.items()}
        return {k: (weights[k] - TARGET[k]) * n for k in weights}  # summed over the call's tasks

    # ---- the parameter server -------------------------------------------------------------------------------

    def get_weights(self):
        self.calls.append(("get_weights", self.version))
        return self.version, self._copy()

    def apply(self, step: int, metas: list[dict], grads: list) -> dict:
        self.calls.append(("apply", step))
        self._maybe_fail("apply", step)
        grads = [self._grads_by_ref.pop(g) if isinstance(g, int) else g for g in grads]  # async: tokens
        n = sum(m["n_tasks"] for m in metas)
        total = {k: sum(g[k] for g in grads) / n for k in self.params}
        for k in self.params:
            self.params[k] = self.params[k] - LR * total[k]
        self.version += 1
        if self.version % self.checkpoint_every == 0:
            self.snapshots[self.version] = self._copy()
        return {"applied": True, "tasks": n, "counters": {"rejected": 0, "stale_dropped": 0},
                "staleness": [self.version - 1 - m["version"] for m in metas], "lr": LR,
                "grad_norm": float(np.sqrt(sum(np.sum(t ** 2) for t in total.values()))), "apply_s": 0.0,
                "rejected": []}

    def set_extra(self, **values) -> None:
        self.extra.update(values)

    def checkpoint(self, name=None, timeout=None):
        self.checkpoints.append(name)
        return name

    def ps_alive(self, timeout: float = 5.0) -> bool:
        return self.ps_up

    def recover_parameter_server(self) -> int:
        self.faults.ps_restarts += 1
        self.version = max(self.snapshots)
        self.params = {k: v.copy() for k, v in self.snapshots[self.version].items()}
        self.ps_up = True
        self.faults.events.append(f"parameter server restarted; restored step {self.version}")
        return self.version

    # ---- workers ----------------------------------------------------------------------------------------------

    def alive(self) -> list[WorkerState]:
        live = [ws for ws in self.workers if ws.in_service]  # a crashed worker never comes back here
        if not live:
            raise EngineError("every worker has failed; see the events above")
        return live

    def fail_worker(self, ws: WorkerState, job, why: str, size=len, crash_epoch: int | None = None) -> None:
        self.faults.worker_failures += ws.count_loss(crash_epoch, self.cfg.workers.max_restarts)
        self.faults.recomputed_slots += size(job)
        self.faults.events.append(f"worker {ws.index} lost {size(job)} slots ({why})")

    def _meta(self, ws_index: int, version: int, weights: dict, slots) -> dict:
        loss = loss_of(weights)
        return {"n_tasks": len(slots), "version": version, "worker": ws_index, "compute_s": 0.01, "sample_s": 0.0,
                "metrics": {"query_loss": loss, "query_acc": 1.0 / (1.0 + loss)}}

    def compute(self, step: int, version: int, weights, slots):
        self.calls.append(("compute", step))
        self._maybe_fail("compute", step)
        slots = list(slots)
        live = self.alive()
        chunks = [c for c in np.array_split(np.asarray(slots), len(live)) if len(c)]
        return [(self._meta(ws.index, version, weights, c), self._grads(weights, c)) for ws, c in zip(live, chunks)]

    def evaluate(self, weights, split: str, step: int, n_tasks: int) -> list[dict]:
        loss = loss_of(weights)
        return [{"slot": i, "query_loss": loss, "query_acc": 1.0 / (1.0 + loss)} for i in range(n_tasks)]

    # ---- async pushes -----------------------------------------------------------------------------------------

    def submit(self, ws: WorkerState, step: int, version: int, weights, blocks):
        slots = [s for b in blocks for s in b]
        meta_ref, grad_ref = next(self._tokens), next(self._tokens)
        self._pending[meta_ref] = (ws.index, step, self._meta(ws.index, version, weights, slots),
                                   self._grads(weights, slots))
        return meta_ref, grad_ref

    def next_done(self, refs, timeout):
        refs = list(refs)
        return refs[0] if refs else None  # first submitted, first done

    def result(self, ref):
        ws_index, step, meta, grads = self._pending[ref]
        self._maybe_fail("result", (ws_index, step))
        self._grads_by_ref[ref + 1] = grads
        return meta

    def wait_all(self, refs, timeout) -> None:
        self.drained = list(refs)


def config(*extra):
    return load_config(None, ["train.steps=5", "train.meta_batch=4", "train.val_every=0", "workers.count=2",
                              *extra])


def train(cfg, engine, start: int = 1):
    tracker = RecordingTracker()
    trainer = Trainer(cfg, engine, tracker, out_dir=None, quiet=True)
    last = trainer.run(start)
    return last, trainer, tracker


def assert_params(params: dict, expected: dict) -> None:
    for k in expected:
        np.testing.assert_allclose(params[k], expected[k], rtol=0, atol=1e-12)


def test_sync_runs_every_step_and_sgd_gives_the_expected_parameters():
    cfg = config()
    engine = FakeEngine(cfg)
    last, trainer, tracker = train(cfg, engine)
    assert last == engine.version == 5
    assert [s for kind, s in engine.calls if kind == "apply"] == [1, 2, 3, 4, 5]
    assert_params(engine.params, expected_after(5))
    # One train/* point per step, with the loss of the weights that step was computed on.
    assert tracker.steps_with("train/loss") == [1, 2, 3, 4, 5]
    for step, m in tracker.metrics:
        assert m["train/loss"] == pytest.approx(loss_of(expected_after(step - 1)))
        assert m["ps/lr"] == LR and m["faults/worker_failures"] == 0 and m["faults/ps_restarts"] == 0
        assert m["time/step_s"] >= 0 and "train/acc" in m
    assert [h["step"] for h in trainer.history] == [1, 2, 3, 4, 5]
    assert not tracker.steps_with("val/acc") and engine.checkpoints == []


def test_a_resumed_run_starts_at_its_start_step():
    cfg = config()
    engine = FakeEngine(cfg)
    for step in (1, 2):  # as if a previous driver had applied two steps
        meta, grads = zip(*engine.compute(step, engine.version, engine.get_weights()[1], range(4)))
        engine.apply(step, list(meta), list(grads))
    last, _, tracker = train(cfg, engine, start=3)
    assert last == 5
    assert tracker.steps_with("train/loss") == [3, 4, 5]
    assert_params(engine.params, expected_after(5))


def test_validation_logs_val_metrics_and_checkpoints_each_new_best():
    cfg = config("train.val_every=2", "train.val_tasks=3")
    engine = FakeEngine(cfg)
    last, _, tracker = train(cfg, engine)
    assert last == 5 and tracker.steps_with("val/acc") == [2, 4]
    for step, m in tracker.metrics:
        if "val/acc" in m:
            assert m["val/loss"] == pytest.approx(loss_of(expected_after(step)))
    # The loss falls every step: each validation is a new best, checkpointed as such.
    assert engine.checkpoints == ["best", "best"]
    assert engine.extra["best_step"] == 4
    assert engine.extra["best_val"] == pytest.approx(1 / (1 + loss_of(expected_after(4))))


@pytest.mark.parametrize("method, error", [("apply", ActorLost("parameter server: ActorDiedError")),
                                           ("compute", WeightsLost("weights lost"))])
def test_a_lost_parameter_server_is_recovered_and_the_result_unchanged(method, error):
    cfg = config()
    engine = FakeEngine(cfg, checkpoint_every=2, fail={(method, 4): error})
    last, _, tracker = train(cfg, engine)
    assert last == engine.version == 5
    assert engine.faults.ps_restarts == 1
    # Restored at step 2, so steps 3 and 4 ran again; step 3 (already logged) is not logged twice.
    applied = [s for kind, s in engine.calls if kind == "apply"]
    assert applied == ([1, 2, 3, 4, 3, 4, 5] if method == "apply" else [1, 2, 3, 3, 4, 5])
    assert tracker.steps_with("train/loss") == [1, 2, 3, 4, 5]
    assert_params(engine.params, expected_after(5))
    assert tracker.metrics[-1][1]["faults/ps_restarts"] == 1


def test_a_step_the_parameter_server_refuses_ends_the_run():
    cfg = config()
    engine = FakeEngine(cfg)
    engine.apply = lambda step, metas, grads: {"applied": False, "reason": "no usable contribution",
                                               "rejected": ["non-finite gradient"]}
    with pytest.raises(EngineError, match="step 1 could not be applied: no usable contribution"):
        train(cfg, engine)


def test_a_sync_run_with_every_worker_retired_ends_with_the_engine_error():
    cfg = config()
    engine = FakeEngine(cfg)
    for ws in engine.workers:
        ws.alive = False
    with pytest.raises(EngineError, match="every worker has failed"):
        train(cfg, engine)


def test_async_applies_every_push_and_a_dead_worker_is_retired():
    # Worker 0 dies under its second push (submission 3) and has no restarts left: it is retired, its push counted
    # as a worker failure, and worker 1 computes the rest.
    cfg = config("train.mode=async", "workers.max_restarts=0", "train.steps=6")
    engine = FakeEngine(cfg, constant_grad=True, fail={("result", (0, 3)): ActorLost("ActorDiedError")})
    last, _, tracker = train(cfg, engine)
    assert last == engine.version == 6
    assert tracker.steps_with("train/loss") == [1, 2, 3, 4, 5, 6]
    assert engine.faults.worker_failures == 1 and engine.faults.recomputed_slots == 2  # per_push = 4 / 2 workers
    assert engine.faults.ps_restarts == 0
    assert [ws.alive for ws in engine.workers] == [False, True]
    # Constant gradients (1 per task, mean 1): 6 SGD steps of LR from W0.
    assert_params(engine.params, {k: W0[k] - 6 * LR for k in W0})
    assert tracker.metrics[-1][1]["faults/worker_failures"] == 1
    # The retired worker's push went to worker 1, which then keeps two in flight; both are waited for at the end.
    assert [engine._pending[r][0] for r in engine.drained] == [1, 1]


def test_async_a_lost_parameter_server_is_recovered():
    cfg = config("train.mode=async", "train.steps=4")
    engine = FakeEngine(cfg, constant_grad=True, checkpoint_every=2,
                        fail={("apply", 3): ActorLost("parameter server: ActorDiedError")})
    last, _, tracker = train(cfg, engine)
    assert last == engine.version == 4
    assert engine.faults.ps_restarts == 1 and engine.faults.worker_failures == 0
    assert_params(engine.params, {k: W0[k] - 4 * LR for k in W0})


def test_the_trainer_does_not_use_ray_itself():
    import metatrain.pipeline.distributed.trainer as trainer_module

    assert not hasattr(trainer_module, "ray")
    source = open(trainer_module.__file__).read()
    assert ".remote(" not in source and "import ray" not in source and "from ray" not in source


def test_a_time_budget_that_stops_a_cosine_schedule_early_says_how_far_it_got(capsys, monkeypatch):
    """A cosine schedule anneals over train.steps; a time budget that ends the run first leaves it part-way, and
    the closing line says where (Reptile's budget runs kept lr ~1.0 for this reason)."""
    import metatrain.pipeline.distributed.trainer as trainer_module

    clock = itertools.count(0.0, 1.0)  # one "second" per look at the clock: the budget ends a few steps in
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(monotonic=lambda: next(clock),
                                                                perf_counter=time.perf_counter))
    cfg = config("train.steps=8", "optim.schedule=cosine", "optim.lr=0.1", "train.time_budget_s=3.5")
    last, _, _ = train(cfg, FakeEngine(cfg))
    err = "".join(capsys.readouterr())  # tqdm.write: stdout
    assert f"time budget of 3.5 s reached after step {last}" in err and 0 < last < 8
    lr = 0.1 * 0.5 * (1 + np.cos(np.pi * last / 8))
    assert f"the cosine schedule stopped at lr {lr:.3g} of 0.1" in err and "train.steps = 8" in err
