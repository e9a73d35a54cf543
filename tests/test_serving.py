"""Serving the champion: the run's classifier logged as an MLflow pyfunc that answers one few-shot task per request,
with `metatrain predict`'s labels, behind `mlflow models serve`; bad requests get a 400 with one line."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import free_port, wait_until_up
from mlflow.tracking import MlflowClient

from metatrain.pipeline.cli import main
from metatrain.pipeline.serving.log import ModelDestination, log_torch_model
from metatrain.pipeline.tracking import RunTracker
from tests.test_jobs import user_task

NAME = "fewshot"
CHAMPION_URI = f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def champion(omniglot_store, omniglot_dir, tmp_path_factory):
    """A fomaml run's step-0 checkpoint (no Ray, no training: seconds) logged as train.py logs a finished run's
    model, registered as NAME with version 1 @champion, and a 5-way user task of image files."""
    from metatrain.pipeline.checkpoint import checkpoint_state, save_named
    from metatrain.pipeline.components import build_model, fingerprint, image_shape, initial_params
    from metatrain.pipeline.config import load_config
    from metatrain.pipeline.jobs.train import log_run_model

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root}/mlflow.db"
    cfg = load_config("configs/omniglot_fomaml_5w1s.yaml", [f"data.path={omniglot_store}", "model.hidden=16",
                                                             f"tracking.register={NAME}"])
    model = build_model(cfg, image_shape(cfg))
    state = checkpoint_state(initial_params(cfg, model), {}, {}, step=0, fingerprint=fingerprint(cfg, model),
                             config=cfg.to_dict(), extra={"image_shape": list(image_shape(cfg))})
    final = save_named(root / "checkpoints", "final.pt", state)
    with RunTracker(uri, system_metrics=False).start() as t:
        t.log_artifact(final, "checkpoints")  # what `metatrain predict --model` reads
        assert log_run_model(cfg, str(final), ModelDestination.of(t)) is not None
    MlflowClient(uri).set_registered_model_alias(NAME, "champion", "1")
    support, query, _ = user_task(omniglot_dir, root / "task")
    return uri, support, query


def cli_predictions(uri: str, support: Path, query: Path, out: Path) -> dict[str, tuple[str, float]]:
    assert main(["predict", "--model", CHAMPION_URI, "--tracking-uri", uri, "--support", str(support),
                 "--query", str(query), "--json", str(out)]) == 0
    return {p["file"]: (p["label"], p["probability"]) for p in json.loads(out.read_text())}


def task_rows(support: Path, query: Path) -> list[dict]:
    """The task's files as rows (image bytes, id: the file name as predict prints it)."""
    rows = [{"role": "support", "label": d.name, "image": f.read_bytes(), "id": f"{d.name}/{f.name}"}
            for d in sorted(support.iterdir()) for f in sorted(d.iterdir())]
    return rows + [{"role": "query", "label": None, "image": f.read_bytes(), "id": f.name}
                   for f in sorted(query.iterdir())]


def assert_serves_like_predict(model_uri: str, state: dict, omniglot_dir: Path, root: Path) -> None:
    """The pyfunc at ``model_uri`` labels a 5-way task of files as ``predict`` does with the checkpoint ``state``
    (the tracking URI from $MLFLOW_TRACKING_URI)."""
    import mlflow.pyfunc

    from metatrain.pipeline.jobs.predict import predict

    support, query, _ = user_task(omniglot_dir, root)
    want = {p.file: (p.label, pytest.approx(p.probability, abs=1e-5)) for p in predict(state, support, query)}
    out = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame(task_rows(support, query)))
    assert {r.id: (r.label, r.probability) for r in out.itertuples()} == want


