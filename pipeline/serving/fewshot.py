"""The served few-shot classifier (MLflow pyfunc): one request is one task, answered as ``metatrain predict``
answers it (the same decode, resize and ink inversion, the same adaptation and scores, through
:class:`~metatrain.pipeline.jobs.predict.Predictor`).

Input: a pandas DataFrame, one row per image (over HTTP its JSON: ``{"dataframe_records": [...]}`` or
``{"dataframe_split": ...}``)::

    role   string  "support" (a labelled example) or "query" (an image to label)
    label  string  the support image's class name; null or absent on query rows
    image  binary  the encoded image file (PNG, JPEG, ...): bytes in Python, base64 in JSON (MLflow decodes a
                   binary column's base64 itself)
    id     string  optional: names the row in the output and in error messages (its file name, say)

Output: one row per query, in request order: ``id`` (when the request has that column), ``label`` (one of the
support labels) and ``probability`` (as ``metatrain predict`` prints it). The support classes are taken in sorted
label order, as ``metatrain predict`` takes its sorted class folders, so a model whose head has one output per
class (MAML's) gives the same labels for the same images whichever way the rows are ordered.

A request the model cannot answer (no support images, a support row without a label or a row without an image,
an image that does not decode, more classes than the model's head) raises ``MlflowException`` with
``INVALID_PARAMETER_VALUE`` and one line naming the row or the class: MLflow's scoring server answers it with
HTTP 400 and that line at the end of the body's ``message`` (and alone in its ``error``), never a 500 with a
traceback. A missing column or a JSON ``image`` that is not base64 is refused (400) by MLflow's own schema check.
"""

from __future__ import annotations

import pandas as pd
from metatrain.tasks.errors import MetatrainError
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

CHECKPOINT = "checkpoint"  # the model's artifact: the run's final checkpoint
ROLES = ("support", "query")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "role"), ColSpec("string", "label", required=False),
                   ColSpec("binary", "image"), ColSpec("string", "id", required=False)]),
    outputs=Schema([ColSpec("string", "id", required=False), ColSpec("string", "label"),
                    ColSpec("double", "probability")]))


def example_task(ways: int, side: int = 28) -> pd.DataFrame:
    """A request of ``ways`` classes (one image each: a stroke in a different place) and one query: the input example
    MLflow stores beside the model (its ``serving_input_example.json`` shows the request format) and runs through
    the saved model when logging it."""
    import io

    from PIL import Image, ImageDraw

    def png(k: int) -> bytes:
        im = Image.new("L", (side, side), 255)
        ImageDraw.Draw(im).line([(k % side, 0), (side - 1 - k % side, side - 1)], fill=0, width=2)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    rows = [{"role": "support", "label": f"class{k}", "image": png(3 * k), "id": f"class{k}.png"} for k in range(ways)]
    return pd.DataFrame([*rows, {"role": "query", "label": None, "image": png(1), "id": "query.png"}])


class RequestError(MlflowException):
    """A task the model cannot answer: HTTP 400 from the scoring server, its one line in the body."""

    def __init__(self, message: str):
        # MLflow's server prefixes ``message`` with a dump of the request; ``error`` keeps the line alone.
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE, error=message)


def _row_name(i: int, ids: list | None) -> str:
    return f"row {i}" + (f" ({ids[i]})" if ids is not None else "")


def read_task(task: pd.DataFrame):
    """(support classes in sorted label order, query names, query images) of a request; RequestError naming the
    row when one is not what the module docstring says."""
    from metatrain.pipeline.jobs.predict import SupportClass

    ids = [str(v) for v in task["id"]] if "id" in task.columns else None
    labels = task["label"] if "label" in task.columns else pd.Series([None] * len(task))
    support: dict[str, SupportClass] = {}
    names, blobs = [], []
    for i, (role, label, image) in enumerate(zip(task["role"], labels, task["image"])):
        name = _row_name(i, ids)
        if role not in ROLES:
            raise RequestError(f"{name}: role must be 'support' or 'query', not {role!r}")
        if role == "support" and (pd.isna(label) or not str(label).strip()):
            raise RequestError(f"{name}: a support image needs its class name in 'label'")
        if not isinstance(image, bytes | bytearray) or not image:
            raise RequestError(f"{name} ({role}{f' {label!r}' if role == 'support' else ''}) has no image: "
                               "'image' holds the encoded file (base64 in JSON)")
        if role == "support":
            support.setdefault(str(label), SupportClass(str(label), [], [])).members.append(name)
            support[str(label)].blobs.append(bytes(image))
        else:
            names.append(name)
            blobs.append(bytes(image))
    if not support:
        raise RequestError("the task has no support images (rows with role 'support'): give at least one labelled "
                           "image per class")
    if not names:
        raise RequestError("the task has no query images (rows with role 'query'): nothing to label")
    return [support[k] for k in sorted(support)], names, blobs


class FewShotClassifier(PythonModel):
    """A run's checkpoint serving few-shot tasks (see the module docstring)."""

    def load_context(self, context) -> None:
        from metatrain.pipeline.checkpoint import load_checkpoint
        from metatrain.pipeline.jobs.predict import Predictor

        serving = (context.model_config or {}).get("serving", {})
        state = load_checkpoint(context.artifacts[CHECKPOINT])  # weights_only=True: nothing in it runs
        self.predictor = Predictor(state, invert=serving.get("invert"), shape=serving.get("image_shape"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        classes, names, blobs = read_task(model_input)
        try:
            labels = self.predictor.adapt(classes).label(names, blobs.__getitem__)
        except MetatrainError as e:  # an image that does not decode, more classes than the head, ...
            raise RequestError(str(e)) from None
        out = pd.DataFrame({"label": [lab for lab, _ in labels], "probability": [p for _, p in labels]})
        if "id" in model_input.columns:
            out.insert(0, "id", [str(v) for v, r in zip(model_input["id"], model_input["role"]) if r == "query"])
        return out
