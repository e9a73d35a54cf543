"""MLflow run tracking that never loses a run.

What this adds on top of ``mlflow.tracking.MlflowClient``:

- **Where**: ``resolve_tracking_uri`` (``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store in the
  run's output folder; never MLflow's implicit ``./mlruns``/``./mlflow.db`` in whatever folder you happen to be in),
  and ``check_tracking`` to fail *before* training when the store is unusable (server down, folder unwritable).
- **No secrets**: ``redact_uri`` masks passwords in URIs and secret query parameters; ``flatten_config`` turns the
  nested config into MLflow params with secret-looking keys masked and MLflow's 6000-character limit respected.
  Every message this module prints or raises goes through the same redaction.
- **Metrics survive outages**: ``RunTracker.log_metrics`` only appends to an in-memory buffer; a background
  thread sends it with ``log_batch`` (1000 metrics per call, MLflow's limit) every ``flush_every_s``. The training
  thread never waits on the network (MLflow's HTTP client retries a dead server for minutes). When the store fails
  the buffer is kept, ONE warning is printed, sends are retried with exponential backoff (capped at 60 s), and the
  recovery is announced once with everything sent in order. The buffer is bounded (200k entries by default;
  beyond that the oldest are dropped and counted). Values MLflow accepts are logged as they are -- NaN as NaN;
  the SQLite store stores +-inf as +-1.8e308 -- and a value the store rejects is skipped with a counted warning.
- **Artifacts never crash training**: ``log_artifact``/``log_dict``/``log_text``/``log_figure`` stage a copy (so a
  file pruned or a figure closed right after still uploads) and upload it in the background with a few retries and
  backoff; what still failed is warned about, kept on disk and returned by ``end()``.
- **A run is never left RUNNING**: ``end()`` (and ``__exit__``: FINISHED / KILLED on KeyboardInterrupt / FAILED on
  any other exception, with an ``error`` tag) terminates it; an ``atexit`` hook ends a forgotten run as KILLED.
- **Resume**: ``RunTracker(uri, run_id=...)`` continues the same run: status back to RUNNING, params logged with the
  same value are not re-logged; a param whose value changed is kept (MLflow params are immutable) and the new value
  is recorded as the tag ``resume/changed_param/<key>`` with a warning, instead of crashing the resume.
- **System metrics**: MLflow's own ``SystemMetricsMonitor`` (needs ``psutil``) samples CPU, memory, disk, network
  and GPU (when ``pynvml`` sees one) into ``system/*`` metrics every ``system_metrics_interval_s`` seconds
  (default: ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``, else MLflow's 10 s).

Usage::

    uri = resolve_tracking_uri(args.tracking_uri, out_dir)
    check_tracking(uri)                                      # TrackingError before any training if unusable
    with RunTracker(uri, experiment="omniglot-5w1s", run_id=resume_id,
                    artifact_root=default_artifact_root(out_dir)).start(flatten_config(cfg)) as tracker:
        for step in range(start_step, steps):
            ...
            tracker.log_metrics({"train/loss": loss, "train/acc": acc}, step=step)
        tracker.log_figure(learning_curve_figure(history), "plots/learning_curve.png")
        tracker.log_model(model, registered_name="omniglot-maml")

MLflow is imported lazily, so importing this module (the CLI does) stays cheap.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metatrain.tasks.errors import MetatrainError

# MLflow's limits (mlflow.utils.validation): values longer than these are refused, not truncated, by the store.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100

DEFAULT_MAX_BUFFER = 200_000
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
CHANGED_PARAM_TAG = "resume/changed_param/"


class TrackingError(MetatrainError):
    """The MLflow store is unusable (unreachable server, unwritable folder) or a run id is unknown."""


def _warn(message: str) -> None:
    # One line on stderr, looked up at call time (pytest's capsys swaps sys.stderr), from any thread.
    print(f"metatrain: warning: {redact_uri(message)}", file=sys.stderr, flush=True)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return redact_uri(text if len(text) <= limit else text[: limit - 3] + "...")


# --------------------------------------------------------------------------------------------------- URIs


# scheme://user:password@ -- the password may itself hold '@' (greedy up to the last '@' before a '/'), so a
# badly escaped password is masked whole rather than leaking its tail.
_USERINFO_RE = re.compile(r"(?P<pre>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^\s/]*)@")
_QUERY_RE = re.compile(r"(?P<pre>[?&;](?P<name>[^=&#\s?]*)=)(?P<val>[^&#\s]*)")
_SECRET_QUERY_WORDS = ("token", "password", "passwd", "pwd", "secret", "key", "auth", "signature", "credential")


def redact_uri(uri: str) -> str:
    """``uri`` (or any text holding URIs) with passwords and secret query values replaced by ``***``.

    ``http://user:pw@host`` -> ``http://user:***@host`` (also ``postgresql://``, ``mysql://``, ...), and
    ``?token=abc&x=1`` -> ``?token=***&x=1`` for query parameters named like a token, password, secret or key.
    """
    if not isinstance(uri, str) or ("://" not in uri and "=" not in uri):
        return uri
    text = _USERINFO_RE.sub(lambda m: m.group("pre") + "***@", uri)

    def query(m: re.Match) -> str:
        name = m.group("name").lower()
        secret = any(w in name for w in _SECRET_QUERY_WORDS) or name == "sig"
        return m.group("pre") + ("***" if secret and m.group("val") else m.group("val"))

    return _QUERY_RE.sub(query, text) if "?" in text else text


def explicit_tracking_uri(cli_uri: str | None) -> str | None:
    """``--tracking-uri`` if given, else ``$MLFLOW_TRACKING_URI``, else None (no store was named)."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def resolve_tracking_uri(cli_uri: str | None, out_dir: str | os.PathLike) -> str:
    """``--tracking-uri`` if given, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs out_dir>/mlflow.db``.

    Always an explicit URI: MLflow 3's implicit default is a SQLite file in the current folder, which scatters runs
    over wherever the command was started from.
    """
    return explicit_tracking_uri(cli_uri) or f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def default_artifact_root(out_dir: str | os.PathLike) -> str:
    """``<abs out_dir>/mlartifacts``: where a new experiment on a local store keeps its artifacts."""
    return str(Path(out_dir).resolve() / "mlartifacts")