def as_json(rows: list[dict]) -> bytes:
    """The HTTP body: MLflow's dataframe_records with the binary column in base64."""
    return json.dumps({"dataframe_records": [{**r, "image": base64.b64encode(r["image"]).decode()}
                                             if isinstance(r.get("image"), bytes) else r for r in rows]}).encode()


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def bad_requests(rows: list[dict]) -> list[tuple[str, list[dict] | bytes, str]]:
    """(what, request rows or body, what the answer must say): each bad request the issue lists, and more."""
    queries = [r for r in rows if r["role"] == "query"]
    support = [r for r in rows if r["role"] == "support"]
    six = support + [{**support[0], "label": "zzz-sixth", "id": "extra.png"}] + queries
    return [
        ("no support images", queries, "the task has no support images"),
        ("a class without images", [*support[:-1], {**support[-1], "image": b""}, *queries],
         f"row 4 ({support[-1]['id']}) (support {support[-1]['label']!r}) has no image"),
        ("an undecodable PNG", [*support, {**queries[0], "image": b"\x89PNG not really"}, *queries[1:]],
         f"cannot decode image row 5 ({queries[0]['id']})"),
        ("more classes than the head", six, "the support set has 6 classes but this fomaml model's head has "
                                            "exactly 5 ways"),
        ("no queries", support, "the task has no query images"),
        ("a support row without a label", [{**support[0], "label": None}, *support[1:], *queries],
         "row 0 (" + support[0]["id"] + "): a support image needs its class name in 'label'"),
        ("an unknown role", [*support, {**queries[0], "role": "test"}],
         f"row 5 ({queries[0]['id']}): role must be 'support' or 'query', not 'test'"),
    ]


@pytest.mark.data
def test_mlflow_models_serve_answers_a_task_with_predicts_labels_and_bad_requests_with_400(champion, tmp_path,
                                                                                          monkeypatch):
    from mlflow.artifacts import download_artifacts

    uri, support, query = champion
    want = cli_predictions(uri, support, query, tmp_path / "pred.json")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    example = Path(download_artifacts(CHAMPION_URI, dst_path=str(tmp_path / "model"))) / "serving_input_example.json"
    port, log, bin_dir = free_port(), tmp_path / "serve.log", Path(sys.executable).parent
    # The environment's bin/ first on PATH, as in an activated one: MLflow starts `uvicorn` by name.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", CHAMPION_URI, "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", proc, log)
        rows = task_rows(support, query)
        status, body = post(f"{url}/invocations", as_json(rows))
        assert status == 200, body
        got = {p["id"]: (p["label"], p["probability"]) for p in body["predictions"]}
        assert got.keys() == want.keys()
        assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
        for k, (_, p) in got.items():
            assert p == pytest.approx(want[k][1], abs=1e-5)
        for what, bad, says in bad_requests(rows):
            status, body = post(f"{url}/invocations", as_json(bad))
            assert status == 400, (what, body)
            assert body["error"] == says or body["error"].startswith(says), (what, body)
            assert body["message"].endswith(body["error"]) and "Traceback" not in json.dumps(body), what
        # not base64: MLflow's own schema check answers 400 naming the column
        status, body = post(f"{url}/invocations", json.dumps({"dataframe_records": [
            {"role": "query", "image": "%%% not base64 %%%"}]}).encode())
        assert status == 400 and "image" in body["message"] and "Traceback" not in json.dumps(body), body
        # The request example logged with the model (5 classes, one query) is one the server answers.
        status, body = post(f"{url}/invocations", example.read_bytes())
        assert status == 200 and [p["id"] for p in body["predictions"]] == ["query.png"], body
        assert body["predictions"][0]["label"] in {f"class{k}" for k in range(5)}
    finally:  # the server and its uvicorn worker: the whole process group
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=20)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


