"""The distributed engine: places the actors, schedules slots on workers, survives their deaths.

``Engine`` creates one ``ParameterServer`` (pinned to the driver's node, where the run's folder is) and
``workers.count`` ``TaskWorker`` actors in a placement group (PACK by default, SPREAD as an option), each with
``workers.cpus`` CPUs and ``workers.gpus`` (possibly fractional) GPUs; inside a Ray Tune trial, in the trial's own
placement group (``trial_placement_group``). Scheduling never blocks on one worker: every
loop waits on futures with ``ray.wait`` and handles whichever finishes first.

Faults. A worker that dies mid-call (its process killed, its node removed) surfaces as a Ray actor error on its
futures; its slots go to the live workers, and Ray restarts the actor (``workers.max_restarts``). The crash counts
one failure, however many calls were in flight; the worker gets no work while Ray restarts it and rejoins once the
new actor answers a ping (``faults/worker_failures`` counts crashes and timeouts, not the calls refused meanwhile).
Because episodes are pure functions of (seed, step, slot), the recomputed slots are the same tasks and a sync run
ends with the parameters of a clean run. A parameter server that dies is restarted by Ray from its newest checkpoint;
``recover_parameter_server`` returns its version and the driver recomputes the steps after it. A call slower than
``workers.task_timeout_s`` is treated as lost and recomputed elsewhere. An error *raised by our code* inside a worker
(a non-finite gradient, a bad label) is not a fault: it is re-raised to the driver as its own exception type.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ray
from metatrain.tasks.errors import MetatrainError
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from metatrain.pipeline.config import Config, ConfigError
from metatrain.pipeline.distributed.actors import ParameterServer, TaskWorker

PLACEMENT_TIMEOUT_S = 60.0
PS_RECOVERY_TIMEOUT_S = 180.0
RESTART_PING_S = 0.5  # how often a restarting worker is pinged


class EngineError(MetatrainError):
    """The cluster cannot run this configuration, or every worker failed."""


class WeightsLost(Exception):
    """The weights object a call depended on is gone (its owner, the parameter server, died): refetch and redo."""


class ActorLost(Exception):
    """An actor died under a call: the parameter server (``recover_parameter_server``) or, for an async push, the
    worker that computed it (``ps_alive`` tells which). Ray's own error is its ``__cause__``."""


def _is_lost_object(e: BaseException | None) -> bool:
    return isinstance(e, ObjectLostError)


def split_slots(slots, parts: int) -> list[list[int]]:
    """Contiguous, near-equal chunks (none empty): the same slots per step however many workers there are."""
    arr = np.asarray(list(slots), dtype=np.int64)
    return [c.tolist() for c in np.array_split(arr, min(parts, len(arr))) if len(c)]


