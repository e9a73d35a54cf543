"""The driver: one training run from config to evaluated, tracked, checkpointed model.

    metatrain train configs/omniglot_fomaml_5w1s.yaml --out runs/fomaml --set train.steps=300
    metatrain train configs/omniglot_fomaml_5w1s.yaml --resume <MLFLOW_RUN_ID>
    metatrain eval --run <MLFLOW_RUN_ID> --tasks 600

Order of a run, chosen so that bad input fails before anything is started or written:
1. config, data store, samplers and model are built in-process (a typo, a missing store or an impossible episode
   stops here with one line);
2. the tracking store is checked (an unreachable MLflow server stops here), then Ray is joined or started;
3. the MLflow run starts (or, with --resume, the same run continues), the actors are placed, and the loop runs;
4. at the end: final checkpoint, test evaluation on ``train.eval_tasks`` episodes of the test split (mean accuracy
   with a 95% CI = 1.96 sigma / sqrt(n)), ``OUT/eval.json``, ``OUT/eval_tasks.parquet``, learning curve, artifacts,
   the model logged (and registered with --register).
The MLflow run ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C); never RUNNING.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
import yaml
from metatrain.tasks.atomic import atomic_path

from metatrain.pipeline.checkpoint import load_checkpoint, load_latest, save_checkpoint
from metatrain.pipeline.components import (
    build_model,
    build_sampler,
    example_input,
    fingerprint,
    image_shape,
    initial_params,
    open_store,
)
from metatrain.pipeline.config import Config, ConfigError, config_from_dict, load_config
from metatrain.pipeline.distributed.engine import Engine, EngineError, check_resources
from metatrain.pipeline.distributed.trainer import Trainer
from metatrain.pipeline.distributed.worker import TaskWorkerCore
from metatrain.pipeline.figures import instance_accuracy_figure, learning_curve_figure
from metatrain.pipeline.jobs.predict import store_inverts
from metatrain.pipeline.jobs.runs import OUT_TAG, RunError, check_out_dir, checkpoint_of, find_run_out
from metatrain.pipeline.scores import ci95, metric_label, task_metric
from metatrain.pipeline.serving.log import ModelDestination, log_classifier, log_torch_model
from metatrain.pipeline.tracking import (
    RunTracker,
    TrackingError,
    check_tracking,
    default_artifact_root,
    explicit_tracking_uri,
    flatten_config,
    resolve_tracking_uri,
)

# --------------------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------------------

def _probe_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at a Ray address (Ray itself retries for ~5 minutes)."""
    import socket

    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise EngineError(f"--ray-address {address}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise EngineError(f"--ray-address {address}: cannot connect to a Ray cluster there ({e.strerror or e}); "
                          f"start one with `ray start --head` or omit --ray-address for a local Ray") from None