@pytest.mark.data
def test_the_champion_loads_as_a_pyfunc_without_pickle_and_labels_as_predict_does(champion, tmp_path,
                                                                                   monkeypatch):
    import mlflow.pyfunc
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    uri, support, query = champion
    want = cli_predictions(uri, support, query, tmp_path / "pred.json")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # not mlflow.set_tracking_uri: process-global
    model = mlflow.pyfunc.load_model(CHAMPION_URI)
    rows = task_rows(support, query)
    out = model.predict(pd.DataFrame(rows))
    assert list(out.columns) == ["id", "label", "probability"]
    assert {r.id: (r.label, pytest.approx(r.probability, abs=1e-5)) for r in out.itertuples()} == want
    # Rows in any order, no ids: the same labels for the same queries (classes are taken in sorted label order).
    shuffled = pd.DataFrame(rows[::-1]).drop(columns="id")
    again = model.predict(shuffled)
    assert list(again.columns) == ["label", "probability"]
    assert again["label"].tolist() == [want[r["id"]][0] for r in rows[::-1] if r["role"] == "query"]
    for what, bad, says in bad_requests(rows):
        with pytest.raises(MlflowException) as e:
            model.predict(pd.DataFrame(bad))
        assert e.value.get_http_status_code() == 400 and says in e.value.message, what

    # What the registry holds: a models-from-code pyfunc with the checkpoint as artifact, no pickle anywhere, the
    # signature, and named requirements.
    local = Path(download_artifacts(CHAMPION_URI, dst_path=str(tmp_path / "model")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not any(f.endswith((".pkl", ".pickle")) for f in files), files
    assert "model_code.py" in files and any(f.startswith("artifacts/") and f.endswith(".pt") for f in files)
    info = mlflow.models.get_model_info(CHAMPION_URI)
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["role", "label", "image", "id"]
    assert info.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    reqs = (local / "requirements.txt").read_text().split()
    assert [r.split("==")[0] for r in reqs] == ["torch", "torchvision", "pillow", "pandas", "mlflow"]


def test_a_torch_model_is_logged_as_pt2_registered_and_the_uri_restored(tmp_path, monkeypatch):
    """The learned optimizer's packed step and the sinusoid regressor: a torch.export program (no pickle)."""
    import mlflow
    import mlflow.pyfunc
    import mlflow.pytorch

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with RunTracker(uri, system_metrics=False).start() as t:
        model_uri = log_torch_model(model, ModelDestination.of(t), registered_name="metatrain-test",
                                    input_example=torch.zeros(2, 4).numpy())
    assert model_uri.startswith("models:/")
    assert not mlflow.is_tracking_uri_set()  # MLflow's global URI is unset again, so $MLFLOW_TRACKING_URI rules

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ URIs resolve against the global store
    assert mlflow.models.get_model_info(model_uri).flavors["pytorch"]["model_data"] == "data"
    files = {p.name for p in Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "m"))
                                  ).rglob("*")}
    assert "model.pt2" in files and "model.pth" not in files  # torch.export, not a pickle
    loaded = mlflow.pytorch.load_model(model_uri)
    reqs = Path(mlflow.pyfunc.get_model_dependencies(model_uri)).read_text().split()
    assert reqs == [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]  # named
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), model(x))
    versions = MlflowClient(uri).search_model_versions("name='metatrain-test'")
    assert [(int(v.version), v.run_id) for v in versions] == [(1, t.run_id)]
    logged = MlflowClient(uri).get_logged_model(model_uri.split("/")[-1])
    assert logged.source_run_id == t.run_id and logged.experiment_id == t.experiment_id
    assert not (tmp_path / "mlruns").exists()  # not filed under the Default experiment in the cwd
    assert os.environ["MLFLOW_TRACKING_URI"] == uri  # the global URI setting was restored, env untouched


def test_a_model_that_cannot_be_logged_is_a_warning_and_a_failed_artifact(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = RunTracker(uri, system_metrics=False).start()
    monkeypatch.setattr(t.client, "create_logged_model", lambda *a, **k: (_ for _ in ()).throw(
        ConnectionError("registry down")))
    assert log_torch_model(torch.nn.Linear(2, 2), ModelDestination.of(t), registered_name="x") is None
    assert t.end() == ["model"]
    assert "could not log the model to MLflow (ConnectionError: registry down)" in capsys.readouterr().err
    assert MlflowClient(uri).get_run(t.run_id).info.status == "FINISHED"
