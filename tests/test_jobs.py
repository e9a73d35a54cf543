"""The users' jobs (#7): `metatrain predict` on a user's own few-shot task and `metatrain retrain` with a champion
(warm start, paired comparison, promotion as a compare-and-set that two processes cannot both win)."""

from __future__ import annotations

import json
import multiprocessing as mp
import zipfile
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from metatrain.pipeline.cli import main
from metatrain.pipeline.jobs.retrain import CHAMPION, PREVIOUS, RetrainError, compare, promote_if_better, retrain

pytestmark = [pytest.mark.data, pytest.mark.usefixtures("ray_module", "no_env_tracking")]


QUICK = ["model.hidden=16", "algorithm.inner_steps=2", "algorithm.eval_inner_steps=4", "train.meta_batch=8",
         "train.val_every=0", "train.eval_tasks=600", "train.checkpoint_every=10", "workers.count=2",
         "tracking.system_metrics=false", "optim.lr=0.003"]


def user_task(omniglot_dir: Path, root: Path, classes: int = 5, queries: int = 2) -> tuple[Path, Path, list[str]]:
    """A user's task from the evaluation archive: one drawing per class as support, ``queries`` others to label."""
    z = zipfile.ZipFile(omniglot_dir / "images_evaluation.zip")
    names = sorted(n for n in z.namelist() if n.endswith(".png"))
    chars = sorted({n.rsplit("/", 1)[0] for n in names})[::37][:classes]
    truth = []
    for c in chars:
        files = [n for n in names if n.startswith(c + "/")]
        label = c.replace("/", "_")
        (root / "support" / label).mkdir(parents=True)
        (root / "support" / label / "a.png").write_bytes(z.read(files[0]))
        (root / "query").mkdir(exist_ok=True)
        for i, f in enumerate(files[1:1 + queries]):
            (root / "query" / f"{label}-{i}.png").write_bytes(z.read(f))
            truth.append(label)
    return root / "support", root / "query", truth


def assert_predicts_a_user_task(omniglot_dir: Path, tmp_path: Path, run_id: str, uri: str) -> None:
    """`metatrain predict --run` on a 5-class user task labels every query with one of its classes, 0 < p <= 1."""
    support, query, truth = user_task(omniglot_dir, tmp_path / "task", classes=5)
    preds = tmp_path / "preds.json"
    assert main(["predict", "--run", run_id, "--tracking-uri", uri, "--support", str(support),
                 "--query", str(query), "--json", str(preds)]) == 0
    rows = json.loads(preds.read_text())
    assert len(rows) == len(truth) and all(r["label"] in set(truth) and 0 < r["probability"] <= 1 for r in rows)


def predict_error_lines(omniglot_dir: Path, tmp_path: Path, run_id: str, uri: str, capsys, classes: int) -> list[str]:
    """`metatrain predict --run` on a user task of ``classes`` classes that the model refuses: exit 2, and the
    error lines it printed."""
    few, fq, _ = user_task(omniglot_dir, tmp_path / "few", classes=classes)
    capsys.readouterr()
    assert main(["predict", "--run", run_id, "--tracking-uri", uri, "--support", str(few), "--query", str(fq)]) == 2
    return [line for line in capsys.readouterr().err.splitlines() if "error" in line]


def test_compare_uses_the_paired_difference():
    champion = np.array([0.8, 0.6, 0.9, 0.7] * 50)
    assert compare(champion + 0.05, champion, None)[0]  # a constant gain: zero-width CI, promoted
    noisy = champion + np.tile([0.2, -0.19], 100)
    better, margin, _ = compare(noisy, champion, None)
    assert not better and margin > 0.005  # mean gain 0.005, inside its CI
    assert compare(champion + 0.01, champion, 0.02)[0] is False
    with pytest.raises(RetrainError, match="different tasks"):
        compare(champion[:10], champion, None)


def _race(uri: str, version: str, barrier, queue) -> None:
    client = MlflowClient(tracking_uri=uri)
    barrier.wait()
    queue.put((version, promote_if_better(client, uri, "race", version, "1", True)))


def test_two_retrains_at_once_never_both_promote(tmp_path):
    uri = f"sqlite:///{tmp_path}/registry.db"
    client = MlflowClient(tracking_uri=uri)
    client.create_registered_model("race")
    exp = client.create_experiment("race", artifact_location=str(tmp_path / "art"))
    for _ in range(3):
        run = client.create_run(exp)
        client.create_model_version("race", str(tmp_path / "art"), run.info.run_id)
    client.set_registered_model_alias("race", CHAMPION, "1")
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(uri, v, barrier, queue)) for v in ("2", "3")]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # Both beat v1, both compared against v1: exactly one moves the alias, the other sees it moved and stops.
    assert sorted(ok for ok, _ in results.values()) == [False, True], results
    winner = next(v for v, (ok, _) in results.items() if ok)
    loser_reason = next(r for ok, r in results.values() if not ok)
    assert "moved" in loser_reason
    assert str(client.get_model_version_by_alias("race", CHAMPION).version) == winner
    assert str(client.get_model_version_by_alias("race", PREVIOUS).version) == "1"


