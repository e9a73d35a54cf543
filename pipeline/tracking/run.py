"""One MLflow run on MLflow's client, with the journal that makes sure no metric is lost."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metatrain.pipeline.tracking.redact import MAX_TAG_VALUE_LENGTH, clean_key, one_line, param_value, redact_uri, warn
from metatrain.pipeline.tracking.store import TrackingError, artifact_location, check_tracking, scheme_of

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
CHANGED_PARAM_TAG = "resume/changed_param/"
_DATA_ERRORS = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "MALFORMED_REQUEST"}  # resending can never help


def _line(m) -> str:
    """A journal line: a metric, or (no ``step``) a tag."""
    return json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                      if hasattr(m, "step") else {"tag": m.key, "value": m.value}) + "\n"


class Journal:
    """The write-ahead log of a run's metrics and tags (``journal-<run_id>.jsonl``): appended before MLflow gets an
    entry, cut once the store holds all of it; a killed session's lines stay for the next session to resend."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.file = path, open(path, "a", encoding="utf-8")

    def append(self, entries: list) -> None:
        try:
            self.file.write("".join(map(_line, entries)))
            self.file.flush()  # to the OS: a killed process loses nothing written
        except OSError as e:  # a full disk, say: name the journal
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e

    def read(self) -> tuple[list, list]:
        """(metrics, tags); a line torn by a crash is skipped."""
        from mlflow.entities import Metric, RunTag

        metrics, tags = [], []
        for text in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                r = json.loads(text)
                (tags.append(RunTag(r["tag"], r["value"])) if "tag" in r else
                 metrics.append(Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))))
        return metrics, tags

    def cut(self) -> None:
        self.file.seek(0)
        self.file.truncate()


def _send(client, run_id: str, metrics: list, tags: list) -> int:
    """``log_batch``, synchronously; a batch the store refuses for its data is sent one entry at a time and the
    entries it still refuses are skipped. Returns how many were skipped; an outage raises."""
    from mlflow.exceptions import MlflowException

    try:
        client.log_batch(run_id, metrics=metrics, tags=tags)
        return 0
    except MlflowException as e:
        if e.error_code not in _DATA_ERRORS:
            raise
        if len(metrics) + len(tags) == 1:
            return 1
        return sum(_send(client, run_id, [x], []) for x in metrics) + sum(_send(client, run_id, [], [x]) for x in tags)