def proportional_counts(n: int, speeds: list[float]) -> list[int]:
    """``n`` items cut in proportion to ``speeds`` (largest remainders; each part >= 1 while n allows).

    A sync step waits for its slowest worker, so unequal cores (a busy neighbour on a shared host, mixed GPUs)
    should get unequal shares: each part's expected time is then about the same.
    """
    k = min(len(speeds), n)
    speeds = [max(float(s), 1e-9) for s in speeds[:k]]
    ideal = [n * s / sum(speeds) for s in speeds]
    counts = [max(1, int(x)) for x in ideal]
    while sum(counts) > n:  # the max(1, .) floors can overshoot
        i = max((i for i in range(k) if counts[i] > 1), key=lambda i: counts[i] - ideal[i])
        counts[i] -= 1
    for i in sorted(range(k), key=lambda i: ideal[i] - counts[i], reverse=True)[:n - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class WorkerState:
    handle: ray.actor.ActorHandle
    index: int
    failures: int = 0  # crashes and timeouts; past workers.max_restarts the worker is retired
    alive: bool = True
    crashes: int = 0  # the crash count when a call was submitted tells a new crash from its in-flight casualties
    restarting: bool = False  # after a crash, until the actor Ray restarts answers a ping: no work meanwhile
    probe: object = None  # that ping, while in flight
    retry_at: float = 0.0  # when to ping again after a refused ping
    down_since: float = 0.0

    @property
    def in_service(self) -> bool:
        return self.alive and not self.restarting

    def count_loss(self, crash_epoch: int | None, max_restarts: int) -> bool:
        """A lost call (see ``Engine.fail_worker``); whether it counts as a failure."""
        counted = crash_epoch is None or (crash_epoch == self.crashes and not self.restarting)
        if counted:
            self.failures += 1
            if self.failures > max_restarts:
                self.alive = self.restarting = False
            elif crash_epoch is not None:
                self.crashes += 1
                self.restarting, self.down_since, self.retry_at = True, time.monotonic(), 0.0
        return counted


@dataclass
class FaultLog:
    """What the engine survived, for metrics and reports."""

    worker_failures: int = 0
    recomputed_slots: int = 0
    ps_restarts: int = 0
    timeouts: int = 0
    events: list[str] = field(default_factory=list)


def check_resources(cfg: Config) -> None:
    """Refuse, with one line, a worker set-up the connected Ray cluster cannot hold (rather than hang placing it)."""
    w = cfg.workers
    total = ray.cluster_resources()
    if w.gpus > 0 and total.get("GPU", 0) < w.gpus * w.count - 1e-9:
        raise ConfigError(f"workers.gpus = {w.gpus:g} x {w.count} workers needs {w.gpus * w.count:g} GPUs; the Ray "
                          f"cluster has {total.get('GPU', 0):g} (set workers.gpus=0 to train on CPUs)")
    if total.get("CPU", 0) < w.cpus * w.count - 1e-9:
        raise ConfigError(f"workers.cpus = {w.cpus:g} x {w.count} workers needs {w.cpus * w.count:g} CPUs; the Ray "
                          f"cluster has {total.get('CPU', 0):g} (lower workers.count or workers.cpus)")


def worker_bundle(cfg: Config) -> dict:
    """The resources of one worker, as a placement-group bundle."""
    w = cfg.workers
    bundle = {"CPU": w.cpus} | ({"GPU": w.gpus} if w.gpus else {})
    return bundle if any(bundle.values()) else {"CPU": 0.01}  # a placement group bundle cannot be empty


def trial_placement_group(count: int, bundle: dict):
    """The placement group a Tune trial runs in (with child capture), or None: the workers go into its bundles
    0..count-1, as a placement group of their own would be a second reservation beside the trial's."""
    from ray.util.placement_group import get_current_placement_group

    pg = get_current_placement_group()
    if pg is None or not ray.get_runtime_context().should_capture_child_tasks_in_placement_group:
        return None
    specs = pg.bundle_specs
    if len(specs) < count or any(spec.get(k, 0) < v - 1e-9 for spec in specs[:count] for k, v in bundle.items()):
        raise EngineError(f"workers: this process's placement group holds bundles {specs}, not {count} x {bundle}; "
                          f"reserve one bundle per worker for it")
    return pg


def poll_restarts(workers: list[WorkerState], wait_s: float, event: Callable[[str], None]) -> None:
    """Ping the restarting workers and collect the answers, waiting up to ``wait_s`` for one to come back; a
    refused ping is retried after RESTART_PING_S, and a worker not back within PS_RECOVERY_TIMEOUT_S retired."""
    deadline = time.monotonic() + wait_s
    while True:
        down = [ws for ws in workers if ws.alive and ws.restarting]
        if not down:
            return
        now = time.monotonic()
        for ws in down:
            if now - ws.down_since > PS_RECOVERY_TIMEOUT_S:  # refused or unanswered all this time
                ws.alive = ws.restarting = False
                event(f"worker {ws.index} did not come back within {PS_RECOVERY_TIMEOUT_S:.0f} s; retired")
            elif ws.probe is None and now >= ws.retry_at:
                ws.probe = ws.handle.ping.remote()
        down = [ws for ws in down if ws.alive]
        probes = {ws.probe: ws for ws in down if ws.probe is not None}
        left = max(0.0, deadline - now)
        ready = ray.wait(list(probes), num_returns=len(probes), timeout=min(left, RESTART_PING_S))[0] \
            if probes else []
        for ref in ready:
            ws = probes[ref]
            ws.probe = None
            try:
                ray.get(ref)
            except RayActorError:  # still restarting (ActorUnavailableError) or not yet replaced
                ws.retry_at = time.monotonic() + RESTART_PING_S
                continue
            ws.restarting = False
            event(f"worker {ws.index} is back in service after {time.monotonic() - ws.down_since:.1f} s")
        if any(ws.in_service for ws in workers) or time.monotonic() >= deadline:
            return
        if not probes:
            time.sleep(min(RESTART_PING_S, max(0.0, deadline - time.monotonic())))


def wait_ready(ps, workers: list[WorkerState]) -> None:
    """Block until the parameter server and every worker answer (or raise EngineError naming the one that did not)."""
    refs = {ps.status.remote(): "parameter server"}
    refs |= {ws.handle.ping.remote(): f"worker {ws.index}" for ws in workers}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=PS_RECOVERY_TIMEOUT_S)
        if not ready:
            raise EngineError(f"{', '.join(refs[r] for r in pending)} did not start within "
                              f"{PS_RECOVERY_TIMEOUT_S:.0f} s")
        try:
            ray.get(ready[0])
        except RayError as e:
            raise EngineError(f"{refs[ready[0]]} failed to start: {str(e).strip().splitlines()[-1]}") from None


