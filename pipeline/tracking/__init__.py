"""MLflow run tracking on MLflow's own client, with what MLflow does not do.

MLflow sends (``log_batch(..., synchronous=False)``: its async queue, the training thread never waits on the
network), retries (its ``MLFLOW_HTTP_REQUEST_*`` settings), runs the lifecycle calls and samples system metrics
(``SystemMetricsMonitor``). Ours: an explicit store checked before training (``resolve_tracking_uri``,
``check_tracking``); secrets masked in params, tags and messages (``redact_uri``, ``flatten_config``); a journal
(``<spill_dir>/journal-<run_id>.jsonl``) that every metric and tag enters before MLflow gets it and that is cut by a
``flush()`` finding all delivered -- what MLflow failed to deliver, or a killed process never sent, is resent from
it once the store is back or on ``--resume`` (``replay_journal``), skipping what the store holds, so each lands
once; and a terminal status for every run (FAILED with an ``error`` tag, KILLED on Ctrl-C/SIGTERM or at exit).

    with RunTracker(uri, experiment="omniglot", spill_dir=out / "mlflow-spill").start(flatten_config(cfg)) as t:
        t.log_metrics({"train/loss": loss}, step=step)
"""

from metatrain.pipeline.tracking.redact import MAX_PARAM_VALUE_LENGTH, flatten_config, redact_uri
from metatrain.pipeline.tracking.run import CHANGED_PARAM_TAG, RunTracker
from metatrain.pipeline.tracking.store import (
    TrackingError,
    check_tracking,
    default_artifact_root,
    explicit_tracking_uri,
    resolve_tracking_uri,
)

__all__ = ["CHANGED_PARAM_TAG", "MAX_PARAM_VALUE_LENGTH", "RunTracker", "TrackingError", "check_tracking",
           "default_artifact_root", "explicit_tracking_uri", "flatten_config", "redact_uri", "resolve_tracking_uri"]
