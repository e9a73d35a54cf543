"""Which MLflow store a run uses, and whether it can be used, found out before any training."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from metatrain.tasks.errors import MetatrainError

from metatrain.pipeline.tracking.redact import one_line, redact_uri


class TrackingError(MetatrainError):
    """The MLflow store is unusable (unreachable server, unwritable folder) or a run id is unknown."""


def explicit_tracking_uri(cli_uri: str | None) -> str | None:
    """``--tracking-uri`` if given, else ``$MLFLOW_TRACKING_URI``, else None (no store was named)."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def resolve_tracking_uri(cli_uri: str | None, out_dir: str | os.PathLike) -> str:
    """The explicit URI, else ``sqlite:///<abs out_dir>/mlflow.db`` (not a file in whatever folder we run from)."""
    return explicit_tracking_uri(cli_uri) or f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def default_artifact_root(out_dir: str | os.PathLike) -> str:
    """``<abs out_dir>/mlartifacts``: where a new experiment on a local store keeps its artifacts."""
    return str(Path(out_dir).resolve() / "mlartifacts")


def scheme_of(uri: str) -> str:
    return urllib.parse.urlsplit(uri).scheme.lower() if "://" in uri or uri.startswith("file:") else ""


def _local_folder(uri: str) -> Path | None:
    """The folder a local store lives in (an SQLite file's, a ``file:`` store's own), None for a server or DB."""
    scheme = scheme_of(uri)
    if scheme == "sqlite":  # sqlite:///rel.db -> "rel.db"; sqlite:////abs.db -> "/abs.db"
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        return None if path in ("", ":memory:") else Path(urllib.parse.unquote(path)).parent
    if scheme == "file" or (scheme == "" and not uri.startswith("databricks")):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path)) if scheme else Path(uri)
    return None


def artifact_location(uri: str, artifact_root: str | os.PathLike | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: None on a server (it decides); else ``artifact_root``, else
    ``mlartifacts/`` beside an SQLite database (else in the current folder)."""
    if scheme_of(uri) in ("http", "https") or uri.startswith("databricks"):
        return None
    db = _local_folder(uri) if scheme_of(uri) == "sqlite" else None
    root = str(artifact_root or (db.resolve() if db else Path.cwd()) / "mlartifacts")
    return root if "://" in root else Path(root).resolve().as_uri()


def _probe_http(uri: str, timeout_s: float) -> None:
    import requests  # MLflow's HTTP client; it sends a URL's user:password as Basic auth (a proxy may want it)

    status = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).status_code
    shown = redact_uri(uri)
    if status in (401, 403):
        raise TrackingError(f"MLflow tracking server at {shown} refused the credentials (HTTP {status}); set "
                            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    if status == 404:
        raise TrackingError(f"{shown} answered HTTP 404 on /health: not an MLflow tracking server? "
                            "pass the server's base URI with --tracking-uri")
    if status >= 400:
        raise TrackingError(f"MLflow tracking server at {shown} is unavailable (HTTP {status} on /health); "
                            "start it or pass --tracking-uri")


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingError (one line, URI redacted) if the store ``uri`` cannot be used: a server's ``/health``
    within ``timeout_s`` (MLflow's client would retry for minutes); a local store's folder made and writable, and the
    store opened by MLflow's client (an SQLite file that is not a database fails here, not mid-run)."""
    from mlflow.tracking import MlflowClient

    shown, folder = redact_uri(uri), _local_folder(uri)
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"cannot create folder {folder} for the MLflow store {shown} ({e.strerror or e})") \
                from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise TrackingError(f"folder {folder} is not writable; cannot hold the MLflow store {shown}")
        if scheme_of(uri) != "sqlite":
            return  # a file store is made on first write; MLflow 3 deprecates opening it
    http = scheme_of(uri) in ("http", "https")
    try:
        if http:
            _probe_http(uri, timeout_s)
        else:  # sqlite (made and migrated here, as the run would), postgresql://, databricks, ...
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except TrackingError:
        raise
    except Exception as e:
        what, fix = (f"server at {shown} is unreachable", "start") if http else (f"store {shown} is unusable", "fix")
        raise TrackingError(f"MLflow tracking {what} ({one_line(e, 200)}); {fix} it or pass --tracking-uri") from None