class Engine:
    """The actors of one run and the loops that feed them; see the module docstring."""

    def __init__(self, cfg: Config, checkpoint_dir: str, log: Callable[[str], None] = print,
                 check: bool = True):
        """``check=False``: the caller has already run ``check_resources(cfg)`` on this cluster."""
        self.cfg = cfg
        self.log = log
        self.faults = FaultLog()
        self.speeds: dict[int, float] = {}  # worker index -> tasks/s of its last compute calls (moving average)
        w = cfg.workers
        if check:
            check_resources(cfg)
        bundle = worker_bundle(cfg)
        self.pg, self.owns_pg = trial_placement_group(w.count, bundle), False
        here = ray.get_runtime_context().get_node_id()
        # The parameter server writes the run's checkpoints: on the driver's node, where OUT is. Inside a trial's
        # reservation, that is bundle 0 (the trial's driver runs there with no resources of its own).
        ps_strategy = NodeAffinitySchedulingStrategy(node_id=here, soft=False) if self.pg is None else \
            PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0)
        if self.pg is None:
            self.pg, self.owns_pg = placement_group([dict(bundle) for _ in range(w.count)], strategy=w.placement), True
            try:
                ray.get(self.pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
            except GetTimeoutError:
                remove_placement_group(self.pg)
                raise EngineError(f"workers: cannot place {w.count} workers x {bundle} with strategy "
                                  f"{w.placement} within {PLACEMENT_TIMEOUT_S:.0f} s (cluster has "
                                  f"{ray.available_resources()})") from None
        config = cfg.to_dict()
        self.ps = ParameterServer.options(num_cpus=0, max_restarts=-1, max_task_retries=0,
                                          scheduling_strategy=ps_strategy).remote(config, checkpoint_dir)
        self.workers = [
            WorkerState(TaskWorker.options(
                num_cpus=w.cpus, num_gpus=w.gpus, max_restarts=w.max_restarts, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(config, i), i)
            for i in range(w.count)
        ]
        wait_ready(self.ps, self.workers)

    # ---- set-up -------------------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        for ws in self.workers:
            ray.kill(ws.handle, no_restart=True)
        ray.kill(self.ps, no_restart=True)
        if self.owns_pg:  # a trial's reservation is its scheduler's to free
            remove_placement_group(self.pg)

    # ---- the parameter server -----------------------------------------------------------------------------------

    def ps_status(self, timeout: float = PS_RECOVERY_TIMEOUT_S) -> dict:
        """The parameter server's version, counters, pid, restored checkpoint and extras; ``ActorLost`` if it died."""
        try:
            return ray.get(self.ps.status.remote(), timeout=timeout)
        except RayActorError as e:
            raise ActorLost(f"parameter server: {type(e).__name__}") from e

    def pids(self) -> dict[str, int]:
        """{"worker 0": pid, ..., "parameter server": pid}: for watching the actors' processes (bench/soak.py)."""
        out = {f"worker {ws.index}": ray.get(ws.handle.ping.remote())["pid"] for ws in self.workers}
        return out | {"parameter server": self.ps_status()["pid"]}

    def ps_alive(self, timeout: float = 5.0) -> bool:
        """Whether the parameter server answers within ``timeout`` seconds."""
        try:
            self.ps_status(timeout=timeout)
        except Exception:
            return False
        return True

    def recover_parameter_server(self) -> int:
        """Wait for Ray to restart the parameter server (it restores its newest checkpoint); return its version."""
        self.faults.ps_restarts += 1
        deadline = time.monotonic() + PS_RECOVERY_TIMEOUT_S
        while True:
            try:
                status = self.ps_status(timeout=max(1.0, deadline - time.monotonic()))
                break
            except ActorLost:
                if time.monotonic() > deadline:
                    raise EngineError("the parameter server died and did not come back") from None
                time.sleep(0.5)
            except GetTimeoutError:
                raise EngineError("the parameter server died and did not come back") from None
        msg = (f"parameter server restarted (pid {status['pid']}), restored {status['restored_from'] or 'nothing'}; "
               f"continuing from step {status['version'] + 1}")
        self.faults.events.append(msg)
        self.log(msg)
        return int(status["version"])

    def get_weights(self):
        """(version, ref) of the current meta-parameters; ``ActorLost`` if the parameter server died."""
        try:
            version, (ref,) = ray.get(self.ps.get_weights.remote())
        except RayActorError as e:
            raise ActorLost(f"parameter server: {type(e).__name__}") from e
        return version, ref

    def apply(self, step: int, metas: list[dict], grad_refs: list) -> dict:
        """One optimizer step from the workers' gradient refs; ``ActorLost`` if the parameter server died."""
        try:
            return ray.get(self.ps.apply_gradients.remote(step, metas, *grad_refs))
        except RayActorError as e:
            raise ActorLost(f"parameter server: {type(e).__name__}") from e

    def set_extra(self, **values) -> None:
        """Values stored with every later checkpoint (run id, image shape, best validation score)."""
        try:
            ray.get(self.ps.set_extra.remote(**values))
        except RayActorError as e:
            raise ActorLost(f"parameter server: {type(e).__name__}") from e

    def checkpoint(self, name: str | None = None, timeout: float | None = None) -> str | None:
        """Have the parameter server write a checkpoint (periodic, or ``name``: "best", "final"); return its path."""
        try:
            return ray.get(self.ps.checkpoint.remote(name), timeout=timeout)
        except RayActorError as e:
            raise ActorLost(f"parameter server: {type(e).__name__}") from e

    # ---- dispatching slots --------------------------------------------------------------------------------------

    def alive(self) -> list[WorkerState]:
        """The workers in service. A crashed worker rejoins once the actor Ray restarted answers a ping; this waits
        for one only when no worker is in service."""
        poll_restarts(self.workers, 0.0, self._event)
        if not any(ws.in_service for ws in self.workers) and any(ws.alive for ws in self.workers):
            poll_restarts(self.workers, PS_RECOVERY_TIMEOUT_S, self._event)
        live = [ws for ws in self.workers if ws.in_service]
        if not live:
            raise EngineError("every worker has failed; see the events above")
        return live

    def _event(self, msg: str) -> None:
        self.faults.events.append(msg)
        self.log(msg)

    def fail_worker(self, ws: WorkerState, job, why: str, size: Callable = len, crash_epoch: int | None = None
                    ) -> None:
        """A call of ``ws`` was lost; its ``size(job)`` slots are recomputed on another worker.

        ``crash_epoch`` (``ws.crashes`` when the call was submitted) marks an actor crash: the first lost call of a
        crash counts it once and takes the worker out of service until Ray's restarted actor answers; the other
        calls in flight at that crash count nothing. A timeout (no ``crash_epoch``) counts each time. Past
        ``workers.max_restarts`` counted failures the worker is retired.
        """
        self.faults.recomputed_slots += size(job)
        counted = ws.count_loss(crash_epoch, self.cfg.workers.max_restarts)
        self.faults.worker_failures += counted
        self._event(f"worker {ws.index} lost {size(job)} slots ({why}); recomputing them on another worker"
                    + ("" if ws.alive else f"; worker {ws.index} retired after {ws.failures} failures")
                    + ("; waiting for Ray to restart it" if counted and ws.restarting else ""))

    def dispatch(self, jobs: list, call: Callable, size: Callable = len) -> list[tuple[object, object, tuple]]:
        """Run every job on some worker; return (job, first result, other refs) per job, in job order.

        ``call(handle, job)`` submits the job and returns a tuple of refs; the first ref is waited on and fetched
        (it must be small: metadata or metrics), the others are passed back unfetched (gradients). ``size(job)``
        counts its slots, for the fault log.
        """
        timeout = self.cfg.workers.task_timeout_s
        results: dict[int, tuple] = {}
        pending: dict = {}  # wait ref -> (job index, worker, other refs, submitted at)
        cursor = 0

        def submit(i: int, avoid: WorkerState | None = None) -> None:
            nonlocal cursor
            live = self.alive()
            choices = [ws for ws in live if ws is not avoid] or live
            ws = choices[cursor % len(choices)]
            cursor += 1
            refs = call(ws.handle, jobs[i])
            refs = refs if isinstance(refs, (list, tuple)) else (refs,)
            pending[refs[0]] = (i, ws, tuple(refs[1:]), time.monotonic(), ws.crashes)

        for i in range(len(jobs)):
            submit(i)
        while pending:
            oldest = min(p[3] for p in pending.values())
            wait_s = max(0.05, oldest + timeout - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            if not ready:  # the oldest call is overdue: treat it as lost
                ref = min(pending, key=lambda r: pending[r][3])
                i, ws, *_ = pending.pop(ref)
                self.faults.timeouts += 1
                self.fail_worker(ws, jobs[i], f"no answer within {timeout:g} s", size)
                submit(i, avoid=ws)
                continue
            ref = ready[0]
            i, ws, others, _, epoch = pending.pop(ref)
            try:
                value = ray.get(ref)
            except RayTaskError as e:
                cause = getattr(e, "cause", None)
                if _is_lost_object(cause):
                    raise WeightsLost(str(cause).strip().splitlines()[0]) from None
                if isinstance(cause, MetatrainError):
                    raise cause from None  # our own one-line error from inside the worker
                raise
            except ObjectLostError as e:
                # Either our argument (the weights, owned by the parameter server) or the result is gone; both are
                # answered by refetching the weights and recomputing the step.
                raise WeightsLost(str(e).strip().splitlines()[0]) from None
            except RayActorError as e:  # the worker died or its node went away: recompute its slots elsewhere
                self.fail_worker(ws, jobs[i], type(e).__name__, size, crash_epoch=epoch)
                submit(i, avoid=ws)
                continue
            except RayError as e:
                self.fail_worker(ws, jobs[i], type(e).__name__, size)
                submit(i, avoid=ws)
                continue
            if i not in results:
                results[i] = (jobs[i], value, others)
        return [results[i] for i in range(len(jobs))]

    # ---- the two kinds of work ----------------------------------------------------------------------------------

    def compute(self, step: int, version: int, weights_ref, slots) -> list[tuple[dict, object]]:
        """(meta, grads ref) per worker job for training step ``step`` on weights ``version``.

        The slots are cut into ``train.grad_blocks`` fixed blocks (0: one per slot), the leaves of the step's
        reduction tree (``pipeline.gradient_tree``); each live worker gets a contiguous run of leaves and sends the
        sums of the tree nodes inside it, so the parameter server's sum never depends on the worker count, nor on
        the split: with ``workers.balance = "speed"`` the runs are sized by each worker's measured tasks/s.
        """
        slots = list(slots)
        blocks = split_slots(slots, self.cfg.train.grad_blocks or len(slots))
        n = len(blocks)
        live = self.alive()
        if self.cfg.workers.balance == "speed" and len(self.speeds) > 0:
            # Unmeasured workers are assumed as fast as the mean of the measured ones.
            mean = sum(self.speeds.values()) / len(self.speeds)
            counts = proportional_counts(n, [self.speeds.get(ws.index, mean) for ws in live])
        else:
            counts = [len(c) for c in split_slots(range(n), len(live))]
        starts = np.cumsum([0, *counts[:-1]]).tolist()
        # dispatch hands job i to live worker i first, so the i-th share goes to the worker it was sized for.
        jobs = [(lo, blocks[lo:lo + c]) for lo, c in zip(starts, counts)]
        done = self.dispatch(jobs, lambda h, job: h.compute.remote(step, version, weights_ref, job[1], (job[0], n)),
                             size=lambda job: sum(map(len, job[1])))
        for _, meta, _ in done:
            busy = meta["compute_s"] + meta["sample_s"]
            if busy > 0:
                rate = meta["n_tasks"] / busy
                old = self.speeds.get(meta["worker"])
                self.speeds[meta["worker"]] = rate if old is None else 0.7 * old + 0.3 * rate
        return [(meta, others[0]) for _, meta, others in done]

    def evaluate(self, weights_ref, split: str, step: int, n_tasks: int) -> list[dict]:
        """Per-task metrics of ``n_tasks`` episodes (eval seed, ``step``, slot) of ``split``, in slot order."""
        jobs = split_slots(range(n_tasks), 4 * len(self.workers))  # smaller jobs balance uneven workers
        done = self.dispatch(jobs, lambda h, job: h.evaluate.remote(weights_ref, split, step, job))
        return sorted((row for _, rows, _ in done for row in rows), key=lambda r: r["slot"])

    # ---- async pushes: one compute call at a time per worker, finished in arrival order -------------------------

    def submit(self, ws: WorkerState, step: int, version: int, weights_ref, blocks: list[list[int]]) -> tuple:
        """Start one compute call on ``ws`` without waiting; return its (meta ref, grads ref).

        ``next_done`` picks the first finished meta ref, ``result`` fetches it; the grads ref goes to ``apply``.
        """
        meta_ref, grad_ref = ws.handle.compute.remote(step, version, weights_ref, blocks)
        return meta_ref, grad_ref

    def next_done(self, refs, timeout: float | None) -> object | None:
        """The first of ``refs`` to finish, or None if none does within ``timeout`` seconds."""
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=timeout)
        return ready[0] if ready else None

    def result(self, ref):
        """The value of a finished call's ref.

        ``ActorLost``: its actor died; ``WeightsLost``: the weights it used are gone; an error raised by our code in
        the worker is re-raised as itself.
        """
        try:
            return ray.get(ref)
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if _is_lost_object(cause):
                raise WeightsLost(str(cause).strip().splitlines()[0]) from None
            if isinstance(cause, MetatrainError):
                raise cause from None
            raise
        except RayActorError as e:
            raise ActorLost(type(e).__name__) from e

    def wait_all(self, refs, timeout: float | None) -> None:
        """Wait (at most ``timeout`` seconds) for every one of ``refs`` to finish."""
        refs = list(refs)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
