"""A study on Ray Tune: each cell (or sample of the search space) is a trial, its runs nested under the study's run.

Tune does the scheduling: the grid axes and ``search:`` grids become ``tune.grid_search``, the distributions Tune's
samplers, ``num_samples`` and ``max_concurrent_trials`` its ``TuneConfig``, ``scheduler: {name: asha}`` its
``ASHAScheduler`` on the validations each trial reports (``tune.report`` from the trainer's ``on_validation``), and
``max_failures`` its ``FailureConfig``. A trial reserves its driver, parameter server and workers together
(``tune.with_resources`` with a ``PlacementGroupFactory``: an empty head bundle for the driver and the parameter
server, which take no CPU, then one bundle per worker; the engine places its actors in these bundles rather than in
a placement group of its own), so trials never share a worker's CPU. The experiment lives in ``OUT/tune``: running
the study again restores it (``Tuner.restore``, errored trials resumed) and finished trials are not run again.

Ours, which Tune does not do: a trial's MLflow run (a resumed trial continues its run from its newest checkpoint); a
trial stopped by the scheduler ends its run KILLED with the tag ``metatrain.ended_by`` (Tune only kills the trial's
actor); SIGTERM is Tune's own graceful stop (as Ctrl-C), after which every run still RUNNING ends KILLED; and a
trial whose results are already on disk (it finished after Tune's last save of the experiment, before a SIGKILL)
reports them again instead of training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from metatrain.tasks.atomic import atomic_path
from ray import tune

FINISHED = "metatrain/finished"  # in a trial's last report: it trained, evaluated and recorded its results


@dataclass(frozen=True)
class TrialContext:
    study: object  # jobs.study.Study
    out: str
    uri: str
    parent: str
    cwd: str


def cell_done(out: Path, name: str) -> bool:
    return (out / "results" / f"cell={name}" / "part-0.parquet").is_file() and \
        (out / "cells" / name / "eval.json").is_file()


def record(out: Path, cell, name: str) -> None:
    """Add the cell's per-task results to the study's dataset, with its axis and search values as columns.

    pyarrow writes the hive partition ``cell=<name>``; it is written under a hidden folder (which pyarrow datasets
    skip) and renamed into place, so a crash never leaves a half-written cell that looks done.
    """
    table = pq.read_table(out / "cells" / name / "eval_tasks.parquet")
    for axis, value in sorted(cell.values.items()):
        table = table.append_column(axis, pa.array([str(value)] * table.num_rows))
    table = table.append_column("cell", pa.array([name] * table.num_rows))
    staging, final = out / "results" / f".staging-{name}", out / "results" / f"cell={name}"
    shutil.rmtree(staging, ignore_errors=True)
    pads.write_dataset(table, staging, format="parquet", partitioning=["cell"], partitioning_flavor="hive",
                       basename_template="part-{i}.parquet")
    shutil.rmtree(final, ignore_errors=True)
    (staging / final.name).rename(final)
    shutil.rmtree(staging, ignore_errors=True)


def _cell(study, config: dict):
    values = config.get("cell", {}) if study.grid is None else {a: config[a] for a in study.grid}
    return study.cell_of(values, config.get("search"))


def param_space(study) -> dict:
    if study.grid is not None:
        space = {axis: tune.grid_search(list(values)) for axis, values in study.grid.items()}
    elif len(study.cells) > 1 or study.cells[0].values:
        space = {"cell": tune.grid_search([dict(c.values) for c in study.cells])}
    else:
        space = {}  # a search alone: the base config
    make = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(*a), "choice": tune.choice, "grid": tune.grid_search}
    if study.search:
        space["search"] = {name: make[kind](args) for name, (kind, args) in study.search.items()}
    return space


def trial_resources(study, config: dict) -> tune.PlacementGroupFactory:
    """The trial's reservation: an empty head bundle (its driver, then the parameter server beside it) and one
    bundle per worker, with the cell's ``workers.placement`` strategy."""
    from metatrain.pipeline.config import load_config
    from metatrain.pipeline.distributed.engine import worker_bundle

    cell = _cell(study, config)
    cfg = load_config(cell.config, list(cell.overrides))
    return tune.PlacementGroupFactory([{}] + [worker_bundle(cfg)] * cfg.workers.count,
                                      strategy=cfg.workers.placement)


