"""The training loop over an Engine: sync steps (or async pushes), validation, metrics, fault recovery.

``Trainer.run(start_step)`` drives ``train.steps`` outer steps. Sync mode, per step: fetch the weights reference of
the current version, have the workers compute the step's ``train.meta_batch`` slots (``Engine.compute``), forward
their gradient references to the parameter server (one optimizer step), log. If the parameter server dies, the loop
continues from the step after its restored checkpoint; if a worker dies, the engine recomputes its slots. Async mode:
each worker computes on the newest weights and its push is applied as it arrives, unless too stale.

The tracker is anything with ``log_metrics(metrics: dict, step: int)`` (the MLflow ``RunTracker`` in a real run).
The engine is used only through its public methods (``get_weights``, ``compute``, ``apply``, ``evaluate``,
``set_extra``, ``checkpoint``, ``recover_parameter_server``, ``alive``, ``fail_worker``, and for async mode
``submit``, ``next_done``, ``result``, ``wait_all``, ``ps_alive``) and its ``faults`` log: the trainer never touches
Ray, and a pure-Python stand-in drives it in tests.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

from metatrain.pipeline.config import Config
from metatrain.pipeline.distributed.engine import ActorLost, Engine, EngineError, WeightsLost
from metatrain.pipeline.distributed.parameter_server import learning_rate
from metatrain.pipeline.scores import higher_is_better, task_metric


def _mean_metrics(metas: list[dict]) -> dict[str, float]:
    """Task-weighted means of the workers' per-task-mean metrics."""
    n = sum(m["n_tasks"] for m in metas)
    keys = set().union(*(m["metrics"] for m in metas))
    return {k: sum(m["metrics"].get(k, 0.0) * m["n_tasks"] for m in metas) / n for k in sorted(keys)}


TRAIN_NAMES = {"query_loss": "train/loss", "query_acc": "train/acc", "support_loss": "train/support_loss",
               "support_acc": "train/support_acc"}


