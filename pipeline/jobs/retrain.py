"""Scheduled retraining with a champion model: train a challenger, compare on the same tasks, promote only if better.

    metatrain retrain configs/omniglot_fomaml_5w1s.yaml --model omniglot-fomaml [--budget-steps 500] \\
        [--margin 0.005] [--tracking-uri URI] [--set a.b=v ...]

1. The registered model's ``@champion`` version, if any, is the warm start (its checkpoint, loaded with
   ``weights_only=True``; a config whose model does not fit it is refused before anything trains). Without one the
   challenger trains from scratch.
2. ``metatrain train`` runs (``--budget-steps`` steps) and registers the challenger as a new version.
3. Challenger and champion are evaluated on the same ``train.eval_tasks`` (>= 600) test episodes: same eval seed,
   same (step, slot) keys, so the comparison is paired.
4. The challenger is promoted (alias ``champion`` moves to it, the old one becomes ``previous``) only if it beats the
   champion by more than the margin; the default margin is the 95% CI half-width of the paired per-task
   difference, so a promotion is a significant improvement. Both accuracies, CIs, the margin and the decision are set
   as tags on the challenger's model version and run, and printed.

Safe to schedule: exit 0 when promoted or kept (with different messages), non-zero on failure; a failure at any step
leaves the champion untouched (promotion is the last step). Two retrains at once never both promote: the decision is
a compare-and-set under a lock (``promote_if_better``): the alias must still point at the version this retrain
compared against, else it does not promote and says so. The lock is a file lock, next to the SQLite store for a
``sqlite:`` URI, under ``~/.cache/metatrain/locks`` otherwise (it serialises retrains on one machine, which is how a
cron or a Ray job runs them).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from metatrain.tasks.errors import MetatrainError

from metatrain.pipeline.config_parsing import read_yaml
from metatrain.pipeline.scores import ci95
from metatrain.pipeline.tracking import explicit_tracking_uri

CHAMPION, PREVIOUS = "champion", "previous"
MIN_EVAL_TASKS = 600


class RetrainError(MetatrainError):
    """A retrain cannot run (no registry, a model that does not fit the champion, ...)."""


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    challenger_version: str
    champion_version: str | None
    challenger_acc: float
    challenger_ci95: float
    champion_acc: float | None
    champion_ci95: float | None
    margin: float

    def tags(self) -> dict[str, str]:
        t = {"metatrain.retrain.decision": "promoted" if self.promoted else "kept",
             "metatrain.retrain.reason": self.reason,
             "metatrain.retrain.challenger_accuracy": f"{self.challenger_acc:.6f}",
             "metatrain.retrain.challenger_ci95": f"{self.challenger_ci95:.6f}",
             "metatrain.retrain.margin": f"{self.margin:.6f}"}
        if self.champion_version is not None:
            t |= {"metatrain.retrain.champion_version": self.champion_version,
                  "metatrain.retrain.champion_accuracy": f"{self.champion_acc:.6f}",
                  "metatrain.retrain.champion_ci95": f"{self.champion_ci95:.6f}"}
        return t

    def message(self, name: str) -> str:
        ch = (f"challenger v{self.challenger_version} {100 * self.challenger_acc:.2f}% "
              f"± {100 * self.challenger_ci95:.2f}%")
        if self.champion_version is None:
            return f"{name}: promoted {ch} to @{CHAMPION} (there was no champion)"
        old = f"champion v{self.champion_version} {100 * self.champion_acc:.2f}% ± {100 * self.champion_ci95:.2f}%"
        verb = "promoted" if self.promoted else "kept the champion"
        return f"{name}: {verb}: {ch} vs {old}, margin {100 * self.margin:.2f} points ({self.reason})"


def compare(challenger: np.ndarray, champion: np.ndarray, margin: float | None) -> tuple[bool, float, str]:
    """(better, margin used, reason) for per-task accuracies on the same tasks, in the same order."""
    if challenger.shape != champion.shape:
        raise RetrainError(f"challenger and champion were scored on different tasks ({len(challenger)} vs "
                           f"{len(champion)})")
    diff = challenger - champion
    m = ci95(diff) if margin is None else margin
    gain = float(diff.mean())
    if gain > m:
        return True, m, f"gain {100 * gain:.2f} points > margin"
    return False, m, f"gain {100 * gain:.2f} points <= margin"


def _lock_path(tracking_uri: str, name: str) -> Path:
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return db.with_name(f"{db.name}.{name}.retrain.lock")
    digest = hashlib.sha256(f"{tracking_uri}|{name}".encode()).hexdigest()[:16]
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metatrain" / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{digest}.lock"


def promote_if_better(client, tracking_uri: str, name: str, challenger_version: str, compared_against: str | None,
                      better: bool, timeout_s: float = 600.0) -> tuple[bool, str]:
    """Compare-and-set of the ``champion`` alias under a lock: (promoted, reason).

    Promotes only if ``better`` and the alias still points where it did when the challenger was compared
    (``compared_against``, None = no champion then). The old champion keeps the alias ``previous``.
    """
    from mlflow.exceptions import MlflowException

    path = _lock_path(tracking_uri, name)
    try:
        lock = FileLock(path, timeout=timeout_s, poll_interval=0.2).acquire()
    except Timeout:
        raise RetrainError(f"another retrain of {name} holds {path} for over {timeout_s:.0f} s") from None
    with lock:
        try:
            now = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException:
            now = None
        if now != (None if compared_against is None else str(compared_against)):
            return False, (f"@{CHAMPION} moved to v{now} while this retrain compared against "
                           f"v{compared_against}; re-run to compare against the new champion")
        if not better:
            return False, "not better by more than the margin"
        if now is not None:
            client.set_registered_model_alias(name, PREVIOUS, now)
        client.set_registered_model_alias(name, CHAMPION, challenger_version)
        return True, "better by more than the margin"


def retrain(config: str, name: str, *, budget_steps: int | None = None, overrides: list[str] = (),
            tracking_uri: str | None = None, out: str | None = None, margin: float | None = None,
            ray_address: str | None = None, quiet: bool = True) -> Decision:
    """Run one retrain (see the module docstring) and return the decision."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from metatrain.pipeline.distributed.worker import TaskWorkerCore
    from metatrain.pipeline.jobs.runs import checkpoint_of
    from metatrain.pipeline.jobs.train import train

    uri = explicit_tracking_uri(tracking_uri)
    if not uri:
        raise RetrainError("retrain needs a model registry shared by its runs: pass --tracking-uri or set "
                           "MLFLOW_TRACKING_URI (e.g. sqlite:///runs/registry.db)")
    if budget_steps is not None and budget_steps < 1:
        raise RetrainError(f"--budget-steps must be >= 1, got {budget_steps}")
    if margin is not None and (not math.isfinite(margin) or margin < 0):
        raise RetrainError(f"--margin must be a finite number >= 0, got {margin}")
    from metatrain.pipeline.config import load_config

    extra = list(overrides) + ([f"train.steps={budget_steps}"] if budget_steps else [])
    cfg = load_config(config, extra)
    # Everything that would fail after the training is checked before it: the comparison needs accuracies ...
    if not cfg.data.has_images:
        raise RetrainError(f"retrain compares accuracies; the task of {config} (data.dataset={cfg.data.dataset}) "
                           "has none (a regression or a learned optimizer)")
    if cfg.train.eval_tasks < MIN_EVAL_TASKS:
        raise RetrainError(f"train.eval_tasks must be >= {MIN_EVAL_TASKS} for a retrain: the promotion decision "
                           f"compares accuracies measured on that many tasks")
    client = MlflowClient(tracking_uri=uri)
    champion = None  # no such model yet, or no @champion: the challenger trains from scratch
    try:  # ... and the registry must take the name (it refuses '/' and ':', say)
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "INVALID_PARAMETER_VALUE":
            raise RetrainError(f"--model {name!r}: the model registry refuses this name ({e.message})") from None
    else:
        try:
            champion = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:  # an unknown alias: RESOURCE_DOES_NOT_EXIST from SQLite, INVALID_PARAMETER... by REST
            pass
    warm = None
    if champion is not None:
        # This version exactly, even if the alias moves meanwhile (the promotion step checks that it did not).
        state, what = checkpoint_of(None, f"models:/{name}/{champion.version}", uri)
        warm = ({k: v for k, v in state["params"].items()}, f"{name} v{champion.version} (@{CHAMPION})")
    champion_version = None if champion is None else str(champion.version)
    out = out or str(Path("runs") / time.strftime(f"retrain-{name}-%Y%m%d-%H%M%S"))
    result = train(config, extra, out=out, tracking_uri=uri, register=name, warm_start=warm, quiet=quiet,
                   ray_address=ray_address)
    versions = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == result.run_id]
    if not versions:
        raise RetrainError(f"the challenger run {result.run_id} registered no version of {name}")
    challenger_version = str(max(int(v.version) for v in versions))
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(out) / "eval_tasks.parquet").to_pylist()
    key = "query_acc"  # an image task's (checked before training)
    challenger_acc = np.array([r[key] for r in rows])
    champion_acc = None
    if champion is not None:
        # The champion on exactly the challenger's test tasks: same config (data, eval seed), same slots.
        from metatrain.pipeline.config import config_from_dict

        cfg = config_from_dict(yaml_config(Path(out) / "config.yaml"))  # as the run resolved it
        core = TaskWorkerCore(cfg)
        champ_rows = core.evaluate(state["params"], "test", 0, [r["slot"] for r in rows])
        champion_acc = np.array([r[key] for r in champ_rows])
        better, used_margin, why = compare(challenger_acc, champion_acc, margin)
    else:
        better, used_margin, why = True, 0.0 if margin is None else margin, "no champion yet"
    promoted, cas_reason = promote_if_better(client, uri, name, challenger_version, champion_version, better)
    decision = Decision(promoted, why if promoted or not better else cas_reason, challenger_version,
                        champion_version, float(challenger_acc.mean()),
                        ci95(challenger_acc), None if champion_acc is None else float(champion_acc.mean()),
                        None if champion_acc is None else ci95(champion_acc), used_margin)
    for k, v in decision.tags().items():
        client.set_model_version_tag(name, challenger_version, k, v)
        client.set_tag(result.run_id, k, v)
    print(decision.message(name))
    return decision


def yaml_config(path: Path) -> dict:
    return read_yaml(path, "run config", RetrainError)