def _scheme(uri: str) -> str:
    return urllib.parse.urlsplit(uri).scheme.lower() if "://" in uri or uri.startswith("file:") else ""


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite://`` URI (None for an in-memory database)."""
    rest = uri[len("sqlite://"):]
    # sqlite:///rel/path.db -> "rel/path.db"; sqlite:////abs/path.db -> "/abs/path.db"; strip ?query.
    path = rest[1:] if rest.startswith("/") else rest
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(urllib.parse.unquote(path))


def _is_remote(uri: str) -> bool:
    return _scheme(uri) in ("http", "https") or uri.startswith("databricks")


def _check_writable_dir(folder: Path, uri: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrackingError(f"cannot create folder {folder} for the MLflow store {redact_uri(uri)} "
                            f"({e.strerror or e})") from None
    if not folder.is_dir():
        raise TrackingError(f"{folder} is not a folder; cannot hold the MLflow store {redact_uri(uri)}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TrackingError(f"folder {folder} is not writable; cannot hold the MLflow store {redact_uri(uri)}")


def _probe_http(uri: str, timeout_s: float) -> None:
    parts = urllib.parse.urlsplit(uri)
    headers = {}
    netloc = parts.netloc
    if "@" in netloc:
        # urllib does not send userinfo from the URL: move it into a Basic auth header (what MLflow does with
        # MLFLOW_TRACKING_USERNAME/PASSWORD). /health needs no auth on a plain server, but a proxy in front may.
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, pw = userinfo.partition(":")
        token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(pw)}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    shown = redact_uri(uri)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        reason = " ".join(str(reason).split()) or type(e).__name__
        raise TrackingError(f"MLflow tracking server at {shown} is unreachable ({redact_uri(reason)}); "
                            "start it or pass --tracking-uri") from None
    if status in (401, 403):
        raise TrackingError(f"MLflow tracking server at {shown} refused the credentials (HTTP {status}); set "
                            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    if status == 404:
        raise TrackingError(f"{shown} answered HTTP 404 on /health: not an MLflow tracking server? "
                            "pass the server's base URI with --tracking-uri")
    if status >= 400:
        raise TrackingError(f"MLflow tracking server at {shown} is unavailable (HTTP {status} on /health); "
                            "start it or pass --tracking-uri")


def _probe_client(uri: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingError (one line, URI redacted) if the tracking store ``uri`` cannot be used.

    - ``http(s)://``: GET ``<uri>/health`` (the MLflow server's health endpoint) within ``timeout_s``;
    - ``sqlite://``: the database's folder exists or can be created and is writable, and an existing file is an
      SQLite database;
    - ``file:`` or a plain path: the folder exists or can be created and is writable;
    - anything else (``postgresql://``, ``databricks``, ...): one ``search_experiments`` call within ``timeout_s``.

    The probe runs in a daemon thread so a DNS lookup or a stuck connection cannot hold the caller past the timeout.
    """
    scheme = _scheme(uri)
    shown = redact_uri(uri)
    if scheme == "sqlite":
        db = _sqlite_path(uri)
        if db is None:
            return
        _check_writable_dir(db.parent if str(db.parent) else Path("."), uri)
        if db.exists():
            if not db.is_file():
                raise TrackingError(f"MLflow store {shown}: {db} is not a file")
            with open(db, "rb") as f:
                head = f.read(16)
            if head and head != b"SQLite format 3\x00":
                raise TrackingError(f"MLflow store {shown}: {db} is not an SQLite database")
            if not os.access(db, os.W_OK):
                raise TrackingError(f"MLflow store {shown}: {db} is not writable")
        return
    if scheme in ("file", ""):
        if uri.startswith("databricks"):
            pass  # "databricks" / "databricks://profile" have no "//" netloc semantics: probe below
        else:
            path = Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path)) if scheme == "file" else Path(uri)
            _check_writable_dir(path, uri)
            return

    box: dict[str, BaseException] = {}

    def probe() -> None:
        try:
            if scheme in ("http", "https"):
                _probe_http(uri, timeout_s)
            else:
                _probe_client(uri)
        except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread below
            box["error"] = e

    t = threading.Thread(target=probe, name="metatrain-check-tracking", daemon=True)
    t.start()
    t.join(timeout_s + 1.0)
    if t.is_alive():
        raise TrackingError(f"MLflow tracking store {shown} did not answer within {timeout_s:g} s; "
                            "start it or pass --tracking-uri")
    err = box.get("error")
    if isinstance(err, TrackingError):
        raise err
    if err is not None:
        raise TrackingError(f"MLflow tracking store {shown} is unusable ({_one_line(err, 200)}); "
                            "fix it or pass --tracking-uri") from None


# --------------------------------------------------------------------------------------------------- params


_SECRET_WORDS = {"password", "passwd", "pwd", "passphrase", "token", "secret", "apikey", "credential", "credentials"}
_SECRET_PARTS = ("api_key", "apikey", "access_key", "accesskey", "secret_key", "private_key", "privatekey")
_KEY_BAD_CHARS = re.compile(r"[^\w.\- :/]")


def _is_secret_key(key: str) -> bool:
    """Whether a config key names a secret: ``db.password``, ``hf_token``, ``api_key``, ``apiKey``...

    Whole words only (split on non-alphanumerics), so ``tokenizer`` or ``max_tokens`` are not masked.
    """
    last = str(key).rsplit(".", 1)[-1].lower()
    words = set(re.split(r"[^a-z0-9]+", last))
    return bool(words & _SECRET_WORDS) or any(p in last for p in _SECRET_PARTS)


def _scrub(value: Any) -> Any:
    """Mask secret-keyed entries inside nested lists/dicts (a list of DB configs with passwords, say)."""
    if isinstance(value, Mapping):
        return {k: ("***" if _is_secret_key(str(k)) and v not in (None, "") else _scrub(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    suffix = f"...[truncated from {len(text)} chars]"
    return text[: limit - len(suffix)] + suffix


def _value_text(value: Any) -> str:
    # JSON for non-strings: 1000 -> "1000", True -> "true", None -> "null", [64, 64] -> "[64, 64]" -- the way the
    # value reads in a config file, and the same text on every machine (unlike repr of floats across libraries).
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str, allow_nan=True)
    except (TypeError, ValueError):
        return str(value)


def _clean_key(key: str) -> str:
    # MLflow keys allow alphanumerics, "_", "-", ".", " ", ":" and "/" only, up to 250 characters.
    return _KEY_BAD_CHARS.sub("_", str(key))[:MAX_KEY_LENGTH]


def _param_value(key: str, value: Any, limit: int = MAX_PARAM_VALUE_LENGTH) -> str:
    if _is_secret_key(key) and value not in (None, ""):
        return "***"
    return _truncate(redact_uri(_value_text(_scrub(value))), limit)


def flatten_config(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params: ``{"train": {"steps": 1000}}`` -> ``{"train.steps": "1000"}``.

    Non-string values are written as JSON (``true``, ``null``, ``[64, 64]``); an empty dict stays ``"{}"``.
    Values under secret-looking keys (password, token, secret, api_key, ...) become ``***``, credentials inside
    URIs are masked (``redact_uri``), and values longer than MLflow's 6000 characters are cut, saying so.
    """
    out: dict[str, str] = {}
    base = f"{prefix}." if prefix and not prefix.endswith(".") else prefix
    for k, v in d.items():
        key = f"{base}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_config(v, key))
        else:
            out[key] = _param_value(key, v)
    return out


# --------------------------------------------------------------------------------------------------- errors


# Errors that depend on the data sent (a bad value or key), where retrying the same batch can never succeed.
# Everything else -- connection errors, timeouts, 5xx, 429, "database is locked", auth hiccups -- is treated as
# an outage: the data is kept and retried.
_DATA_ERROR_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "MALFORMED_REQUEST"}


def _is_data_error(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in _DATA_ERROR_CODES


class _Outage(Exception):
    """Sending stopped on a transient error; everything before ``handled`` (within the chunk) was dealt with."""

    def __init__(self, error: BaseException, handled: int):
        super().__init__(str(error))
        self.error = error
        self.handled = handled


class _ArtifactJob:
    __slots__ = ("name", "local", "artifact_path", "is_dir", "attempts", "next_at", "last_error")

    def __init__(self, name: str, local: Path, artifact_path: str | None, is_dir: bool):
        self.name = name  # where it lands in the run, e.g. "plots/learning_curve.png"
        self.local = local  # the staged copy
        self.artifact_path = artifact_path
        self.is_dir = is_dir
        self.attempts = 0
        self.next_at = 0.0
        self.last_error = ""


# --------------------------------------------------------------------------------------------------- tracker


def _metric_line(m) -> str:
    """One metric as a line of a spill or journal file (``_read_metric_lines`` reads it back)."""
    return json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n"


def _read_metric_lines(path: Path, tags: dict | None = None) -> list:
    """Metrics (and, into ``tags``, tags) of a spill or journal file; a line torn by a crash is skipped."""
    from mlflow.entities import Metric

    metrics = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            if "tag" in rec:
                if tags is not None:
                    tags[rec["tag"]] = rec["value"]
            else:
                metrics.append(Metric(rec["key"], float(rec["value"]), int(rec["timestamp"]), int(rec["step"])))
        except (ValueError, KeyError, TypeError):
            continue
    return metrics


class RunTracker:
    """One MLflow run: buffered metrics, background uploads, system metrics, and a guaranteed terminal status.

    Args:
        uri: tracking URI (``resolve_tracking_uri``).
        experiment: experiment name, created if missing (ignored when resuming: the run has its experiment).
        run_id: resume this run instead of creating one.
        run_name: name of a new run (MLflow makes one up if None).
        artifact_root: artifact location of a *new* experiment on a non-server store; for ``sqlite:///.../x.db``
            it defaults to ``mlartifacts/`` beside the database. Servers choose their own.
        system_metrics: sample CPU/memory/disk/network (and GPU) into ``system/*`` metrics.
        flush_every_s: how often the background thread sends buffered metrics and tags.
        system_metrics_interval_s: sampling interval (None: ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` or 10 s).
        max_buffer: most metric entries kept while the store is down; the oldest are dropped beyond it.
        artifact_attempts: upload attempts per artifact (and per ``log_model``) before giving up on it.
        retry_base_s, retry_cap_s: exponential backoff between retries: base, 2*base, 4*base, ... capped.
        spill_dir: where metrics still unsent at ``end()`` (``unsent-metrics-<run_id>.jsonl``) and artifacts that
            failed to upload (``unuploaded/``) are kept; resuming the run with the same spill_dir sends the spilled
            metrics first. If None, unsent metrics are lost (with a warning) and failed artifacts stay in a
            temporary folder whose path the warning names. With a spill_dir, every metric is also appended to a
            journal (``journal-<run_id>.jsonl``) as it is logged and the journal is cut each time the buffer is
            empty, so a process killed with metrics still buffered (SIGKILL, a lost node: no ``end()``) loses
            none of them: ``replay_journal`` on resume sends the ones the store does not have.
    """

    def __init__(self, uri: str, experiment: str = "metatrain", run_id: str | None = None,
                 run_name: str | None = None, artifact_root: str | os.PathLike | None = None,
                 system_metrics: bool = True, flush_every_s: float = 5.0, *,
                 system_metrics_interval_s: float | None = None, max_buffer: int = DEFAULT_MAX_BUFFER,
                 artifact_attempts: int = 4, retry_base_s: float = 1.0, retry_cap_s: float = 60.0,
                 spill_dir: str | os.PathLike | None = None):
        if max_buffer < 1 or artifact_attempts < 1 or flush_every_s <= 0:
            raise ValueError("max_buffer and artifact_attempts must be >= 1 and flush_every_s > 0")
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.artifact_root = str(artifact_root) if artifact_root is not None else None
        self.system_metrics = system_metrics
        self.system_metrics_interval_s = system_metrics_interval_s
        self.flush_every_s = float(flush_every_s)
        self.max_buffer = int(max_buffer)
        self.artifact_attempts = int(artifact_attempts)
        self.retry_base_s = float(retry_base_s)
        self.retry_cap_s = float(retry_cap_s)
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._resume_id = run_id
        self._run_id: str | None = None
        self._client = None
        self._started = False
        self._ended = False
        self.resumed = False
        self.experiment_id: str | None = None

        self._lock = threading.Lock()  # guards the buffers and counters below
        self._send_lock = threading.Lock()  # one sender at a time: keeps metrics in order
        self._buf: deque = deque()
        self._tags: dict[str, str] = {}
        self._jobs: list[_ArtifactJob] = []
        self._failed_artifacts: list[str] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._monitor = None
        self._staging: Path | None = None
        self._journal = None  # the open write-ahead journal of buffered metrics (with a spill_dir)
        self._journal_backlog: list = []  # a killed session's journal entries, until replay_journal() decides
        self._replayed_steps: dict[str, int] = {}  # key -> highest step replay_journal() put on its way to the store

        self._failures = 0  # consecutive failed sends
        self._retry_at = 0.0  # monotonic time before which the background thread does not retry
        self._outage_since: float | None = None
        self._sent_before_outage = 0
        self.sent = 0  # metric entries the store accepted
        self.dropped = 0  # oldest entries dropped because the buffer was full
        self.rejected = 0  # entries the store refused (bad value or key) or that were not numbers
        self._warned_full = False
        self._warned_rejected = False

    # ------------------------------------------------------------------ properties

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            raise RuntimeError("RunTracker.start() has not been called")
        return self._run_id

    @property
    def client(self):
        """The ``MlflowClient`` this tracker sends with (after ``start``)."""
        return self._client

    @property
    def pending(self) -> int:
        """Metric entries buffered and not yet accepted by the store."""
        with self._lock:
            return len(self._buf)

    # ------------------------------------------------------------------ start

    def start(self, params: Mapping[str, str] | None = None, tags: Mapping[str, Any] | None = None) -> RunTracker:
        """Create the run (or resume ``run_id``), log ``params`` and ``tags``, start the background threads.

        Returns self, for ``with RunTracker(...).start(params) as tracker:``. Raises TrackingError if the store is
        unusable or the run to resume does not exist.
        """
        if self._started:
            raise RuntimeError("RunTracker.start() called twice")
        from mlflow.tracking import MlflowClient

        shown = redact_uri(self.uri)
        if _scheme(self.uri) in ("http", "https"):
            # MLflow's HTTP client retries a dead server for minutes before failing: ask /health first, so a wrong
            # URI fails in seconds with a clear message.
            check_tracking(self.uri)
        try:
            self._client = MlflowClient(tracking_uri=self.uri)
            run = self._resume() if self._resume_id else self._create(tags)
            self._run_id = run.info.run_id
            self.experiment_id = run.info.experiment_id
            if params:
                self._log_params_now(params, run.data.params if self.resumed else {})
            if tags and self.resumed:
                self._send_tags_now(tags)
        except BaseException as e:
            if self._run_id is not None:
                # The run exists but start() did not finish: do not leave it RUNNING.
                try:
                    self._client.set_terminated(self._run_id, status="FAILED")
                except Exception:
                    pass
            if isinstance(e, TrackingError) or not isinstance(e, Exception):
                raise
            raise TrackingError(f"could not start an MLflow run in {shown} ({_one_line(e, 200)})") from e
        self._started = True
        self._open_journal()
        if self.resumed:
            self._replay_spill()
        self._thread = threading.Thread(target=self._loop, name="metatrain-mlflow-flush", daemon=True)
        self._thread.start()
        if self.system_metrics:
            self._start_system_metrics()
        atexit.register(self._atexit)
        return self

    def _create(self, tags: Mapping[str, Any] | None):
        from mlflow.exceptions import MlflowException

        client = self._client
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(self.experiment, artifact_location=self._artifact_location())
            except MlflowException as e:
                # Another process created it between our lookup and create: use theirs.
                if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp_id = client.get_experiment_by_name(self.experiment).experiment_id
        elif exp.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment {self.experiment!r} in {redact_uri(self.uri)} is deleted; "
                                "restore it (mlflow experiments restore) or choose another experiment name")
        else:
            exp_id = exp.experiment_id
        return client.create_run(exp_id, run_name=self.run_name, tags=self._clean_tags(tags or {}))

    def _artifact_location(self) -> str | None:
        if _is_remote(self.uri):
            return None  # the server decides (--artifacts-destination / --default-artifact-root)
        root = self.artifact_root
        if root is None and _scheme(self.uri) == "sqlite":
            db = _sqlite_path(self.uri)
            root = str(db.resolve().parent / "mlartifacts") if db is not None else None
        if root is None:
            return None
        return root if "://" in root else Path(root).resolve().as_uri()

    def _resume(self):
        from mlflow.exceptions import MlflowException

        shown = redact_uri(self.uri)
        try:
            run = self._client.get_run(self._resume_id)
        except MlflowException as e:
            if getattr(e, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise TrackingError(f"unknown MLflow run {self._resume_id} in {shown}") from None
            raise
        if run.info.lifecycle_stage != "active":
            raise TrackingError(f"MLflow run {self._resume_id} in {shown} is deleted; restore it "
                                "(mlflow runs restore) or start a new run")
        self.resumed = True
        self._run_id = run.info.run_id  # from here on a failing start() marks the run FAILED, not left RUNNING
        self._client.update_run(run.info.run_id, status="RUNNING")
        count = int(run.data.tags.get("metatrain.resume_count", "0") or 0) + 1
        self._client.set_tag(run.info.run_id, "metatrain.resume_count", str(count))
        return run

    def _clean_tags(self, tags: Mapping[str, Any]) -> dict[str, str]:
        return {_clean_key(k): _param_value(str(k), v, MAX_TAG_VALUE_LENGTH) for k, v in tags.items()}

    def _log_params_now(self, params: Mapping[str, Any], existing: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        new: list = []
        changed: dict[str, str] = {}
        for k, v in params.items():
            key = _clean_key(k)
            value = _param_value(key, v)
            if key not in existing:
                new.append(Param(key, value))
            elif existing[key] != value:
                changed[key] = value
                _warn(f"param {key!r} changed on resume ({_truncate(existing[key], 80)!r} -> "
                      f"{_truncate(value, 80)!r}); the run keeps the old value and records the new one in tag "
                      f"{CHANGED_PARAM_TAG}{key}")
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._run_id, params=new[i: i + MAX_PARAMS_TAGS_PER_BATCH])
        if changed:
            self._send_tags_now({f"{CHANGED_PARAM_TAG}{k}": v for k, v in changed.items()})

    def _send_tags_now(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in self._clean_tags(tags).items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._run_id, tags=items[i: i + MAX_PARAMS_TAGS_PER_BATCH])

    # ------------------------------------------------------------------ system metrics

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as e:  # psutil missing
            _warn(f"system metrics are off: {e} (pip install psutil)")
            return
        try:
            kw = {"sampling_interval": self.system_metrics_interval_s} if self.system_metrics_interval_s else {}
            mon = SystemMetricsMonitor(self._run_id, resume_logging=self.resumed or self._monitor is not None,
                                       tracking_uri=self.uri, **kw)
            if self.system_metrics_interval_s:
                # MLflow lets the environment variable win over the argument; an explicit argument should win.
                mon.sampling_interval = self.system_metrics_interval_s
            mon.start()
            self._monitor = mon
        except Exception as e:
            _warn(f"system metrics are off: could not start MLflow's monitor ({_one_line(e)})")

    def _revive_system_metrics(self) -> None:
        # MLflow's monitor thread exits for good on its first failed call to the store: after an outage, start a new
        # one that continues the step numbering.
        proc = getattr(self._monitor, "_process", None)
        if self._monitor is not None and self._started and not self._ended and proc is not None \
                and not proc.is_alive():
            self._start_system_metrics()

    # ------------------------------------------------------------------ metrics

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer ``metrics`` at ``step`` (sent in the background; never blocks on the store, never raises on it).

        Values are converted with ``float()`` (tensors and numpy scalars work); one that is not a number is
        skipped with a counted warning.
        """
        from mlflow.entities import Metric

        if not self._started or self._ended:
            raise RuntimeError("RunTracker.log_metrics() outside start() ... end()")
        ts = int(time.time() * 1000)
        step = int(step)
        entries = []
        for k, v in metrics.items():
            try:
                value = float(v)
            except (TypeError, ValueError):
                self._count_rejected(f"metric {k!r} at step {step} is not a number ({type(v).__name__})")
                continue
            entries.append(Metric(_clean_key(k), value, ts, step))
        with self._lock:
            for m in entries:
                self._buf.append(m)
            self._journal_locked(entries)
            self._trim_locked()

    def _trim_locked(self) -> None:
        over = len(self._buf) - self.max_buffer
        if over > 0:
            for _ in range(over):
                self._buf.popleft()
            self.dropped += over
            if not self._warned_full:
                self._warned_full = True
                _warn(f"MLflow metric buffer is full ({self.max_buffer} entries); dropping the oldest "
                      f"({self.dropped} so far)")

    def _count_rejected(self, what: str) -> None:
        with self._lock:
            self.rejected += 1
            first = not self._warned_rejected
            self._warned_rejected = True
        if first:
            _warn(f"{what}; skipped (later skips are counted and reported at the end)")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (redacted, truncated); sent with the next metric flush, kept and retried like metrics."""
        with self._lock:
            self._tags.update(self._clean_tags(tags))
        self._wake.set()

    def flush(self) -> bool:
        """Send everything buffered now, in this thread (ignoring the backoff). True if nothing is left pending."""
        if not self._started:
            return True
        return self._flush_pending()

    def _flush_pending(self) -> bool:
        from mlflow.entities import RunTag

        with self._send_lock:
            while True:
                with self._lock:
                    chunk = [self._buf.popleft() for _ in range(min(len(self._buf), MAX_METRICS_PER_BATCH))]
                if not chunk:
                    break
                try:
                    self._deliver(chunk, "metrics")
                except _Outage as o:
                    with self._lock:
                        self._buf.extendleft(reversed(chunk[o.handled:]))
                        self._trim_locked()
                    self._note_outage(o.error)
                    return False
            with self._lock:
                tags, self._tags = self._tags, {}
                if not self._buf:
                    self._cut_journal_locked()  # everything journaled so far is in the store
            items = [RunTag(k, v) for k, v in tags.items()]
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                try:
                    self._deliver(items[i: i + MAX_PARAMS_TAGS_PER_BATCH], "tags")
                except _Outage as o:
                    with self._lock:
                        for t in items[i + o.handled:]:
                            self._tags.setdefault(t.key, t.value)  # a newer set_tags value wins
                    self._note_outage(o.error)
                    return False
            self._note_recovered()
            return True

    def _deliver(self, items: list, kind: str, offset: int = 0, top: bool = True) -> None:
        """Send ``items`` in order; on a data error, split to isolate and skip the bad entries.

        Raises _Outage on any other error, with how many leading items were already handled.
        """
        try:
            if kind == "metrics":
                self._client.log_batch(self._run_id, metrics=items)
                with self._lock:
                    self.sent += len(items)
            else:
                self._client.log_batch(self._run_id, tags=items)
        except Exception as e:
            if not _is_data_error(e):
                raise _Outage(e, offset) from None
            if top and self._run_is_gone():
                raise _Outage(e, offset) from None
            if len(items) == 1:
                what = f"metric {items[0].key!r}={items[0].value!r} at step {items[0].step}" if kind == "metrics" \
                    else f"tag {items[0].key!r}"
                self._count_rejected(f"MLflow refused {what} ({_one_line(e, 160)})")
                return
            mid = len(items) // 2
            self._deliver(items[:mid], kind, offset, top=False)
            self._deliver(items[mid:], kind, offset + mid, top=False)

    def _run_is_gone(self) -> bool:
        # A deleted run answers INVALID_PARAMETER_VALUE to every write: not a bad metric, so do not split the batch
        # value by value (thousands of calls); keep it like in an outage instead.
        try:
            return self._client.get_run(self._run_id).info.lifecycle_stage != "active"
        except Exception:
            return True

    def _backoff(self, failures: int) -> float:
        return min(self.retry_cap_s, self.retry_base_s * 2 ** max(0, failures - 1))

    def _note_outage(self, error: BaseException) -> None:
        with self._lock:
            self._failures += 1
            self._retry_at = time.monotonic() + self._backoff(self._failures)
            first = self._outage_since is None
            if first:
                self._outage_since = time.monotonic()
                self._sent_before_outage = self.sent
            pending = len(self._buf)
        if first:
            _warn(f"MLflow tracking unavailable ({_one_line(error, 200)}); training continues, {pending} metrics "
                  f"buffered and retried")

    def _note_recovered(self) -> None:
        with self._lock:
            since = self._outage_since
            self._failures = 0
            self._retry_at = 0.0
            self._outage_since = None
            sent = self.sent - self._sent_before_outage
            dropped = self.dropped
        if since is not None:
            extra = f"; {dropped} oldest dropped while the buffer was full" if dropped else ""
            _warn(f"MLflow tracking recovered after {time.monotonic() - since:.0f} s; {sent} buffered metrics "
                  f"sent{extra}")
            self._revive_system_metrics()

    # ------------------------------------------------------------------ background thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                due = [j.next_at - now for j in self._jobs]
            self._wake.wait(timeout=max(0.01, min([self.flush_every_s, *due])))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if time.monotonic() >= self._retry_at:
                    self._flush_pending()
                self._run_jobs(final=False)
            except Exception as e:  # never let the sender die: a dead thread would lose every later metric
                self._note_outage(e)

    # ------------------------------------------------------------------ artifacts

    def _stage_dir(self) -> Path:
        if self._staging is None:
            # Inside spill_dir when there is one: same filesystem as the run's outputs, so staging a checkpoint is a
            # hard link, not a copy.
            root = None
            if self.spill_dir is not None:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                root = self.spill_dir
            self._staging = Path(tempfile.mkdtemp(prefix=".mlflow-staging-", dir=root))
        return Path(tempfile.mkdtemp(dir=self._staging))

    def _enqueue(self, job: _ArtifactJob) -> None:
        with self._lock:
            self._jobs.append(job)
        self._wake.set()

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or folder into the run (under ``artifact_path``) in the background.

        A hard link (or copy) is staged first, so the upload still works if the file is pruned or replaced
        meanwhile. A missing local file is the caller's bug and raises FileNotFoundError at once.
        """
        src = Path(local_path)
        if not src.exists():
            raise FileNotFoundError(f"artifact {src} does not exist")
        dst = self._stage_dir() / src.name
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)
        name = f"{artifact_path.rstrip('/')}/{src.name}" if artifact_path else src.name
        # A folder lands as <artifact_path>/<folder name>/..., like a file (log_artifacts uploads *contents*).
        self._enqueue(_ArtifactJob(name, dst, name if src.is_dir() else artifact_path, src.is_dir()))

    def _stage_file(self, artifact_file: str) -> tuple[Path, str | None]:
        parent, _, base = artifact_file.rstrip("/").rpartition("/")
        if not base:
            raise ValueError(f"artifact_file {artifact_file!r} must name a file")
        return self._stage_dir() / base, (parent or None)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """``obj`` as JSON (YAML for ``.yaml``/``.yml``, like MLflow) into the run at ``artifact_file``."""
        path, parent = self._stage_file(artifact_file)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(obj, default_flow_style=False, sort_keys=False))
        else:
            path.write_text(json.dumps(obj, indent=2, default=str))
        self._enqueue(_ArtifactJob(artifact_file, path, parent, False))

    def log_text(self, text: str, artifact_file: str) -> None:
        path, parent = self._stage_file(artifact_file)
        path.write_text(text, encoding="utf-8")
        self._enqueue(_ArtifactJob(artifact_file, path, parent, False))

    def log_figure(self, fig, artifact_file: str) -> None:
        """A matplotlib figure rendered now (so it may be closed right after) into the run at ``artifact_file``."""
        path, parent = self._stage_file(artifact_file)
        fig.savefig(path, dpi=120)
        self._enqueue(_ArtifactJob(artifact_file, path, parent, False))

    def _run_jobs(self, final: bool, last_chance: bool = False) -> None:
        """Upload due artifact jobs; with ``final`` wait out each job's backoff until it succeeds or gives up.

        ``last_chance`` (the store is down at ``end()``): one more attempt each, not a full series -- MLflow's HTTP
        client already retries every call for minutes.
        """
        if last_chance:
            with self._lock:
                for job in self._jobs:
                    job.attempts = max(job.attempts, self.artifact_attempts - 1)
                    job.next_at = 0.0
        while True:
            now = time.monotonic()
            with self._lock:
                due = [j for j in self._jobs if final or j.next_at <= now]
            if not due:
                return
            for job in due:
                if final and job.next_at > time.monotonic():
                    time.sleep(job.next_at - time.monotonic())
                try:
                    if job.is_dir:
                        self._client.log_artifacts(self._run_id, str(job.local), job.artifact_path)
                    else:
                        self._client.log_artifact(self._run_id, str(job.local), job.artifact_path)
                except Exception as e:
                    job.attempts += 1
                    job.last_error = _one_line(e, 200)
                    if job.attempts < self.artifact_attempts:
                        job.next_at = time.monotonic() + self._backoff(job.attempts)
                        continue
                    self._give_up(job)
                else:
                    _remove(job.local)
                with self._lock:
                    if job in self._jobs:
                        self._jobs.remove(job)
            if not final:
                return

    def _give_up(self, job: _ArtifactJob) -> None:
        keep = job.local
        if self.spill_dir is not None:
            target = self.spill_dir / "unuploaded" / job.name
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(job.local), target)
                keep = target
            except OSError:
                pass
        with self._lock:
            self._failed_artifacts.append(job.name)
        _warn(f"could not upload artifact {job.name} after {job.attempts} attempts ({job.last_error}); "
              f"local copy kept at {keep}")

    # ------------------------------------------------------------------ model

    def log_model(self, model, registered_name: str | None = None, **kw) -> str | None:
        """``mlflow.pytorch.log_model(model, name="model", ...)`` attached to this run; returns the model URI.

        ``registered_name`` also registers a model version. ``serialization_format`` defaults to ``"pt2"``
        (``torch.export``, no pickle) when an ``input_example`` is given and to ``"pickle"`` otherwise (pt2 needs
        an example to trace). Other keyword arguments go to ``mlflow.pytorch.log_model``. Retried like artifacts;
        if it still fails, warns, lists ``"model"`` among ``end()``'s failed artifacts and returns None.
        """
        import mlflow.pytorch

        kw.setdefault("name", "model")
        kw.setdefault("serialization_format", "pt2" if kw.get("input_example") is not None else "pickle")
        last = ""
        for attempt in range(1, self.artifact_attempts + 1):
            try:
                # Model.log reads the *global* tracking URI (for the logged-model record and the registry) and files
                # the model under the *active* experiment (else "Default", whose artifacts land in ./mlruns of the
                # current folder): point both at this run for the call, then put back whatever was there.
                with _mlflow_globals(self.uri, self.experiment_id):
                    info = mlflow.pytorch.log_model(model, registered_model_name=registered_name,
                                                    run_id=self.run_id, **kw)
                return info.model_uri
            except Exception as e:
                last = _one_line(e, 200)
                if attempt < self.artifact_attempts:
                    time.sleep(self._backoff(attempt))
        with self._lock:
            self._failed_artifacts.append(kw["name"])
        _warn(f"could not log the model to MLflow after {self.artifact_attempts} attempts ({last})")
        return None

    # ------------------------------------------------------------------ end

    def end(self, status: str = "FINISHED") -> list[str]:
        """Flush everything, stop system metrics, mark the run ``status``; returns artifacts that failed to upload.

        Idempotent. Never raises because of the store: if it is down, unsent metrics are written to
        ``spill_dir/unsent-metrics-<run_id>.jsonl`` (or reported as lost when there is no spill_dir) and the
        failure to set the status is warned about.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}, not {status!r}")
        if not self._started or self._ended:
            return list(self._failed_artifacts)
        self._ended = True
        try:
            atexit.unregister(self._atexit)
        except Exception:
            pass
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:
                _warn(f"stopping MLflow system metrics failed ({_one_line(e)})")
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        down = self._outage_since is not None
        # In an outage MLflow's HTTP client would retry every call for ~4 minutes (7 retries, doubling backoff):
        # at the end of a run that only delays the exit. Then: one quick attempt per call, and spill the rest.
        with _quick_http(down):
            rounds = 1 if down else 3
            for i in range(rounds):
                if self._flush_pending():
                    break
                if i + 1 < rounds:
                    time.sleep(self._backoff(i + 1))
            down = self._outage_since is not None
            self._run_jobs(final=True, last_chance=down)
            self._spill_unsent()
            self._close_journal()  # what it held is now in the store or in the spill file
            if self.rejected:
                _warn(f"{self.rejected} metric or tag values were skipped in run {self._run_id}")
            attempts = 1 if down else 3
            for attempt in range(1, attempts + 1):
                try:
                    self._client.set_terminated(self._run_id, status=status)
                    break
                except Exception as e:
                    if attempt == attempts:
                        _warn(f"could not mark MLflow run {self._run_id} {status} ({_one_line(e, 200)}); it may "
                              "show RUNNING until the store is back (then: mlflow runs set-terminated ...)")
                    else:
                        time.sleep(self._backoff(attempt))
        if self._staging is not None and not (self._failed_artifacts and self.spill_dir is None):
            shutil.rmtree(self._staging, ignore_errors=True)
        return list(self._failed_artifacts)

    def _spill_unsent(self) -> None:
        with self._lock:
            unsent, self._buf = list(self._buf), deque()
            tags, self._tags = self._tags, {}
        if not unsent and not tags:
            return
        what = f"{len(unsent)} metrics" + (f" and {len(tags)} tags" if tags else "")
        if self.spill_dir is None:
            _warn(f"{what} could not be sent to MLflow run {self._run_id} and are lost (no spill folder)")
            return
        path = self._spill_path()
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(_metric_line(m) for m in unsent))
                for k, v in tags.items():
                    f.write(json.dumps({"tag": k, "value": v}) + "\n")
            _warn(f"{what} could not be sent to MLflow run {self._run_id}; saved to {path}")
        except OSError as e:
            _warn(f"{what} could not be sent to MLflow run {self._run_id} nor saved to {path} ({e})")

    def _spill_path(self) -> Path | None:
        return self.spill_dir / f"unsent-metrics-{self._run_id}.jsonl" if self.spill_dir is not None else None

    def _replay_spill(self) -> None:
        """On resume: queue what an earlier ``end()`` could not send (its spill file), ahead of new metrics."""
        path = self._spill_path()
        if path is None or not path.is_file():
            return
        tags: dict = {}
        metrics = _read_metric_lines(path, tags)
        with self._lock:
            self._buf.extend(metrics)
            self._journal_locked(metrics)
            self._trim_locked()
            for k, v in tags.items():
                self._tags.setdefault(k, v)
        # Renamed, not deleted: if this run dies before sending them, end() spills them again; the old file stays
        # for inspection until the next replay overwrites it.
        path.replace(path.with_name(path.name + ".replayed"))
        _warn(f"resending {len(metrics)} metrics that an earlier session could not send (from {path})")

    # ------------------------------------------------------------------ write-ahead journal

    def _journal_path(self) -> Path | None:
        return self.spill_dir / f"journal-{self._run_id}.jsonl" if self.spill_dir is not None else None

    def _open_journal(self) -> None:
        """Start this session's journal; a killed session's journal is kept aside for ``replay_journal``."""
        path = self._journal_path()
        if path is None:
            return
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                self._journal_backlog = _read_metric_lines(path)
                path.replace(path.with_name(path.name + ".replayed"))  # kept for inspection, not read again
            self._journal = open(path, "w", encoding="utf-8")
        except OSError as e:
            self._journal = None
            _warn(f"cannot write the metric journal {path} ({e}); metrics buffered when this process is killed "
                  "would be lost")

    def _journal_locked(self, entries: list) -> None:
        if self._journal is None or not entries:
            return
        try:
            # One write per call, flushed to the OS: a killed process loses nothing written (a crashed machine
            # may lose the page cache's last seconds, as any log does without fsync).
            self._journal.write("".join(_metric_line(m) for m in entries))
            self._journal.flush()
        except (OSError, ValueError) as e:
            self._journal = None
            _warn(f"writing the metric journal failed ({e}); continuing without it")

    def _cut_journal_locked(self) -> None:
        if self._journal is None or self._journal.tell() == 0:
            return
        try:
            self._journal.seek(0)
            self._journal.truncate()
        except (OSError, ValueError) as e:
            self._journal = None
            _warn(f"cutting the metric journal failed ({e}); continuing without it")

    def _close_journal(self) -> None:
        with self._lock:
            journal, self._journal = self._journal, None
        if journal is not None:
            journal.close()
            try:
                Path(journal.name).unlink()
            except OSError:
                pass

    def replay_journal(self) -> int:
        """Resend what a killed session had logged but not delivered (its journal); returns how many entries.

        Entries the store already holds (same key, step and timestamp) are skipped, so nothing is logged twice. A
        resumed trainer then logs only the steps after :meth:`last_step`, which counts the replayed entries.
        """
        backlog, self._journal_backlog = self._journal_backlog, []
        for m in backlog:  # in the store already or about to be: last_step() counts them as logged
            self._replayed_steps[m.key] = max(self._replayed_steps.get(m.key, 0), m.step)
        if not backlog:
            return 0
        have: set = set()
        try:
            for key in {m.key for m in backlog}:
                have |= {(key, h.step, h.timestamp) for h in self._client.get_metric_history(self._run_id, key)}
        except Exception as e:
            _warn(f"cannot read run {self._run_id}'s metrics to replay the journal ({_one_line(e)}); resending all "
                  f"{len(backlog)} journaled metrics")
            have = set()
        missing = [m for m in backlog if (m.key, m.step, m.timestamp) not in have]
        with self._lock:
            self._buf.extendleft(reversed(missing))  # ahead of this session's metrics, in their order
            self._journal_locked(missing)
            self._trim_locked()
        if missing:
            _warn(f"resending {len(missing)} metrics that a killed session logged but had not sent")
            self._wake.set()
        return len(missing)

    def last_step(self, *keys: str) -> int:
        """The highest step at which this run holds any of ``keys``, in the store or in a journal that
        :meth:`replay_journal` is sending (0 if none): a resumed trainer logs only later steps, so the steps it
        redoes after its checkpoint do not reach the run twice."""
        best = max((self._replayed_steps.get(k, 0) for k in keys), default=0)
        try:
            for key in keys:
                best = max([best, *(h.step for h in self._client.get_metric_history(self._run_id, key))])
        except Exception as e:
            _warn(f"cannot read run {self._run_id}'s {', '.join(keys)} history ({_one_line(e)}); steps redone "
                  "after the checkpoint may be logged twice")
        return best

    def _atexit(self) -> None:
        if self._started and not self._ended:
            self.set_tags({"error": "the process exited without ending the run"})
            self.end("KILLED")

    def __enter__(self) -> RunTracker:
        if not self._started:
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None or (issubclass(exc_type, SystemExit) and exc.code in (None, 0)):
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.set_tags({"error": _one_line(exc, 500)})
            self.end("FAILED")
        return False  # re-raise


class _quick_http:
    """While ``on``: MLflow HTTP calls make no retries and time out after 10 s (environment variables MLflow reads
    per call; restored on exit). Used only at ``end()`` once the store is known to be down, after the background
    threads of this tracker have stopped."""

    _VARS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

    def __init__(self, on: bool):
        self.on = on
        self.saved: dict[str, str | None] = {}

    def __enter__(self):
        if self.on:
            for k, v in self._VARS.items():
                self.saved[k] = os.environ.get(k)
                os.environ[k] = v
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return False


def _link_or_copy(src, dst) -> str:
    # A hard link is instant and survives the original being deleted (pruned checkpoints) or atomically replaced.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return str(dst)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


class _mlflow_globals:
    """Temporarily point MLflow's global tracking URI and active experiment at this run's, then restore them.

    Restores the ``$MLFLOW_TRACKING_URI`` variable too (mlflow's own ``_use_tracking_uri`` unsets it on the way out
    if the URI came from it). ``_active_experiment_id`` is a module global of ``mlflow.tracking.fluent`` (what
    ``mlflow.set_experiment`` sets); going through ``set_experiment`` instead would also rewrite the environment.
    """

    _lock = threading.Lock()

    def __init__(self, uri: str, experiment_id: str | None):
        self.uri = uri
        self.experiment_id = experiment_id

    def __enter__(self):
        import mlflow
        from mlflow.tracking import fluent
        from mlflow.tracking._tracking_service import utils

        self._lock.acquire()
        self._old = getattr(utils, "_tracking_uri", None)
        self._old_env = os.environ.get("MLFLOW_TRACKING_URI")
        self._old_exp = getattr(fluent, "_active_experiment_id", None)
        mlflow.set_tracking_uri(self.uri)
        if self.experiment_id is not None:
            fluent._active_experiment_id = self.experiment_id
        return self

    def __exit__(self, *exc):
        import mlflow
        from mlflow.tracking import fluent

        try:
            fluent._active_experiment_id = self._old_exp
            mlflow.set_tracking_uri(self._old)
            if self._old_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = self._old_env
        finally:
            self._lock.release()
        return False


# --------------------------------------------------------------------------------------------------- plots


def learning_curve_figure(history: list[dict]):
    """Train loss (left) and train/val accuracy (right) against step, as a matplotlib Figure.

    ``history`` is a list of ``{"step": int, "train/loss": ..., "train/acc": ..., "val/acc": ...}``; missing keys
    (validation runs only every N steps) are skipped. Built on ``matplotlib.figure.Figure`` directly: no pyplot,
    no global backend switch, no display needed, and nothing to close.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)

    def series(key: str):
        pts = [(h["step"], float(h[key])) for h in history if "step" in h and h.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    for ax, keys, ylabel in ((ax_loss, ("train/loss",), "loss"), (ax_acc, ("train/acc", "val/acc"), "accuracy")):
        for key in keys:
            xs, ys = series(key)
            if xs:
                ax.plot(xs, ys, label=key, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(loc="best")
    ax_loss.set_title("training loss")
    ax_acc.set_title("accuracy")
    return fig