def init_ray(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (or $RAY_ADDRESS), else start a local one; True if we started it.

    A Ray already initialised in this process (tests, notebooks) is used as it is; an explicit ``address`` of another
    cluster is then refused rather than silently ignored. A local Ray binds its dashboard to 127.0.0.1 only.
    """
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address and address not in ("auto", current):
            raise EngineError(f"--ray-address {address}: this process is already connected to the Ray cluster at "
                              f"{current}; leave --ray-address out to use it")
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _probe_ray_address(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
            raise EngineError(f"--ray-address {address}: cannot connect to a Ray cluster there "
                              f"({str(e).strip().splitlines()[0]})") from None
        return False
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    return True


# --------------------------------------------------------------------------------------------------------------
# Evaluation summaries
# --------------------------------------------------------------------------------------------------------------

def summarize(rows: list[dict], cfg: Config, split: str, extra: dict | None = None) -> dict:
    """eval.json: mean of the per-task metric with a 95% normal CI (1.96 * sample std / sqrt(n))."""
    key = task_metric(rows)
    values = np.array([r[key] for r in rows], dtype=np.float64)
    n = len(values)
    ci = ci95(values)
    label = metric_label(key)
    out = {
        "metric": label,
        label: float(values.mean()),
        "ci95": float(ci),
        "tasks": n,
        "split": split,
        "ways": cfg.data.test_ways,
        "shots": cfg.data.shots,
        "queries": cfg.data.queries,
        "inner_steps": cfg.algorithm.eval_inner_steps,
        "algorithm": cfg.algorithm.name,
        "eval_seed": cfg.train.eval_seed,
    }
    if "query_loss" in rows[0] and key != "query_loss":
        out["loss"] = float(np.mean([r["query_loss"] for r in rows]))
    if cfg.sequence_episodes:
        # Santoro et al.'s table: accuracy at the k-th showing of a class, each with its own 95% CI over tasks.
        out.update(instances=cfg.data.instances, shots=None, queries=None, inner_steps=None)
        out["instance_accuracy"], out["instance_ci95"] = {}, {}
        for k in range(1, cfg.data.instances + 1):
            v = np.array([r[f"inst{k}_acc"] for r in rows], dtype=np.float64)
            out["instance_accuracy"][str(k)] = float(v.mean())
            out["instance_ci95"][str(k)] = ci95(v)
    elif cfg.algorithm.record.optimizee_tasks:
        # The optimizee's loss after `steps` learned updates (eval_loss: all of an MLP's examples), as the bench's.
        a, mean = cfg.algorithm, float(values.mean())
        held_out = split if cfg.optimizee.source == "omniglot" and cfg.data.optimizee_family == "mlp" else "test"
        out.update(ways=None, shots=None, queries=None, inner_steps=None, steps=a.unroll, split=held_out,
                   optimizee=cfg.data.optimizee_family, log10_final_loss=math.log10(mean) if mean > 0 else None,
                   initial_loss=float(np.mean([r["initial_loss"] for r in rows])))
        if "final_acc" in rows[0]:
            out["final_acc"] = float(np.mean([r["final_acc"] for r in rows]))
    elif not cfg.algorithm.record.adapts_weights:
        out["inner_steps"] = None  # the memory or the embedding of the support set adapts, not the weights
    if cfg.algorithm.record.reads_query_bn:
        # 'support': queries normalised with the support set's statistics; 'batch': with their own (transductive).
        out["query_bn"] = cfg.algorithm.query_bn
    if cfg.data.within_alphabet:  # Lake et al.'s protocol: say so, and which alphabets were too small to draw from
        sampler = build_sampler(cfg, open_store(cfg), "test" if split == cfg.data.test_split else "val")
        out.update(within_alphabet=True, alphabets_skipped=sampler.pool.skipped)
    return out | (extra or {})


def write_eval(out_dir: Path, summary: dict, rows: list[dict]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, pqf = out_dir / "eval.json", out_dir / "eval_tasks.parquet"
    with atomic_path(js) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_path(pqf) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    return js, pqf


def describe(summary: dict) -> str:
    if "instance_accuracy" in summary:
        per = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in summary["instance_accuracy"].items()
                        if k in ("1", "2", "3", "5", "10"))
        return (f"{summary['ways']}-class sequence accuracy by instance {per} (all steps "
                f"{100 * summary['accuracy']:.2f}% ± {100 * summary['ci95']:.2f}%, {summary['tasks']} episodes of "
                f"{summary['split']})")
    if summary["metric"] == "final_loss":
        return (f"{summary['optimizee']} optimizees: loss after {summary['steps']} learned steps "
                f"{summary['final_loss']:.4g} ± {summary['ci95']:.2g} (95% CI, {summary['tasks']} tasks of "
                f"{summary['split']}; log10 {summary['log10_final_loss']:.3f}; from {summary['initial_loss']:.4g})")
    if summary["metric"] == "accuracy":
        return (f"{summary['ways']}-way {summary['shots']}-shot accuracy {100 * summary['accuracy']:.2f}% "
                f"± {100 * summary['ci95']:.2f}% (95% CI, {summary['tasks']} tasks of {summary['split']})")
    return f"MSE {summary['mse']:.4f} ± {summary['ci95']:.4f} (95% CI, {summary['tasks']} tasks)"


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    run_id: str
    out_dir: Path
    summary: dict
    final_step: int
    tracking_uri: str


def _preflight(cfg: Config, checkpoint_dir: Path | None = None) -> None:
    """Build everything that can fail on bad input, in-process, before Ray or MLflow is touched.

    With ``checkpoint_dir`` (resume), its newest checkpoint must load and match this model and config.
    """
    store = open_store(cfg)
    for split in ("train", "val", "test"):
        build_sampler(cfg, store, split)
    model = build_model(cfg, image_shape(cfg))
    if checkpoint_dir is not None:
        load_latest(checkpoint_dir, expected_fingerprint=fingerprint(cfg, model))


def _sigterm_as_interrupt():
    """Make SIGTERM (a scheduler or `ray job stop`) end the run like Ctrl-C: checkpointed, MLflow status KILLED."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def write_warm_start(cfg: Config, checkpoint_dir: Path, params: dict, source: str) -> None:
    """Start a new run from ``params`` (e.g. the champion's): a step-0 checkpoint with a fresh optimizer, which the
    parameter server restores like any other. The parameters must fit this config's model exactly."""
    from metatrain.pipeline.distributed.parameter_server import ParameterServerCore

    model = build_model(cfg, image_shape(cfg))
    init = initial_params(cfg, model)
    mismatch = sorted(k for k in init if k not in params or tuple(params[k].shape) != tuple(init[k].shape))
    extra = sorted(set(params) - set(init))
    if mismatch or extra:
        raise RunError(f"warm start from {source}: its parameters do not fit this config's model (differs at "
                       f"{(mismatch + extra)[:3]}); the config must describe the same architecture")
    core = ParameterServerCore({k: params[k] for k in init}, cfg.optim, total_steps=cfg.train.steps,
                               checkpoint_dir=None, checkpoint_every=cfg.train.checkpoint_every,
                               fingerprint=fingerprint(cfg, model), config=cfg.to_dict())
    core.set_extra(warm_start=source)
    save_checkpoint(checkpoint_dir, core.state(), keep=cfg.train.keep_checkpoints)


def provenance_tags(config_path: str | None) -> dict[str, str]:
    """The code a run ran, as MLflow's UI shows it ("Source"): the command, the package version and, from a git
    checkout, its commit."""
    import importlib.metadata
    import subprocess

    tags = {"mlflow.source.name": f"metatrain train {config_path or '(defaults)'}", "mlflow.source.type": "LOCAL",
            "metatrain.version": importlib.metadata.version("metatrain")}
    try:
        git = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if git.returncode == 0:
            tags["mlflow.source.git.commit"] = git.stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (an installed wheel)
        pass
    return tags


def log_store_inputs(client, run_id: str, cfg: Config) -> None:
    """The task store as the run's dataset inputs (its path, each split read, the image shape as the schema, the
    manifest's sha256 as the digest): a registered model then says which data made it."""
    import hashlib

    import numpy as np
    from metatrain.tasks.store import manifest_path
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec

    store = Path(cfg.data.path).resolve()
    digest = hashlib.sha256(manifest_path(store).read_bytes()).hexdigest()[:16]
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape(cfg)), "image")])
    inputs = []
    for context, split in (("training", cfg.data.train_split), ("validation", cfg.data.val_split),
                           ("test", cfg.data.test_split)):
        source = get_dataset_source_from_json(json.dumps({"uri": str(store)}), source_type="local")
        ds = MetaDataset(source, name=f"{cfg.data.dataset}:{split}", digest=digest, schema=schema)
        # _to_mlflow_entity: what mlflow.log_input does with a dataset, without the fluent API's global active run.
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    client.log_inputs(run_id, datasets=inputs)