class Trainer:
    """Runs the loop of one run on an Engine, logging to a RunTracker."""

    def __init__(self, cfg: Config, engine: Engine, tracker, out_dir: Path, quiet: bool = False,
                 on_validation=None):
        """``on_validation(step, metrics)``: called with each validation's metrics once logged (a Ray Tune trial
        reports them to its scheduler, which may stop the trial there)."""
        self.cfg, self.engine, self.tracker, self.out_dir = cfg, engine, tracker, out_dir
        self.on_validation = on_validation
        self.history: list[dict] = []
        self.best_val = -math.inf
        # The highest step whose train/* (val/*) metrics reached the tracker: steps redone after a parameter-server
        # restart are not logged twice. run() starts them at its start step (a resumed run logged the steps before).
        self.logged_through = self.validated_through = 0
        self.quiet = quiet
        self.started = time.monotonic()

    def _log_step(self, step: int, metas: list[dict], applied: dict, step_s: float, tasks: int) -> dict:
        m = {TRAIN_NAMES.get(k, f"train/{k}"): v for k, v in _mean_metrics(metas).items()}
        c = applied.get("counters", {})
        stal = applied.get("staleness") or [0]
        m |= {"ps/staleness": float(np.mean(stal)), "ps/staleness_max": float(max(stal)),
              "ps/rejected": c.get("rejected", 0), "ps/stale_dropped": c.get("stale_dropped", 0),
              "ps/lr": applied.get("lr", 0.0), "ps/grad_norm": applied.get("grad_norm", 0.0),
              "ps/apply_s": applied.get("apply_s", 0.0), "time/step_s": step_s,
              "time/tasks_per_s": tasks / step_s if step_s > 0 else 0.0,
              "time/compute_s": max(x["compute_s"] for x in metas),
              "faults/worker_failures": self.engine.faults.worker_failures,
              "faults/ps_restarts": self.engine.faults.ps_restarts}
        for r in applied.get("rejected", []):
            print(f"metatrain: warning: parameter server rejected a contribution: {r}", file=sys.stderr)
        if step <= self.logged_through:
            # A step recomputed after a parameter-server restart: the run already has its metrics (in sync mode the
            # same values), and MLflow would otherwise keep two points per step.
            return m
        self.logged_through = step
        self.tracker.log_metrics(m, step=step)
        self.history.append({"step": step, **m})
        return m

    def validate(self, step: int) -> float:
        _, ref = self.engine.get_weights()
        rows = self.engine.evaluate(ref, "val", 0, self.cfg.train.val_tasks)  # the same val tasks every time
        key = task_metric(rows)
        value = float(np.mean([r[key] for r in rows]))
        score = value if higher_is_better(key) else -value
        name = {"query_acc": "val/acc", "final_loss": "val/final_loss"}.get(key, "val/mse")
        # val/loss is logged at every validation (a resumed run finds its last one by it).
        loss = "query_loss" if "query_loss" in rows[0] else key
        metrics = {name: value, "val/loss": float(np.mean([r[loss] for r in rows]))}
        # Sequence models (MANN): accuracy by instance, inst1_acc .. instK_acc.
        metrics |= {f"val/{k}": float(np.mean([r[k] for r in rows])) for k in rows[0] if k.startswith("inst")}
        if step > self.validated_through:  # not a validation redone after a parameter-server restart
            self.validated_through = step
            self.tracker.log_metrics(metrics, step=step)
            self.history.append({"step": step, **metrics})
        if score > self.best_val:
            self.best_val = score
            self.engine.set_extra(best_val=value, best_step=step)
            self.engine.checkpoint("best")
        if self.on_validation is not None:
            self.on_validation(step, metrics)
        return value

    def run(self, start_step: int) -> int:
        """Train from ``start_step`` (1-based) to train.steps or the time budget; return the last applied step."""
        from tqdm import tqdm

        cfg = self.cfg
        self.logged_through = max(self.logged_through, start_step - 1)
        self.validated_through = max(self.validated_through, start_step - 1)
        # disable=None: a bar on a terminal, none in logs and CI; --quiet turns it off everywhere.
        bar = tqdm(total=cfg.train.steps, initial=start_step - 1, desc="train", unit="step",
                   disable=True if self.quiet else None,
                   dynamic_ncols=True, file=sys.stderr)
        last_val = None
        try:
            if cfg.train.mode == "async":
                return self._run_async(start_step, bar)
            step = start_step
            while step <= cfg.train.steps:
                if cfg.train.time_budget_s and time.monotonic() - self.started > cfg.train.time_budget_s:
                    bar.write(self._budget_spent(step - 1))
                    break
                t0 = time.perf_counter()
                try:
                    version, ref = self.engine.get_weights()
                    if version != step - 1:  # a restored parameter server is behind (or ahead of) the loop
                        step = version + 1
                        bar.n = version
                        continue
                    results = self.engine.compute(step, version, ref, range(cfg.train.meta_batch))
                    applied = self.engine.apply(step, [m for m, _ in results], [g for _, g in results])
                except (ActorLost, WeightsLost):
                    step = self.engine.recover_parameter_server() + 1
                    bar.n = step - 1
                    continue
                if not applied["applied"]:
                    raise EngineError(f"step {step} could not be applied: {applied.get('reason')}; "
                                      f"{'; '.join(applied['rejected'])}")
                metas = [m for m, _ in results]
                m = self._log_step(step, metas, applied, time.perf_counter() - t0, applied["tasks"])
                if cfg.train.val_every and step % cfg.train.val_every == 0:
                    last_val = self.validate(step)
                bar.update(1)
                post = {"loss": f"{m.get('train/loss', float('nan')):.3f}"}
                if "train/acc" in m:
                    post["acc"] = f"{m['train/acc']:.3f}"
                if last_val is not None:
                    post["val"] = f"{last_val:.3f}"
                bar.set_postfix(post, refresh=False)
                step += 1
            return step - 1
        finally:
            bar.close()

    def _budget_spent(self, step: int) -> str:
        """The line that ends a time-budgeted run; it says how far a cosine schedule got, which anneals over
        train.steps, not over the steps the budget turned out to allow."""
        cfg, text = self.cfg, f"time budget of {self.cfg.train.time_budget_s:g} s reached after step {step}"
        if cfg.optim.schedule != "cosine":
            return text
        lr = learning_rate(cfg.optim, step, cfg.train.steps)
        return (f"{text}; the cosine schedule stopped at lr {lr:.3g} of {cfg.optim.lr:g} (it anneals over "
                f"train.steps = {cfg.train.steps}: set that to the steps a budget gets to anneal to the end)")

    def _run_async(self, start_step: int, bar) -> int:
        """Workers pull the newest weights and push as they finish; the PS drops contributions that are too stale."""
        cfg = self.cfg
        per_push = max(1, math.ceil(cfg.train.meta_batch / cfg.workers.count))
        applied_step = start_step - 1
        submission = applied_step * cfg.workers.count  # episode keys: one fresh step id per submission
        in_flight: dict = {}

        def submit(ws):
            nonlocal submission
            submission += 1
            version, ref = self.engine.get_weights()
            meta_ref, grad_ref = self.engine.submit(ws, submission, version, ref, [list(range(per_push))])
            in_flight[meta_ref] = (ws, grad_ref, time.perf_counter(), ws.crashes)

        def busy() -> set[int]:  # the workers with a push in flight, by identity
            return {id(w) for w, *_ in in_flight.values()}

        for ws in self.engine.alive():
            submit(ws)
        while applied_step < cfg.train.steps:
            if cfg.train.time_budget_s and time.monotonic() - self.started > cfg.train.time_budget_s:
                bar.write(self._budget_spent(applied_step))
                break
            done = self.engine.next_done(in_flight, timeout=cfg.workers.task_timeout_s)
            if done is None:
                raise EngineError(f"no worker answered within workers.task_timeout_s = "
                                  f"{cfg.workers.task_timeout_s:g} s")
            ws, grad_ref, t0, epoch = in_flight.pop(done)
            try:
                meta = self.engine.result(done)
                applied = self.engine.apply(applied_step + 1, [meta], [grad_ref])
            except WeightsLost:
                applied_step = self.engine.recover_parameter_server()
                submit(ws)
                continue
            except ActorLost:
                if not self.engine.ps_alive(timeout=5):  # the parameter server itself is gone: wait for its restart
                    applied_step = self.engine.recover_parameter_server()
                else:
                    self.engine.fail_worker(ws, list(range(per_push)), "actor died", crash_epoch=epoch)
                idle = [w for w in self.engine.alive() if id(w) not in busy()]
                submit(ws if ws.in_service else (idle or self.engine.alive())[0])
                continue
            if applied["applied"]:
                applied_step += 1
                self._log_step(applied_step, [meta], applied, time.perf_counter() - t0, applied["tasks"])
                if cfg.train.val_every and applied_step % cfg.train.val_every == 0:
                    self.validate(applied_step)
                bar.update(1)
            elif applied.get("stale_dropped"):
                self.tracker.log_metrics({"ps/stale_dropped": applied["counters"]["stale_dropped"]},
                                         step=applied_step)
            submit(ws)
            for back in [w for w in self.engine.alive() if id(w) not in busy()]:  # a restarted worker rejoins
                submit(back)
        self.engine.wait_all(in_flight, timeout=cfg.workers.task_timeout_s)
        return applied_step