def _resumable_run(folder: Path, uri: str) -> str | None:
    """The MLflow run of an earlier, unfinished attempt at this trial that left a checkpoint (it continues there)."""
    from mlflow.tracking import MlflowClient

    from metatrain.pipeline.checkpoint import latest_checkpoint
    from metatrain.pipeline.jobs.runs import OUT_TAG

    if latest_checkpoint(folder / "checkpoints") is None:
        return None
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`{OUT_TAG}` = '{folder.resolve()}'", order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def run_trial(config: dict, ctx: TrialContext) -> None:
    """One trial: train the cell (reporting each validation), record its results, report the test score."""
    from metatrain.pipeline.jobs.train import train

    os.chdir(ctx.cwd)  # relative config and data paths mean what they meant to `metatrain study`
    study, out = ctx.study, Path(ctx.out)
    cell = _cell(study, config)
    name = f"{cell.id}-{tune.get_context().get_trial_id()}" if study.sampled else cell.id
    folder = out / "cells" / name
    if cell_done(out, name):
        summary = json.loads((folder / "eval.json").read_text())
        marker = folder / "trial.json"
        tune.report(json.loads(marker.read_text())["report"] if marker.is_file() else
                    {"cell": name, "run_id": summary.get("run_id"), FINISHED: 1})
        return
    last: dict = {}

    def on_validation(step: int, metrics: dict) -> None:
        last.update(metrics)
        tune.report({**metrics, "step": step, "cell": name})  # the scheduler may stop the trial here

    result = train(cell.config, list(cell.overrides), out=str(folder), tracking_uri=ctx.uri, quiet=True,
                   handle_signals=False, resume=_resumable_run(folder, ctx.uri), on_validation=on_validation,
                   tags={"mlflow.parentRunId": ctx.parent, "metatrain.study": study.name, "metatrain.cell": name,
                         **{f"metatrain.axis.{k}": str(v) for k, v in cell.values.items()}})
    record(out, cell, name)
    s = result.summary
    report = {**last, "step": result.final_step, "cell": name, "run_id": result.run_id,
              f"test/{s['metric']}": s[s["metric"]], "test/ci95": s["ci95"], FINISHED: 1}
    with atomic_path(folder / "trial.json") as tmp:
        tmp.write_text(json.dumps({"cell": name, "values": cell.values, "report": report}, default=str) + "\n")
    tune.report(report)


def end_runs(uri: str, parent: str, status: str, reason: str, cell: str | None = None) -> int:
    """End the study's child runs still RUNNING (of one cell, or all) with ``status``; return how many."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    query = f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'"
    if cell is not None:
        query += f" and tags.`metatrain.cell` = '{cell}'"
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], query)
    for run in runs:
        client.set_tag(run.info.run_id, "metatrain.ended_by", reason)
        client.set_terminated(run.info.run_id, status)
    return len(runs)


class RunStatusCallback(tune.Callback):
    """A trial that ends without finishing (stopped by the scheduler, or failed for good) ends its MLflow run."""

    def __init__(self, uri: str, parent: str, scheduler):
        self.uri, self.parent, self.scheduler = uri, parent, scheduler

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        if "cell" in r and not r.get(FINISHED) and self.scheduler is not None:
            end_runs(self.uri, self.parent, "KILLED", f"stopped early by the {self.scheduler.name} scheduler at "
                     f"step {r.get('step')} ({self.scheduler.metric} = {r.get(self.scheduler.metric)})", r["cell"])

    def on_trial_error(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        if "cell" in r:
            end_runs(self.uri, self.parent, "FAILED", f"its Tune trial {trial.trial_id} failed", r["cell"])


def _tuner(ctx: TrialContext, parallel: int | None) -> tune.Tuner:
    """A new Tune experiment in OUT/tune, or the one an earlier `metatrain study` left there."""
    study, path = ctx.study, Path(ctx.out).resolve() / "tune"
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    resources=lambda config: trial_resources(study, config))
    if tune.Tuner.can_restore(str(path)):
        print(f"metatrain: study {study.name}: resuming the Tune experiment in {path}", flush=True)
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    sch = study.scheduler
    scheduler = None if sch is None else tune.schedulers.ASHAScheduler(
        time_attr="training_iteration", metric=sch.metric, mode=sch.mode, max_t=sch.max_t,
        grace_period=sch.grace_period, reduction_factor=sch.reduction_factor)
    return tune.Tuner(
        trainable, param_space=param_space(study),
        tune_config=tune.TuneConfig(num_samples=study.num_samples, scheduler=scheduler,
                                    max_concurrent_trials=parallel or study.parallel),
        run_config=tune.RunConfig(name="tune", storage_path=str(path.parent),
                                  failure_config=tune.FailureConfig(max_failures=study.max_failures),
                                  callbacks=[RunStatusCallback(ctx.uri, ctx.parent, sch)], verbose=1))


def run_trials(ctx: TrialContext, parallel: int | None = None) -> tune.ResultGrid:
    """Run (or resume) the study's trials. SIGTERM (and Ctrl-C) stop Tune gracefully: its state is saved, every
    trial stopped, every run still RUNNING ended KILLED, and KeyboardInterrupt raised for the caller's run."""
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # Tune passes it on to the trials; run_trial sets their cwd
    tuner = _tuner(ctx, parallel)
    stopped = []

    def on_sigterm(signum, frame):  # ray.init made SIGTERM a SystemExit (the parent run FAILED): Tune's stop instead
        stopped.append(signum)
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        grid = tuner.fit()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped or grid.num_terminated + grid.num_errors < len(grid):
        n = end_runs(ctx.uri, ctx.parent, "KILLED", "the study was stopped (SIGTERM or Ctrl-C)")
        print(f"metatrain: study {ctx.study.name} stopped: {n} unfinished trial run(s) KILLED; run the study again "
              f"to resume it", flush=True)
        raise KeyboardInterrupt("study stopped")
    return grid


__all__ = ["FINISHED", "TrialContext", "cell_done", "end_runs", "param_space", "record", "run_trials",
           "trial_resources"]
