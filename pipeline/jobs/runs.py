"""Where runs live: the folder a run writes (``--out``, checked before anything is written), the run an id names
(``--run``, ``--resume``: found through the tracking store's ``metatrain.out_dir`` tag) and the checkpoint that
``eval`` and ``predict`` read from a run or a registered model."""

from __future__ import annotations

import json
from pathlib import Path

from metatrain.tasks.errors import MetatrainError
from metatrain.tasks.store import manifest_path

from metatrain.pipeline.checkpoint import latest_checkpoint, load_checkpoint

OUT_TAG = "metatrain.out_dir"


class RunError(MetatrainError):
    """A run cannot start or continue as asked (unknown --resume run, an occupied --out, ...)."""


def find_run_out(run_id: str, tracking_uri: str | None, flag: str = "--resume") -> tuple[Path, str]:
    """The out folder and tracking URI of an earlier run, from the tracking store (default layout: runs/*/)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    candidates = ([tracking_uri] if tracking_uri
                  else [f"sqlite:///{p.resolve()}" for p in sorted(Path("runs").glob("*/mlflow.db"))])
    for uri in candidates:
        try:
            run = MlflowClient(tracking_uri=uri).get_run(run_id)
        except MlflowException:
            continue
        out = run.data.tags.get(OUT_TAG)
        if out:
            return Path(out), uri
    where = tracking_uri or "runs/*/mlflow.db"
    raise RunError(f"{flag} {run_id}: no such metatrain run in {where} (pass --tracking-uri or --out of the run)")


def check_out_dir(out: Path, resuming: bool = False, evaluating: str | None = None) -> None:
    """Refuse an --out that is a file, holds a task store, or holds another run's checkpoints (training) or
    results (``evaluating``: the source of the evaluation about to be written, which may replace its own)."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; give a folder (created if missing)")
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise RunError(f"--out {out}: {above} is a file, so no folder can be made under it")
    if manifest_path(out).is_file():
        raise RunError(f"--out {out} holds a prepared task store ({manifest_path(out).name}); choose another folder")
    ckpt = out / "checkpoints"
    if evaluating is not None:
        if ckpt.is_dir():
            raise RunError(f"--out {out} is a training run's folder; its eval.json and eval_tasks.parquet are that "
                           "run's: choose a new --out for this evaluation")
        try:
            source = json.loads((out / "eval.json").read_text()).get("source") if (out / "eval.json").exists() \
                else evaluating
        except (OSError, ValueError, AttributeError):
            source = "an unreadable eval.json"
        if source != evaluating:
            raise RunError(f"--out {out} holds the evaluation of {source}; choose a new --out for this one")
    elif not resuming and ckpt.is_dir() and latest_checkpoint(ckpt) is not None:
        raise RunError(f"--out {out} already holds checkpoints of another run; pass --resume RUN_ID to continue it "
                       f"or choose a new --out")


CHECKPOINTS = ("final", "best", "latest")


def checkpoint_of(run: str | None, model_uri: str | None, tracking_uri: str | None,
                  which: str | None = None) -> tuple[dict, str]:
    """(checkpoint state, description naming the file) of ``--run RUN_ID`` or ``--model models:/NAME@ALIAS`` (or
    /VERSION). A run's ``final`` checkpoint unless ``which`` asks for its ``best`` or ``latest`` (periodic) one: an
    unfinished run (RUNNING, FAILED, KILLED) has no final one and is refused unless asked."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if which is not None and which not in CHECKPOINTS:
        raise RunError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    if run:
        out_dir, _ = find_run_out(run, tracking_uri, "--run")
        ckpt_dir = out_dir / "checkpoints"
        latest = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
        path = {"final": ckpt_dir / "final.pt", "best": ckpt_dir / "best.pt",
                "latest": latest or ckpt_dir / "final.pt"}[which or "final"]
        if not path.is_file():
            if which is None:
                newest = f" (newest: {latest.name})" if latest else ""
                raise RunError(f"--run {run} has not finished: no final checkpoint in {ckpt_dir}; pass --checkpoint "
                               f"latest{newest} or --checkpoint best to use an unfinished run's weights")
            raise RunError(f"--run {run}: no {which} checkpoint in {ckpt_dir}")
        return load_checkpoint(path), f"run {run} ({path})"
    if which is not None:
        raise RunError("--checkpoint applies to --run; a registered model is its run's final checkpoint")
    if not model_uri or not model_uri.startswith("models:/"):
        raise RunError(f"--model must look like models:/NAME@ALIAS or models:/NAME/VERSION, got {model_uri!r}")
    client = MlflowClient(tracking_uri=tracking_uri)
    ref = model_uri[len("models:/"):]
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.rsplit("/", 1)
            mv = client.get_model_version(name, version)
    except (MlflowException, ValueError) as e:
        raise RunError(f"--model {model_uri}: not found in {tracking_uri} ({str(e).splitlines()[0]})") from None
    import tempfile

    # The checkpoint logged next to the model is read with weights_only=True; the pickled MLflow model is not
    # loaded, so a registry entry can never run code on this machine.
    local = client.download_artifacts(mv.run_id, "checkpoints/final.pt", tempfile.mkdtemp(prefix="metatrain-"))
    return load_checkpoint(local), f"{model_uri} (run {mv.run_id}, version {mv.version})"
