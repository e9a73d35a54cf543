"""Logging a run's model to MLflow: the few-shot classifier as a pyfunc (``log_classifier``), any other network as
a torch.export program (``log_torch_model``), both into the run and registered if asked."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from metatrain.pipeline.tracking.redact import one_line, warn

#: The models-from-code file MLflow copies into the model and runs at load: it builds FewShotClassifier, so no
#: pickled object is ever loaded (the weights come from the checkpoint artifact, read with weights_only=True).
MODEL_CODE = Path(__file__).with_name("model_code.py")


@dataclass(frozen=True)
class ModelDestination:
    """Where a run's model goes: the run's MLflow client, tracking URI, run and experiment, and the list its tracker
    reports failed uploads in (``RunTracker.end()``'s): ``"model"`` joins it when logging fails."""

    client: object
    uri: str
    run_id: str
    experiment_id: str
    failed: list[str]

    @classmethod
    def of(cls, tracker) -> ModelDestination:
        return cls(tracker.client, tracker.uri, tracker.run_id, tracker.experiment_id, tracker.failed)


def torch_release() -> str:
    import torch

    return torch.__version__.split("+")[0]  # 2.14.1+cu130 -> 2.14.1: the PyPI release


def _requirements(*packages: str) -> list[str]:
    """Named, not inferred: MLflow's inference loads the model in a fresh interpreter (~10 s a model here) to list
    imports. metatrain itself is not named: it is not on PyPI, and a same-named stranger's package must never be
    installed in its place; the classifier is served from an environment that has it (``--env-manager local``)."""
    import importlib.metadata

    import mlflow

    pins = {"torch": torch_release(), "mlflow": mlflow.__version__}
    return [f"{p}=={pins.get(p) or importlib.metadata.version(p)}" for p in packages]


def _log(dest: ModelDestination, save: Callable[[str], object]) -> str | None:
    """``save(model_id)`` (an MLflow ``Model.log``) into ``dest``'s run; the model URI, or None (a warning, "model"
    among the tracker's failed artifacts)."""
    import mlflow

    env, previous = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    explicit = mlflow.is_tracking_uri_set() and previous != env  # a URI set in-process, not taken from $ENV
    try:
        # The logged-model record is ours (this run's experiment, not the active one); the registry and the
        # model's artifacts go through MLflow's global URI, pointed here for the call and then restored.
        model_id = dest.client.create_logged_model(dest.experiment_id, name="model",
                                                   source_run_id=dest.run_id).model_id
        mlflow.set_tracking_uri(dest.uri)
        return save(model_id).model_uri
    except Exception as e:
        dest.failed.append("model")
        warn(f"could not log the model to MLflow ({one_line(e, 200)})")
        return None
    finally:
        mlflow.set_tracking_uri(previous if explicit else None)  # None: unset again, $MLFLOW_TRACKING_URI rules
        os.environ.pop("MLFLOW_TRACKING_URI", None) if env is None else os.environ.update(MLFLOW_TRACKING_URI=env)


def log_torch_model(model, dest: ModelDestination, registered_name: str | None = None, **kw) -> str | None:
    """``mlflow.pytorch.log_model`` into the run (registered as ``registered_name``); the model URI or None.

    ``pt2`` (torch.export, no pickle) when an ``input_example`` is given: what serves a tensor model (the learned
    optimizer's packed step, the sinusoid regressor)."""
    import mlflow.pytorch

    kw.setdefault("serialization_format", "pt2" if kw.get("input_example") is not None else "pickle")
    kw.setdefault("pip_requirements", _requirements("torch", "mlflow"))  # a pt2 program needs only these
    return _log(dest, lambda model_id: mlflow.pytorch.log_model(
        model, name="model", model_id=model_id, run_id=dest.run_id, registered_model_name=registered_name, **kw))


def log_classifier(checkpoint: str | os.PathLike, dest: ModelDestination, *, invert: bool,
                   image_shape: tuple[int, int, int], ways: int, registered_name: str | None = None) -> str | None:
    """The few-shot classifier of a checkpoint as an MLflow pyfunc (see :mod:`.fewshot` for its input and output)
    into the run (registered as ``registered_name``); the model URI or None.

    The checkpoint travels inside the model as an artifact; ``invert`` and ``image_shape`` (the training store's,
    which the serving machine need not have) as its model config. A ``ways``-class example task is logged with it,
    which MLflow answers with the saved model as a check (a failure is MLflow's warning) and shows as the request
    format."""
    import mlflow.pyfunc
    from mlflow.models import Model

    from metatrain.pipeline.serving.fewshot import CHECKPOINT, SIGNATURE, example_task

    return _log(dest, lambda model_id: Model.log(
        artifact_path=None, flavor=mlflow.pyfunc, name="model", model_id=model_id, run_id=dest.run_id,
        registered_model_name=registered_name, python_model=str(MODEL_CODE),
        artifacts={CHECKPOINT: str(checkpoint)}, signature=SIGNATURE, input_example=example_task(ways),
        model_config={"serving": {"invert": bool(invert), "image_shape": list(image_shape)}},
        pip_requirements=_requirements("torch", "torchvision", "pillow", "pandas", "mlflow")))