class RunTracker:
    """One MLflow run with a journal, system metrics and a terminal status.

    ``run_id`` resumes that run (status back to RUNNING; a param whose value changed stays -- MLflow params are
    immutable -- and the new value goes to the tag ``resume/changed_param/<key>``). ``artifact_root`` is where a
    *new* experiment on a local store keeps artifacts (default: ``mlartifacts/`` beside an SQLite database).
    ``spill_dir`` holds the journal (default: a folder in the system temp dir).
    """

    MAX_PENDING = 1000  # batches handed to MLflow between two flushes before log_metrics flushes itself

    def __init__(self, uri: str, experiment: str = "metatrain", run_id: str | None = None,
                 run_name: str | None = None, artifact_root: str | os.PathLike | None = None,
                 system_metrics: bool = True, *, system_metrics_interval_s: float | None = None,
                 spill_dir: str | os.PathLike | None = None):
        self.uri, self.experiment, self.run_name, self.run_id = uri, experiment, run_name, run_id
        self.artifact_root, self.system_metrics = artifact_root, system_metrics
        self.system_metrics_interval_s = system_metrics_interval_s
        self.spill_dir = Path(spill_dir) if spill_dir else Path(tempfile.gettempdir()) / "metatrain-spill"
        self.client = self.experiment_id = self._journal = self._monitor = None
        self.resumed = self._started = self._ended = False
        self.rejected = 0  # values the store refused (bad value or key) or that were not numbers
        self.failed: list[str] = []  # artifacts that could not be uploaded
        self._lock = threading.RLock()  # the journal and the pending operations below
        self._ops: list = []  # MLflow's futures for the batches handed to its async queue since the last flush
        self._dirty = False  # a batch failed: the next flush resends the journal
        self._down_since: float | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> RunTracker:
        """Create (or resume) the run and log ``params`` and ``tags``; TrackingError if that fails."""
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        if self._started:
            raise RuntimeError("RunTracker.start() called twice")
        if scheme_of(self.uri) in ("http", "https"):
            check_tracking(self.uri)  # seconds, not MLflow's minutes of retries, to find a wrong URI
        self.client, resume_id, self.run_id = MlflowClient(tracking_uri=self.uri), self.run_id, None
        tags = {clean_key(k): param_value(str(k), v, MAX_TAG_VALUE_LENGTH) for k, v in (tags or {}).items()}
        params = {clean_key(k): param_value(str(k), v) for k, v in (params or {}).items()}
        try:
            params = self._reopen(resume_id, params, tags) if resume_id else self._create(params)
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()],
                                  tags=[RunTag(k, v) for k, v in tags.items()])
            self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
        except BaseException as e:
            if self.run_id is not None:  # never leave a half-started run RUNNING
                with contextlib.suppress(Exception):
                    self.client.set_terminated(self.run_id, status="FAILED")
            if isinstance(e, TrackingError) or not isinstance(e, Exception):
                raise
            raise TrackingError(f"could not start an MLflow run in {redact_uri(self.uri)} ({one_line(e, 200)})") \
                from e
        self._started = True
        self._journal = Journal(self.spill_dir / f"journal-{self.run_id}.jsonl")
        self._start_monitor()
        atexit.register(self._atexit)
        return self

    def _create(self, params: dict) -> dict:
        from mlflow.exceptions import MlflowException

        c = self.client
        try:
            exp = c.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else c.create_experiment(
                self.experiment, artifact_location=artifact_location(self.uri, self.artifact_root))
        except MlflowException as e:  # study cells in parallel: another one created it first
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp_id = c.get_experiment_by_name(self.experiment).experiment_id
        self.run_id = c.create_run(exp_id, run_name=self.run_name).info.run_id
        return params

    def _reopen(self, run_id: str, params: dict, tags: dict) -> dict:
        """Back to RUNNING; returns the params the run lacks (a changed one goes to a tag in ``tags``)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise TrackingError(f"unknown MLflow run {run_id} in {redact_uri(self.uri)}") from None
        self.run_id, self.resumed, old = run.info.run_id, True, run.data.params
        self.client.update_run(self.run_id, status="RUNNING")
        tags["metatrain.resume_count"] = str(int(run.data.tags.get("metatrain.resume_count", 0)) + 1)
        for k in [k for k in params if k in old and old[k] != params[k]]:
            warn(f"param {k!r} changed on resume ({old[k][:80]!r} -> {params[k][:80]!r}); the run keeps the old "
                 f"value and records the new one in tag {CHANGED_PARAM_TAG}{k}")
            tags[f"{CHANGED_PARAM_TAG}{k}"] = params.pop(k)
        return {k: v for k, v in params.items() if k not in old}

    def end(self, status: str = "FINISHED") -> list[str]:
        """Stop system metrics, flush, mark the run ``status``; returns the artifacts that failed to upload.
        Idempotent; never raises because of the store: what it could not take stays in the journal."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}, not {status!r}")
        if self._started and not self._ended:
            self._ended = True
            atexit.unregister(self._atexit)
            if self._monitor is not None:
                self._monitor.finish()
            delivered = self.flush()
            self._journal.file.close()
            if delivered:
                self._journal.path.unlink(missing_ok=True)
            else:
                warn(f"metrics of MLflow run {self.run_id} could not all be sent; saved to {self._journal.path} "
                     "and resent when the run is resumed with the same spill folder")
            if self.rejected:
                warn(f"{self.rejected} metric or tag values were skipped in run {self.run_id}")
            try:
                self.client.set_terminated(self.run_id, status=status)
            except Exception as e:
                warn(f"could not mark MLflow run {self.run_id} {status} ({one_line(e, 200)}); it may show RUNNING "
                     "until the store is back (then: mlflow runs set-terminated ...)")
        return list(self.failed)

    def _atexit(self) -> None:
        self.set_tags({"error": "the process exited without ending the run"})
        self.end("KILLED")

    def __enter__(self) -> RunTracker:
        return self if self._started else self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None or (issubclass(exc_type, SystemExit) and exc.code in (None, 0)):
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.set_tags({"error": one_line(exc, 500)})
            self.end("FAILED")
        return False

    def _start_monitor(self) -> None:
        if not self.system_metrics:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            mon = SystemMetricsMonitor(self.run_id, resume_logging=self.resumed or self._monitor is not None,
                                       tracking_uri=self.uri)
            mon.sampling_interval = self.system_metrics_interval_s or mon.sampling_interval
            mon.start()
            self._monitor = mon
        except Exception as e:  # psutil missing, say
            warn(f"system metrics are off ({one_line(e)})")

    # ------------------------------------------------------------------ metrics and tags

    def _hand_over(self, metrics: list = (), tags: list = ()) -> None:
        """Journal, then give to MLflow's async queue; the future is checked at the next flush."""
        if not self._started or self._ended:
            raise RuntimeError("RunTracker: logging outside start() ... end()")
        if not (metrics or tags):
            return
        with self._lock:
            self._journal.append([*metrics, *tags])
            self._ops.append(self.client.log_batch(self.run_id, metrics=list(metrics), tags=list(tags),
                                                   synchronous=False))
            if len(self._ops) > self.MAX_PENDING:  # bounds the futures and the journal on a run that never flushes
                self.flush()

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now, batch = int(time.time() * 1000), []
        for k, v in metrics.items():
            try:
                batch.append(Metric(clean_key(k), float(v.item() if hasattr(v, "item") else v), now, int(step)))
            except (TypeError, ValueError):
                self.rejected += 1
                warn(f"metric {k!r} at step {step} is not a number ({str(v)[:80]!r}); skipped")
        self._hand_over(metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._hand_over(tags=[RunTag(clean_key(k), param_value(str(k), v, MAX_TAG_VALUE_LENGTH))
                              for k, v in tags.items()])

    def flush(self) -> bool:
        """Wait for MLflow's queue; resend from the journal what it failed to deliver. True if all is in the store."""
        with self._lock:
            return self._sync() is not None

    def replay_journal(self) -> int:
        """On resume: send what the journal holds and the store does not (a killed session's); how many metrics."""
        with self._lock:
            self._dirty = True
            n = self._sync(raise_down=True)
            if n:
                warn(f"resending {n} metrics that an earlier session of run {self.run_id} logged but had not sent")
            return n or 0

    def _sync(self, raise_down: bool = False) -> int | None:
        """Harvest MLflow's futures, resend the journal if anything failed, cut it: how many metrics were resent
        (None if the store is down: then the journal is kept)."""
        ops, self._ops = self._ops, []
        for op in ops:
            try:
                op.wait()
            except Exception:  # MLflow already logged it; the journal still holds the batch
                self._dirty = True
        sent = 0
        if self._dirty or self._down_since is not None:
            try:
                sent = self._resend()
            except Exception as e:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    warn(f"MLflow tracking unavailable ({one_line(e, 200)}); training continues, metrics are kept "
                         f"in {self._journal.path} and resent once the store is back")
                if raise_down:
                    raise
                return None
            if self._down_since is not None:
                warn(f"MLflow tracking recovered after {time.monotonic() - self._down_since:.0f} s: {sent} buffered "
                     "metrics sent")
                self._down_since = None
                if self._monitor is not None and not self._ended:  # MLflow's stops for good on a failed call
                    self._monitor.finish()
                    self._start_monitor()
            self._dirty = False
        self._journal.cut()
        return sent

    def _resend(self) -> int:
        """Send the journal's metrics the store lacks (same key, step, timestamp) and its tags, synchronously."""
        metrics, tags = self._journal.read()
        have = {(k, h.step, h.timestamp) for k in {m.key for m in metrics}
                for h in self.client.get_metric_history(self.run_id, k)}
        todo = [m for m in metrics if (m.key, m.step, m.timestamp) not in have]
        for i in range(0, len(todo), MAX_METRICS_PER_BATCH):
            self.rejected += _send(self.client, self.run_id, todo[i: i + MAX_METRICS_PER_BATCH], [])
        self.rejected += _send(self.client, self.run_id, [], tags)
        return len(todo)

    def last_step(self, *keys: str) -> int:
        """The highest step of any of ``keys`` in the store (0 if none): a resumed trainer logs only later steps."""
        return max((h.step for k in keys for h in self.client.get_metric_history(self.run_id, k)), default=0)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or a folder now. If that fails (after MLflow's HTTP retries), training goes on: a warning
        names the local copy, which stays where it is, and ``end()`` lists it."""
        src = Path(local_path)
        name = f"{artifact_path}/{src.name}" if artifact_path else src.name
        try:
            if src.is_dir():
                self.client.log_artifacts(self.run_id, str(src), name)
            else:
                self.client.log_artifact(self.run_id, str(src), artifact_path)
        except Exception as e:
            self.failed.append(name)
            warn(f"could not upload artifact {name} ({one_line(e, 200)}); it stays at {src.resolve()}")