def train(config_path: str | None, overrides: list[str] = (), *, out: str | None = None,
          ray_address: str | None = None, resume: str | None = None, tracking_uri: str | None = None,
          register: str | None = None, quiet: bool = False, warm_start: tuple[dict, str] | None = None,
          tags: dict[str, str] | None = None, handle_signals: bool = True, on_validation=None) -> TrainResult:
    """Train one run end to end (see the module docstring); return where everything went.

    ``warm_start``: (parameters, description) to start from instead of the seeded initialisation (retrain).
    ``tags``: extra run tags (a study's cells set ``mlflow.parentRunId`` to nest under the study's run).
    ``handle_signals``: SIGTERM ends the run as KILLED (off where the caller owns the process, e.g. a Ray task).
    ``on_validation(step, metrics)``: called after each validation (a study's Tune trial reports them).
    """
    if resume:
        out_dir, found_uri = find_run_out(resume, explicit_tracking_uri(tracking_uri) or
                                           (f"sqlite:///{Path(out).resolve()}/mlflow.db" if out else None))
        tracking_uri = tracking_uri or found_uri
        saved = out_dir / "config.yaml"
        if config_path is None and saved.is_file():
            config_path = str(saved)
    else:
        out_dir = Path(out) if out else Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
    cfg = load_config(config_path, overrides)
    if register:
        cfg = cfg.replace(tracking=cfg.tracking.__class__(**{**cfg.to_dict()["tracking"], "register": register}))
    _preflight(cfg, out_dir / "checkpoints" if resume else None)
    check_out_dir(out_dir, resuming=bool(resume))
    uri = resolve_tracking_uri(tracking_uri or cfg.tracking.uri, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_tracking(uri)
    if warm_start is not None and not resume:
        write_warm_start(cfg, out_dir / "checkpoints", *warm_start)
    started_ray = init_ray(ray_address)
    try:
        check_resources(cfg)
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    # spill_dir: metrics the store could not take by the end are kept there (and sent first on --resume).
    tracker = RunTracker(uri, experiment=cfg.tracking.experiment, run_id=resume, run_name=cfg.tracking.run_name,
                         artifact_root=default_artifact_root(out_dir), system_metrics=cfg.tracking.system_metrics,
                         spill_dir=out_dir / "mlflow-spill")
    engine = None
    restore_sigterm = _sigterm_as_interrupt() if handle_signals else (lambda: None)
    try:
        tracker.start(flatten_config(cfg.to_dict()),
                      tags={OUT_TAG: str(out_dir.resolve()), "metatrain.algorithm": cfg.algorithm.name,
                            "metatrain.config": str(config_path or "defaults"), **provenance_tags(config_path),
                            **(tags or {})})
        with tracker:  # FINISHED on success, FAILED on an exception, KILLED on Ctrl-C
            if cfg.data.has_images and not resume:
                log_store_inputs(tracker.client, tracker.run_id, cfg)
            (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            tracker.log_artifact(str(out_dir / "config.yaml"))
            engine = Engine(cfg, str((out_dir / "checkpoints").resolve()),
                            log=lambda s: print(f"metatrain: {s}", file=sys.stderr),
                            check=False)  # check_resources ran above, before the run was created
            start = engine.ps_status()["version"] + 1
            if resume:
                print(f"metatrain: resuming run {resume} at step {start}", file=sys.stderr)
                # Metrics a killed driver had buffered but not sent: all of them go from its journal.
                tracker.replay_journal()
            # The image shape goes into every checkpoint: predict can then rebuild the model without the store.
            engine.set_extra(run_id=tracker.run_id, image_shape=image_shape(cfg))
            trainer = Trainer(cfg, engine, tracker, out_dir, quiet=quiet, on_validation=on_validation)
            if resume:
                # Steps after the checkpoint that the killed driver had logged are redone (to the same values in
                # sync mode) but not logged again. time/step_s and val/loss are logged at every train/val step.
                trainer.logged_through = tracker.last_step("time/step_s")
                trainer.validated_through = tracker.last_step("val/loss")
            try:
                last = trainer.run(start)
            except KeyboardInterrupt:
                engine.checkpoint(timeout=30)  # resume loses nothing applied so far
                raise
            engine.checkpoint()  # a periodic one too: --resume with more steps starts here
            final = engine.checkpoint("final")
            if cfg.train.val_every and last % cfg.train.val_every:
                trainer.validate(last)  # the final weights are validated too, so best.pt can be them
            _, ref = engine.get_weights()
            rows = engine.evaluate(ref, "test", 0, cfg.train.eval_tasks)
            summary = summarize(rows, cfg, cfg.data.test_split, {"step": last, "run_id": tracker.run_id,
                                                                  "checkpoint": "final"})
            js, pqf = write_eval(out_dir, summary, rows)
            tracker.log_metrics({f"test/{summary['metric']}": summary[summary["metric"]],
                                 "test/ci95": summary["ci95"]}, step=last)
            for path in (js, pqf, final, out_dir / "checkpoints" / "best.pt"):
                if Path(path).is_file():
                    tracker.log_artifact(str(path), "checkpoints" if str(path).endswith(".pt") else None)
            learning_curve_figure(trainer.history).savefig(out_dir / "learning_curve.png", dpi=100)
            tracker.log_artifact(out_dir / "learning_curve.png")
            if "instance_accuracy" in summary:
                for k, v in summary["instance_accuracy"].items():
                    tracker.log_metrics({f"test/inst{k}_acc": v}, step=last)
                instance_accuracy_figure(summary).savefig(out_dir / "instance_accuracy.png", dpi=100)
                tracker.log_artifact(out_dir / "instance_accuracy.png")
            model_uri = log_run_model(cfg, final, ModelDestination.of(tracker))
            tracker.set_tags({"metatrain.final_step": str(last), f"metatrain.test_{summary['metric']}":
                              f"{summary[summary['metric']]:.6f}", "metatrain.test_ci95": f"{summary['ci95']:.6f}",
                              "metatrain.model_uri": str(model_uri)})
            print(describe(summary))
            print(f"run {tracker.run_id}: {out_dir}/eval.json; browse with: mlflow ui --backend-store-uri {uri}")
            return TrainResult(tracker.run_id, out_dir, summary, last, uri)
    finally:
        restore_sigterm()
        if engine is not None:
            engine.shutdown()
        if started_ray:
            ray.shutdown()


def log_run_model(cfg: Config, final: str, dest: ModelDestination) -> str | None:
    """The run's model into MLflow: a classifier as the pyfunc that answers few-shot tasks (``metatrain.pipeline.
    serving.fewshot``), any other network (the learned optimizer's packed step, the sinusoid regressor) as a
    torch.export program, since an input example makes MLflow save it as pt2: loading either runs no pickle."""
    if cfg.algorithm.record.predict != "none" and cfg.data.has_images:
        return log_classifier(final, dest, invert=store_inverts(cfg), image_shape=image_shape(cfg),
                              ways=cfg.data.ways, registered_name=cfg.tracking.register)
    model = model_from_checkpoint(cfg, load_checkpoint(final))
    if cfg.algorithm.record.serve is not None:  # what serving takes (l2l_gd: one packed optimizer step)
        model = cfg.algorithm.record.serve(model)
    return log_torch_model(model, dest, registered_name=cfg.tracking.register,
                           input_example=example_input(cfg).numpy())


# --------------------------------------------------------------------------------------------------------------
# Evaluation of a finished run or a registered model
# --------------------------------------------------------------------------------------------------------------

def model_from_checkpoint(cfg: Config, state: dict) -> torch.nn.Module:
    """The plain nn.Module with the checkpoint's weights (extra meta-parameters such as Meta-SGD rates dropped)."""
    model = build_model(cfg, image_shape(cfg))
    own = dict(model.named_parameters())
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state["params"][k])
    return model


def evaluate(run: str | None = None, model_uri: str | None = None, *, tasks: int | None = None,
             overrides: list[str] = (), out: str | None = None, tracking_uri: str | None = None,
             checkpoint: str | None = None) -> dict:
    """Evaluate a run's final checkpoint (or a registered model) on test episodes; write eval.json and Parquet."""
    if bool(run) == bool(model_uri):
        raise RunError("pass exactly one of --run RUN_ID or --model models:/NAME@ALIAS")
    if model_uri and not model_uri.startswith("models:/"):
        raise RunError(f"--model must look like models:/NAME@ALIAS or models:/NAME/VERSION, got {model_uri!r}")
    uri = explicit_tracking_uri(tracking_uri)
    if model_uri and not uri:
        raise RunError("--model needs the registry: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    state, what = checkpoint_of(run, model_uri, uri, checkpoint)
    print(f"checkpoint: {what}, step {state['step']}")
    try:
        base = config_from_dict(state["config"])
    except ConfigError as e:
        raise RunError(f"{what}: its stored config is not valid here ({e})") from None
    data = {k: v for k, v in base.to_dict().items()}
    from metatrain.pipeline.config import apply_overrides, build

    cfg = build(Config, apply_overrides(data, list(overrides)))
    if tasks is not None:
        if tasks < 1:
            raise ConfigError(f"--tasks must be >= 1, got {tasks}")
        cfg = cfg.replace(train=cfg.train.__class__(**{**cfg.to_dict()["train"], "eval_tasks": tasks}))
    _preflight(cfg)
    core = TaskWorkerCore(cfg, worker_id=0)
    expected = fingerprint(cfg, core.model)
    if state.get("fingerprint") and state["fingerprint"] != expected:
        raise RunError(f"{what}: checkpoint was written for a different model or config (fingerprint "
                       f"{state['fingerprint']} != {expected}); --set may not change the model or ways")
    out_dir = Path(out) if out else Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    check_out_dir(out_dir, evaluating=what)
    rows = core.evaluate(state["params"], "test", 0, range(cfg.train.eval_tasks))
    summary = summarize(rows, cfg, cfg.data.test_split, {"step": state["step"], "source": what})
    write_eval(out_dir, summary, rows)
    print(describe(summary))
    print(f"wrote {out_dir}/eval.json and {out_dir}/eval_tasks.parquet")
    return summary


__all__ = ["TrackingError", "RunError", "train", "evaluate", "init_ray", "summarize"]
