"""MLflow tracking: terminal statuses, redaction, metrics through a store outage, resume, system metrics, models."""

from __future__ import annotations

import http.server
import json
import math
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from metatrain.tasks.errors import MetatrainError
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient

from metatrain.pipeline.figures import learning_curve_figure
from metatrain.pipeline.tracking import (
    CHANGED_PARAM_TAG,
    MAX_PARAM_VALUE_LENGTH,
    RunTracker,
    TrackingError,
    check_tracking,
    default_artifact_root,
    flatten_config,
    redact_uri,
    resolve_tracking_uri,
)

SECRET = "hunter2-s3cr3t"


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite database, made once: creating the schema costs ~1 s per store."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)
    return path


@pytest.fixture
def uri(tmp_path, empty_store) -> str:
    # Every test gets its own store (a copy of the empty one), so no test sees another's runs.
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


def tracker(uri: str, **kw) -> RunTracker:
    # Tests other than the system-metrics one leave the monitor off: it is a thread doing store calls of its own.
    kw.setdefault("system_metrics", False)
    return RunTracker(uri, **kw)


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def wait_for(predicate, timeout: float = 20.0, every: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


class Store:
    """The SQLite store's ``log_batch``, failing on demand: ``down`` is the error every call raises (None: up),
    ``refuse`` a predicate on a metric that makes a call fail as a store refusing that value would."""

    def __init__(self):
        self.down: BaseException | None = None
        self.refuse = None
        self.calls = 0


@pytest.fixture
def store(monkeypatch) -> Store:
    # Patched on the class before the test's store exists: MLflow's async queue binds the store's log_batch when
    # the store is made, so both its background sends and synchronous calls go through this.
    state, real = Store(), SqlAlchemyStore.log_batch

    def log_batch(self, run_id, metrics, params, tags):
        state.calls += 1
        if state.down is not None:
            raise state.down
        if state.refuse and any(state.refuse(m) for m in metrics):
            raise MlflowException("Got invalid value for metric", error_code=INVALID_PARAMETER_VALUE)
        return real(self, run_id, metrics, params, tags)

    monkeypatch.setattr(SqlAlchemyStore, "log_batch", log_batch)
    return state


# --------------------------------------------------------------------------------------------------- URIs/config


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("http://cli:5000", tmp_path) == "http://cli:5000"
    assert resolve_tracking_uri(None, tmp_path / "out") == f"sqlite:///{(tmp_path / 'out').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://env:5000"
    assert resolve_tracking_uri("http://cli:5000", tmp_path) == "http://cli:5000"
    monkeypatch.chdir(tmp_path)
    assert default_artifact_root("out") == str(tmp_path.resolve() / "out" / "mlartifacts")


def test_redact_uri():
    assert redact_uri(f"http://user:{SECRET}@host:5000/x") == "http://user:***@host:5000/x"
    assert redact_uri(f"postgresql://ml:{SECRET}@db:5432/mlflow") == "postgresql://ml:***@db:5432/mlflow"
    assert redact_uri(f"mysql+pymysql://u:p@ss{SECRET}@db/ml") == "mysql+pymysql://u:***@db/ml"
    assert redact_uri(f"https://h/api?token={SECRET}&run=3&api_key=k1") == "https://h/api?token=***&run=3&api_key=***"
    assert redact_uri("http://host:5000/path") == "http://host:5000/path"
    assert redact_uri("http://user@host/") == "http://user@host/"
    assert redact_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert redact_uri(f"error talking to http://a:{SECRET}@h (refused)") == "error talking to http://a:***@h (refused)"


def test_flatten_config_values_secrets_and_length_limit():
    cfg = {
        "train": {"steps": 1000, "lr": 0.001, "amp": True, "resume": None},
        "model": {"hidden": [64, 64], "tokenizer": "chars", "max_tokens": 5, "extra": {}},
        "tracking": {"uri": f"http://alice:{SECRET}@mlflow:5000", "password": SECRET, "api_key": SECRET,
                     "hf_token": SECRET, "dbs": [{"url": "x", "password": SECRET}]},
        "notes": "x" * 10_000,
    }
    p = flatten_config(cfg)
    assert p["train.steps"] == "1000" and p["train.lr"] == "0.001" and p["train.amp"] == "true"
    assert p["train.resume"] == "null" and p["model.hidden"] == "[64, 64]" and p["model.extra"] == "{}"
    assert p["model.tokenizer"] == "chars" and p["model.max_tokens"] == "5"  # not secrets
    assert p["tracking.uri"] == "http://alice:***@mlflow:5000"
    assert p["tracking.password"] == p["tracking.api_key"] == p["tracking.hf_token"] == "***"
    assert json.loads(p["tracking.dbs"]) == [{"url": "x", "password": "***"}]
    assert len(p["notes"]) == MAX_PARAM_VALUE_LENGTH and p["notes"].endswith("[truncated from 10000 chars]")
    assert all(SECRET not in v for v in p.values())
    assert flatten_config({"a": {"b": 1}}, prefix="cfg") == {"cfg.a.b": "1"}


# --------------------------------------------------------------------------------------------------- statuses


def test_finished_run_with_redacted_params_and_tags(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written relative to the cwd would show up here
    cfg = {"train": {"steps": 3}, "tracking": {"uri": f"http://bob:{SECRET}@srv:5000", "password": SECRET}}
    with RunTracker(uri, experiment="exp-a", run_name="r1").start(
            flatten_config(cfg), tags={"tracking_uri": f"https://bob:{SECRET}@srv/?token={SECRET}",
                                       "db_password": SECRET}) as t:
        t.log_metrics({"train/loss": 0.5}, step=0)
        assert MlflowClient(uri).get_run(t.run_id).info.status == "RUNNING"
    run = MlflowClient(uri).get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["train.steps"] == "3"
    assert run.data.params["tracking.uri"] == "http://bob:***@srv:5000"
    assert run.data.tags["tracking_uri"] == "https://bob:***@srv/?token=***"
    everything = json.dumps([run.data.params, run.data.tags])
    assert SECRET not in everything
    exp = MlflowClient(uri).get_experiment(run.info.experiment_id)
    assert exp.name == "exp-a" and exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert history(uri, t.run_id, "train/loss") == [(0, 0.5)]
    assert not (tmp_path / "mlruns").exists()


def test_exception_marks_run_failed_with_error_tag(uri):
    t = tracker(uri)
    with pytest.raises(ValueError, match="bad batch"):
        with t.start({"a": "1"}):
            t.log_metrics({"train/loss": 1.0}, step=0)
            raise ValueError(f"bad batch\nfrom http://u:{SECRET}@h")
    run = MlflowClient(uri).get_run(t.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "ValueError: bad batch from http://u:***@h"
    assert history(uri, t.run_id, "train/loss") == [(0, 1.0)]  # flushed before terminating


def test_keyboard_interrupt_marks_run_killed(uri):
    t = tracker(uri)
    with pytest.raises(KeyboardInterrupt):
        with t.start():
            raise KeyboardInterrupt
    assert MlflowClient(uri).get_run(t.run_id).info.status == "KILLED"
    assert t.end() == []  # idempotent


def test_forgotten_run_is_killed_at_exit(uri):
    t = tracker(uri).start()
    t._atexit()  # what the interpreter runs at exit for a run nobody ended
    run = MlflowClient(uri).get_run(t.run_id)
    assert run.info.status == "KILLED" and "without ending" in run.data.tags["error"]


# --------------------------------------------------------------------------------------------------- outages


@pytest.mark.parametrize("error", [
    MlflowException("503 Service Unavailable", error_code=TEMPORARILY_UNAVAILABLE),
    ConnectionError("Connection refused"),
], ids=["mlflow-503", "connection-refused"])
def test_metrics_survive_a_store_outage_each_step_once(store, uri, capsys, error):
    t = tracker(uri).start()
    journal = t.spill_dir / f"journal-{t.run_id}.jsonl"
    for step in range(5):
        t.log_metrics({"train/loss": 1.0 / (step + 1), "train/acc": step / 600}, step=step)
    assert t.flush() is True and journal.read_text() == ""  # all delivered: the journal is cut
    store.down = error
    for step in range(5, 600):  # 1190 entries: more than one log_batch of 1000 when resent
        t.log_metrics({"train/loss": 1.0 / (step + 1), "train/acc": step / 600}, step=step)
    assert t.flush() is False and t.flush() is False  # outage: kept in the journal, not raised
    assert len(journal.read_text().splitlines()) == 1190
    store.down = None
    t.log_metrics({"train/loss": 1.0 / 601, "train/acc": 1.0}, step=600)
    assert t.flush() is True and journal.read_text() == ""
    t.end()
    err = capsys.readouterr().err
    assert err.count("MLflow tracking unavailable") == 1, err
    assert err.count("MLflow tracking recovered") == 1
    # The 1190 of the outage, and step 600's two if the flush came before MLflow's queue sent them.
    assert int(re.search(r"(\d+) buffered metrics sent", err).group(1)) in (1190, 1192)
    assert history(uri, t.run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(601)]  # every step once
    assert len(history(uri, t.run_id, "train/acc")) == 601
    assert MlflowClient(uri).get_run(t.run_id).info.status == "FINISHED"


def test_mlflow_sends_in_the_background_without_being_asked(uri):
    t = tracker(uri).start()
    for step in range(5):
        t.log_metrics({"m": float(step)}, step=step)
    assert wait_for(lambda: len(history(uri, t.run_id, "m")) == 5, timeout=15)
    t.end()


def test_a_batch_mlflow_failed_to_deliver_is_resent_from_the_journal(store, uri, capsys):
    t = tracker(uri).start()
    store.down = MlflowException("boom", error_code=INTERNAL_ERROR)
    t.log_metrics({"m": 0.0}, step=0)
    assert wait_for(lambda: store.calls >= 1)  # MLflow's queue tried, and failed
    store.down = None
    t.log_metrics({"m": 1.0}, step=1)
    assert t.flush() is True
    t.end()
    assert history(uri, t.run_id, "m") == [(0, 0.0), (1, 1.0)]
    assert "MLflow tracking unavailable" not in capsys.readouterr().err  # one failed batch is not an outage


def test_log_metrics_flushes_by_itself_so_the_journal_stays_short(uri):
    t = tracker(uri).start()
    t.MAX_PENDING = 10
    for step in range(25):
        t.log_metrics({"m": float(step)}, step=step)
    assert len((t.spill_dir / f"journal-{t.run_id}.jsonl").read_text().splitlines()) <= 10
    t.end()
    assert [s for s, _ in history(uri, t.run_id, "m")] == list(range(25))


def test_non_finite_values_logged_as_the_store_accepts_them(uri):
    t = tracker(uri).start()
    t.log_metrics({"m": float("nan")}, step=0)
    t.log_metrics({"m": float("inf")}, step=1)
    t.log_metrics({"m": torch.tensor(2.5)}, step=2)
    t.end()
    values = dict(history(uri, t.run_id, "m"))
    assert math.isnan(values[0]) and values[1] > 1e308 and values[2] == 2.5  # SQLite stores inf as max float


def test_values_a_store_refuses_are_skipped_and_counted(store, uri, capsys):
    store.refuse = lambda m: not math.isfinite(m.value)  # as some servers do with NaN
    t = tracker(uri).start()
    for step in range(8):
        t.log_metrics({"m": float("nan") if step in (2, 5) else float(step)}, step=step)
    t.log_metrics({"n": "not a number"}, step=8)
    assert t.flush() is True
    t.end()
    assert [s for s, _ in history(uri, t.run_id, "m")] == [0, 1, 3, 4, 6, 7]
    assert t.rejected == 3
    err = capsys.readouterr().err
    assert "not a number" in err and "3 metric or tag values were skipped" in err
    assert "MLflow tracking unavailable" not in err  # a bad value is not an outage


def test_end_while_store_is_down_keeps_the_journal_for_resume(store, uri, tmp_path, capsys):
    t = tracker(uri, spill_dir=tmp_path / "spill").start()
    store.down = ConnectionError("down")
    for step in range(3):
        t.log_metrics({"m": float(step)}, step=step)
    t.end()
    journal = tmp_path / "spill" / f"journal-{t.run_id}.jsonl"
    assert [json.loads(x)["step"] for x in journal.read_text().splitlines()] == [0, 1, 2]
    assert MlflowClient(uri).get_run(t.run_id).info.status == "FINISHED"  # set_terminated still went through
    assert "saved to" in capsys.readouterr().err
    store.down = None
    # The next session resumes the run with the same spill folder: the journaled metrics go first, then new ones.
    again = tracker(uri, run_id=t.run_id, spill_dir=tmp_path / "spill").start()
    assert again.replay_journal() == 3
    again.log_metrics({"m": 3.0}, step=3)
    again.end()
    assert history(uri, t.run_id, "m") == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]
    assert not journal.exists()
    assert "resending 3 metrics" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- resume


def test_resume_continues_the_same_run(uri, monkeypatch, capsys):
    first = tracker(uri)
    with pytest.raises(KeyboardInterrupt):
        with first.start({"a": "1", "b": "2"}):
            for step in range(5):
                first.log_metrics({"train/loss": float(step)}, step=step)
            raise KeyboardInterrupt
    run_id = first.run_id
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"

    logged_params: list = []
    real = MlflowClient.log_batch

    def spy(self, run_id, metrics=(), params=(), tags=(), *a, **kw):
        logged_params.extend(p.key for p in params or [])
        return real(self, run_id, metrics, params, tags, *a, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", spy)
    second = tracker(uri, run_id=run_id).start({"a": "1", "b": "3", "c": "4"})
    assert second.run_id == run_id and second.resumed
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
    for step in range(5, 10):
        second.log_metrics({"train/loss": float(step)}, step=step)
    second.end()
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert history(uri, run_id, "train/loss") == [(s, float(s)) for s in range(10)]
    assert run.data.params == {"a": "1", "b": "2", "c": "4"}  # params are immutable: the first value stays
    assert run.data.tags[f"{CHANGED_PARAM_TAG}b"] == "3" and run.data.tags["metatrain.resume_count"] == "1"
    assert logged_params == ["c"]  # "a" (same value) not re-logged, "b" (changed) went to a tag
    assert "param 'b' changed on resume" in capsys.readouterr().err


KILLED_SESSION = """
import os, signal, sys
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from metatrain.pipeline.tracking import RunTracker
real, down = SqlAlchemyStore.log_batch, []
def log_batch(self, *a, **k):
    if down:
        raise ConnectionError("store down")
    return real(self, *a, **k)
SqlAlchemyStore.log_batch = log_batch  # before the store exists: MLflow's async queue binds it
t = RunTracker(sys.argv[1], spill_dir=sys.argv[2], system_metrics=False).start()
for step in range(5):
    t.log_metrics({"train/loss": float(step), "train/acc": step / 10}, step=step)
t.flush()  # steps 0-4 reach the store
down.append(True)
for step in range(5, 10):
    t.log_metrics({"train/loss": float(step), "train/acc": step / 10}, step=step)
print(t.run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # steps 5-9 are only in the journal
"""


def test_metrics_of_a_killed_process_are_replayed_once_on_resume(uri, tmp_path, capsys):
    import subprocess
    import sys

    spill = tmp_path / "spill"
    proc = subprocess.run([sys.executable, "-c", KILLED_SESSION, uri, str(spill)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == -9, proc.stderr
    run_id = proc.stdout.strip()
    assert history(uri, run_id, "train/loss") == [(s, float(s)) for s in range(5)]  # 5-9 never got there
    journal = spill / f"journal-{run_id}.jsonl"
    assert sorted({json.loads(x)["step"] for x in journal.read_text().splitlines()}) == [5, 6, 7, 8, 9]

    again = tracker(uri, run_id=run_id, spill_dir=spill).start()
    assert again.replay_journal() == 10  # steps 5-9 x 2 metrics
    assert again.replay_journal() == 0  # a second call has nothing left to send
    # A resumed trainer redoes the steps after its checkpoint (say 7) but logs only those after the run's last one.
    assert again.last_step("train/loss") == 9
    for step in range(10, 12):
        again.log_metrics({"train/loss": float(step), "train/acc": step / 10}, step=step)
    assert again.flush()
    assert journal.read_text() == ""  # cut once everything it held reached the store
    again.end()
    assert history(uri, run_id, "train/loss") == [(s, float(s)) for s in range(12)]  # each step exactly once
    assert history(uri, run_id, "train/acc") == [(s, s / 10) for s in range(12)]
    assert not journal.exists()
    assert "resending 10 metrics that an earlier session" in capsys.readouterr().err


def test_journal_replay_skips_what_the_store_already_has(uri, tmp_path):
    # A session killed after a flush that sent everything, but before the journal was cut: nothing is resent.
    t = tracker(uri, spill_dir=tmp_path / "spill").start()
    for step in range(4):
        t.log_metrics({"m": float(step)}, step=step)
    path = tmp_path / "spill" / f"journal-{t.run_id}.jsonl"
    kept = path.read_text()
    assert t.flush() and path.read_text() == ""
    t.end()
    assert not path.exists()
    path.write_text(kept)  # as if the process had died between the send and the cut
    again = tracker(uri, run_id=t.run_id, spill_dir=tmp_path / "spill").start()
    assert again.replay_journal() == 0
    again.end()
    assert history(uri, t.run_id, "m") == [(s, float(s)) for s in range(4)]


def test_last_step_counts_the_store_and_the_replayed_journal(uri, tmp_path):
    from mlflow.entities import Metric

    from metatrain.pipeline.tracking.run import _line

    t = tracker(uri, spill_dir=tmp_path / "spill").start()
    for step in range(1, 4):
        t.log_metrics({"time/step_s": 0.5, "val/loss": 1.0 / step}, step=step)
    t.end()
    # A killed session's journal holding steps 4 and 5, which never reached the store.
    journal = tmp_path / "spill" / f"journal-{t.run_id}.jsonl"
    journal.write_text("".join(_line(Metric("time/step_s", 0.5, 1_700_000_000_000 + s, s)) for s in (4, 5)))
    again = tracker(uri, run_id=t.run_id, spill_dir=tmp_path / "spill").start()
    assert again.last_step("time/step_s") == 3  # the store's: the journal counts once replay_journal sent it
    assert again.replay_journal() == 2
    assert again.last_step("time/step_s") == 5 and again.last_step("val/loss") == 3
    assert again.last_step("nothing/here") == 0
    again.end()
    assert sorted(s for s, _ in history(uri, t.run_id, "time/step_s")) == [1, 2, 3, 4, 5]


def test_unknown_run_id_is_a_tracking_error(uri):
    with pytest.raises(TrackingError) as ei:
        tracker(uri, run_id="0123456789abcdef0123456789abcdef").start()
    assert str(ei.value) == f"unknown MLflow run 0123456789abcdef0123456789abcdef in {uri}"


def test_failed_start_does_not_leave_a_running_run(uri, monkeypatch):
    def refuse(self, run_id, metrics=(), params=(), tags=(), *a, **kw):
        raise MlflowException("params table is read-only", error_code=INTERNAL_ERROR)

    monkeypatch.setattr(MlflowClient, "log_batch", refuse)
    with pytest.raises(TrackingError, match=r"could not start an MLflow run in sqlite:///.*read-only"):
        tracker(uri, experiment="e").start({"a": "1"})
    monkeypatch.undo()
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("e").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


# --------------------------------------------------------------------------------------------------- check_tracking


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_tracking_unreachable_server_fails_fast_without_leaking_password():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(TrackingError) as ei:
        check_tracking(f"http://admin:{SECRET}@127.0.0.1:{port}", timeout_s=3.0)
    assert time.monotonic() - start < 10
    msg = str(ei.value)
    assert msg.startswith(f"MLflow tracking server at http://admin:***@127.0.0.1:{port} is unreachable (")
    assert msg.endswith("start it or pass --tracking-uri") and SECRET not in msg
    assert isinstance(ei.value, MetatrainError)


@pytest.fixture
def http_server():
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 -- http.server's naming
            seen.append((self.path, self.headers.get("Authorization")))
            code = 200 if self.path == "/health" else 404
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_check_tracking_http_health(http_server):
    host, seen = http_server
    check_tracking(f"http://u:{SECRET}@{host}")  # /health answers 200
    assert seen[-1][0] == "/health" and seen[-1][1].startswith("Basic ")
    with pytest.raises(TrackingError, match=r"answered HTTP 404 on /health: not an MLflow tracking server"):
        check_tracking(f"http://{host}/prefix")


def test_check_tracking_local_stores(tmp_path):
    check_tracking(f"sqlite:///{tmp_path}/new/sub/mlflow.db")
    assert (tmp_path / "new" / "sub").is_dir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TrackingError, match="cannot create folder"):
        check_tracking(f"sqlite:///{tmp_path}/afile/mlflow.db")
    (tmp_path / "notdb.db").write_text("this is not sqlite")
    with pytest.raises(TrackingError, match=r"notdb.db is unusable \(.*file is not a database"):
        check_tracking(f"sqlite:///{tmp_path}/notdb.db")
    with pytest.raises(TrackingError, match="unusable"):
        check_tracking("nosuchscheme://x/y", timeout_s=5)


# --------------------------------------------------------------------------------------------------- system metrics


def test_system_metrics_are_sampled(uri):
    t = RunTracker(uri, system_metrics=True, system_metrics_interval_s=1.0).start()
    try:
        # Poll rather than sleep a fixed time: the first sample lands after one interval on an idle machine, later
        # on a loaded one.
        keys = wait_for(lambda: [k for k in MlflowClient(uri).get_run(t.run_id).data.metrics
                                 if k.startswith("system/")], timeout=30, every=0.25)
    finally:
        t.end()
    assert "system/cpu_utilization_percentage" in keys
    assert "system/system_memory_usage_megabytes" in keys


# --------------------------------------------------------------------------------------------------- artifacts/model


def test_artifacts_upload_in_background_even_if_the_source_is_gone(uri, tmp_path):
    t = tracker(uri).start()
    src = tmp_path / "ckpt-00000001.pt"
    src.write_bytes(b"weights")
    t.log_artifact(src, "checkpoints")
    src.unlink()  # pruned right after logging: the staged copy still uploads
    (tmp_path / "notes.txt").write_text("hello")
    t.log_artifact(tmp_path / "notes.txt")
    folder = tmp_path / "samples"
    (folder / "deep").mkdir(parents=True)
    (folder / "deep" / "a.txt").write_text("a")
    t.log_artifact(folder, "episodes")
    learning_curve_figure([{"step": 0, "train/loss": 1.0}, {"step": 1, "train/loss": 0.5}]).savefig(
        tmp_path / "curve.png")
    t.log_artifact(tmp_path / "curve.png", "plots")
    assert t.end() == []
    c = MlflowClient(uri)
    files = {a.path for d in ("", "checkpoints", "plots", "episodes/samples/deep")
             for a in c.list_artifacts(t.run_id, d or None)}
    assert {"checkpoints/ckpt-00000001.pt", "notes.txt", "plots/curve.png", "episodes/samples/deep/a.txt"} <= files
    assert Path(c.download_artifacts(t.run_id, "checkpoints/ckpt-00000001.pt", str(tmp_path))).read_bytes() == \
        b"weights"
    assert Path(c.download_artifacts(t.run_id, "plots/curve.png", str(tmp_path))).read_bytes()[:4] == b"\x89PNG"


def test_a_failed_upload_is_kept_and_reported(uri, tmp_path, monkeypatch, capsys):
    t = tracker(uri, spill_dir=tmp_path / "spill").start()
    real = t.client.log_artifact

    def upload(run_id, local_path, artifact_path=None):
        if Path(local_path).name == "never.txt":
            raise ConnectionError("artifact store down")
        return real(run_id, local_path, artifact_path)

    monkeypatch.setattr(t.client, "log_artifact", upload)
    for name, text in (("fine.txt", "ok"), ("never.txt", "lost?")):
        (tmp_path / name).write_text(text)
        t.log_artifact(tmp_path / name, "sub" if name == "never.txt" else None)
    failed = t.end()
    assert failed == ["sub/never.txt"]
    assert [a.path for a in MlflowClient(uri).list_artifacts(t.run_id)] == ["fine.txt"]
    assert (tmp_path / "never.txt").read_text() == "lost?"  # the local file is the copy: never moved or removed
    assert list((tmp_path / "spill").iterdir()) == []  # the journal, all delivered, is gone
    err = capsys.readouterr().err
    assert (f"could not upload artifact sub/never.txt (ConnectionError: artifact store down); it stays at "
            f"{(tmp_path / 'never.txt').resolve()}") in err
    assert MlflowClient(uri).get_run(t.run_id).info.status == "FINISHED"


def test_learning_curve_figure_skips_missing_keys():
    hist = [{"step": 0, "train/loss": 2.0, "train/acc": 0.2},
            {"step": 10, "train/loss": 1.0, "train/acc": 0.5, "val/acc": 0.4},
            {"step": 20, "train/loss": 0.5}]
    fig = learning_curve_figure(hist)
    loss_ax, acc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["train/loss"]
    assert [line.get_label() for line in acc_ax.lines] == ["train/acc", "val/acc"]
    assert list(acc_ax.lines[1].get_xdata()) == [10] and list(loss_ax.lines[0].get_ydata()) == [2.0, 1.0, 0.5]
    assert len(learning_curve_figure([]).axes[0].lines) == 0