@pytest.mark.parametrize("config, name, message", [
    ("configs/omniglot_fomaml_5w1s.yaml", "team/omniglot", r"--model 'team/omniglot': the model registry refuses "
                                                           r"this name \(.*cannot contain '/'"),
    ("configs/sinusoid_maml.yaml", "sine", r"retrain compares accuracies; the task of configs/sinusoid_maml.yaml "
                                           r"\(data.dataset=sinusoid\) has none"),
    ("configs/quadratic_l2l_gd.yaml", "quad", r"\(data.dataset=quadratic\) has none"),
])
def test_retrain_refuses_before_training(config, name, message, tmp_path):
    """What would fail after training and a 600-task evaluation fails first, and writes nothing."""
    import time

    uri = f"sqlite:///{tmp_path}/registry.db"
    start = time.monotonic()
    with pytest.raises(RetrainError, match=message):
        retrain(config, name, budget_steps=2, tracking_uri=uri, out=str(tmp_path / "run"))
    assert time.monotonic() - start < 5
    assert not (tmp_path / "run").exists()
    client = MlflowClient(tracking_uri=uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert client.search_registered_models() == []


def test_retrain_promotes_then_compares_on_the_same_tasks_and_predict_uses_the_champion(
        omniglot_store, omniglot_dir, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/registry.db"
    config = "configs/omniglot_fomaml_5w1s.yaml"
    first = retrain(config, "fomaml", budget_steps=40, overrides=[f"data.path={omniglot_store}", *QUICK],
                    tracking_uri=uri, out=str(tmp_path / "r1"))
    assert first.promoted and first.champion_version is None and "no champion" in first.reason
    client = MlflowClient(tracking_uri=uri)
    assert str(client.get_model_version_by_alias("fomaml", CHAMPION).version) == first.challenger_version

    # The second retrain warm-starts from the champion, so after 10 more steps it is at least as good; whatever the
    # decision, both were scored on the same 600 tasks and the tags say so.
    second = retrain(config, "fomaml", budget_steps=10, overrides=[f"data.path={omniglot_store}", *QUICK],
                     tracking_uri=uri, out=str(tmp_path / "r2"), margin=0.0)
    assert second.champion_version == first.challenger_version
    assert second.challenger_acc > 0.5 and second.champion_acc == pytest.approx(first.challenger_acc, abs=1e-9)
    mv = client.get_model_version("fomaml", second.challenger_version)
    assert mv.tags["metatrain.retrain.decision"] == ("promoted" if second.promoted else "kept")
    assert float(mv.tags["metatrain.retrain.champion_accuracy"]) == pytest.approx(second.champion_acc, abs=1e-6)
    assert client.get_run(mv.run_id).data.tags["metatrain.retrain.decision"] == mv.tags["metatrain.retrain.decision"]
    champion_now = str(client.get_model_version_by_alias("fomaml", CHAMPION).version)
    assert champion_now == (second.challenger_version if second.promoted else first.challenger_version)

    # A config whose model differs from the champion's: refused before training, nothing promoted.
    with pytest.raises(Exception, match="do not fit this config's model"):
        retrain(config, "fomaml", budget_steps=2, overrides=[f"data.path={omniglot_store}", *QUICK,
                                                            "model.hidden=8"], tracking_uri=uri,
                out=str(tmp_path / "r3"))
    assert str(client.get_model_version_by_alias("fomaml", CHAMPION).version) == champion_now

    # predict with the champion on a user's task: every query labelled with one of the support classes.
    support, query, truth = user_task(omniglot_dir, tmp_path / "task")
    capsys.readouterr()
    assert main(["predict", "--model", "models:/fomaml@champion", "--tracking-uri", uri, "--support", str(support),
                 "--query", str(query), "--json", str(tmp_path / "pred.json")]) == 0
    preds = json.loads((tmp_path / "pred.json").read_text())
    assert [p["file"].rsplit("-", 1)[0] for p in preds] == truth
    assert all(p["label"] in truth and 0 < p["probability"] <= 1 for p in preds)
    assert sum(p["label"] == t for p, t in zip(preds, truth)) >= 6  # 10 queries, 5-way; chance is 2
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(truth)


def test_predict_bad_input(omniglot_store, omniglot_dir, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/registry.db"
    result_dir = tmp_path / "run"
    from metatrain.pipeline.jobs.train import train

    run = train("configs/omniglot_fomaml_5w1s.yaml", [f"data.path={omniglot_store}", *QUICK, "train.steps=2",
                                                       "train.eval_tasks=10"],
                out=str(result_dir), tracking_uri=uri, quiet=True)
    support, query, _ = user_task(omniglot_dir, tmp_path / "task", classes=3)
    capsys.readouterr()
    # 3 classes for a 5-way MAML-family head: one line naming the mismatch.
    assert main(["predict", "--run", run.run_id, "--tracking-uri", uri, "--support", str(support),
                 "--query", str(query)]) == 2
    assert "has 3 classes but this fomaml model's head has exactly 5 ways" in capsys.readouterr().err
    (support / "empty").mkdir()
    assert main(["predict", "--run", run.run_id, "--tracking-uri", uri, "--support", str(support),
                 "--query", str(query)]) == 2
    assert "class folder" in capsys.readouterr().err
    bad = tmp_path / "bad"
    (bad / "c").mkdir(parents=True)
    (bad / "c" / "x.png").write_bytes(b"not a png")
    assert main(["predict", "--run", run.run_id, "--tracking-uri", uri, "--support", str(bad),
                 "--query", str(query)]) == 2
    assert "cannot decode image" in capsys.readouterr().err
    assert main(["predict", "--model", "models:/nope@champion", "--tracking-uri", uri, "--support", str(support),
                 "--query", str(query)]) == 2
    assert "models:/nope@champion: not found" in capsys.readouterr().err
