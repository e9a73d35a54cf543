"""The bad-input table: every case gives one clear error line and corrupts nothing.

One tiny real run is trained once for the module (local Ray, the parameter server, a SQLite MLflow store,
checkpoints) on a tiny Omniglot-shaped store. Each case then feeds one bad input to the CLI (``main``, in process)
and checks three things: exit code 2; exactly one ``metatrain: error: ...`` line, matching the case's message
(which names the field, flag or file); and that nothing was touched: the store's and the run's files hash the
same as before, the run is still FINISHED, no MLflow run was left RUNNING, and a fresh --out got no checkpoints.

    python bench/bad_inputs.py      # the same cases, printed as the Markdown table quoted in the README
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from metatrain.pipeline.cli import main

SECRET = "hunter2-not-logged"


@dataclass(frozen=True)
class Case:
    """One bad input: what it is, the command, the message expected, how to build the bad thing."""

    id: str
    kind: str
    what: str
    argv: tuple[str, ...]
    message: str
    setup: Callable[[dict], None] | None = None
    fresh_process: bool = False  # run `python -m metatrain.pipeline ...` in a new process (no Ray connected yet)


def _corrupt_store(ctx: dict) -> None:
    bad = ctx["TMP"] / "badstore"
    shutil.copytree(ctx["STORE"], bad)
    victim = sorted(bad.rglob("*.parquet"))[0]
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte: same size, wrong content
    victim.write_bytes(bytes(blob))
    ctx["BADSTORE"] = bad


def _write(name: str, text: str) -> Callable[[dict], None]:
    def setup(ctx: dict) -> None:
        ctx[name.upper().replace(".", "_")] = ctx["TMP"] / name
        (ctx["TMP"] / name).write_text(text)
    return setup


def _copy_run(ctx: dict, mangle: Callable[[Path], None]) -> None:
    """A copy of the trained run (same MLflow run id in its own store) whose checkpoints ``mangle`` damages."""
    from mlflow.tracking import MlflowClient

    from metatrain.pipeline.jobs.runs import OUT_TAG

    copy = ctx["TMP"] / "runcopy"
    shutil.copytree(ctx["RUNDIR"], copy)
    # The run records its folder; point the copy's record at the copy (a run folder moved by its user).
    MlflowClient(f"sqlite:///{copy}/mlflow.db").set_tag(ctx["RUN"], OUT_TAG, str(copy))
    for f in sorted((copy / "checkpoints").glob("*.pt")):
        mangle(f)
    ctx["RUNCOPY"] = copy


class _Touch:
    """Unpickling this runs ``Path(marker).touch()``: what a malicious checkpoint would do, made visible."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled_checkpoints(ctx: dict) -> None:
    ctx["MARKER"] = ctx["TMP"] / "unpickled-code-ran"
    _copy_run(ctx, lambda f: torch.save({"format": "metatrain-checkpoint/1", "step": 1,
                                         "params": _Touch(ctx["MARKER"])}, f))


def _drop_final(f: Path) -> None:
    if f.name == "final.pt":
        f.unlink()


def _task(*extra: str) -> Callable[[dict], None]:
    """A user's 3-way task (the trained run's ways) in TMP/sup (classes c1, c2, c3: one drawing each) and TMP/q (one
    drawing), plus ``extra`` paths (a trailing '/' makes a folder, else a text file)."""
    def setup(ctx: dict) -> None:
        from conftest import png_bytes

        for folder in ("sup/c1", "sup/c2", "sup/c3", "q"):
            (ctx["TMP"] / folder).mkdir(parents=True, exist_ok=True)
            (ctx["TMP"] / folder / "a.png").write_bytes(png_bytes(np.random.default_rng(0)))
        for e in extra:
            path = ctx["TMP"] / e
            path.mkdir(parents=True) if e.endswith("/") else path.write_text("notes\n")
    return setup


def _study_folder_of(name: str | None, tune: bool = False) -> Callable[[dict], None]:
    """A one-cell study file TMP/one.yaml, and (``name``) TMP/other/ as the folder of study ``name`` (``tune``: with
    a Tune experiment made from other trials)."""
    def setup(ctx: dict) -> None:
        _write("one.yaml", "config: configs/omniglot_fomaml_5w1s.yaml\ncells:\n  - {shots: 1}\n")(ctx)
        if name:
            (ctx["TMP"] / "other").mkdir()
            (ctx["TMP"] / "other" / "study.json").write_text(json.dumps({"parent_run_id": "0" * 32, "study": name,
                                                                       "digest": "0" * 16}) + "\n")
        if tune:
            (ctx["TMP"] / "other" / "tune").mkdir()
    return setup


def _bomb(path: Path) -> None:
    from PIL import Image

    Image.new("1", (10_000, 10_000)).save(path)  # 100 M pixels: PIL warns (and would decode it) below 179 M


def _truncated_checkpoints(ctx: dict) -> None:
    _copy_run(ctx, lambda f: f.write_bytes(f.read_bytes()[:100]))


def _missing_support(ctx: dict) -> None:
    (ctx["TMP"] / "query").mkdir(exist_ok=True)


# Nine levels of nine aliases: 9**9 values once expanded, from 395 bytes.
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")) + "data: {path: *i}\n"

PREDICT = ("predict", "--run", "RUN", "--tracking-uri", "sqlite:///RUNDIR/mlflow.db", "--support", "TMP/sup",
           "--query", "TMP/q")

TRAIN = ("train", "--set", "data.path=STORE", "--set", "data.train_split=background", "--set",
         "data.val_split=evaluation", "--set", "data.ways=3", "--set", "model.hidden=8", "--set", "train.steps=2",
         "--out", "OUT", "--quiet")

CASES = [
    Case("set-syntax", "CLI flag", "--set without =", (*TRAIN, "--set", "trainsteps"),
         r"invalid --set 'trainsteps': expected SECTION.FIELD=VALUE"),
    Case("set-unknown-key", "config field", "a misspelt key", (*TRAIN, "--set", "train.stpes=3"),
         r"unknown config key 'train.stpes' \(did you mean 'train.steps'\?\)"),
    Case("set-wrong-type", "config field", "a string for a float", (*TRAIN, "--set", "optim.lr=fast"),
         r"optim.lr must be float"),
    Case("set-out-of-range", "config field", "zero workers", (*TRAIN, "--set", "workers.count=0"),
         r"workers.count must be >= 1, got 0"),
    Case("set-unknown-algorithm", "config field", "an algorithm that does not exist",
         (*TRAIN, "--set", "algorithm.name=mamll"), r"algorithm.name: unknown 'mamll' \(did you mean 'maml'\?"),
    Case("set-model-mismatch", "config field", "a model the algorithm cannot run",
         (*TRAIN, "--set", "algorithm.name=protonet", "--set", "model.name=conv4"),
         r"model.name must be one of embedding for algorithm.name=protonet"),
    Case("l2l-with-images", "config field", "the learned optimizer with a few-shot image config",
         (*TRAIN, "--set", "algorithm.name=l2l_gd"),
         r"data.dataset must be an optimizee family \(quadratic, mlp\) for algorithm.name=l2l_gd"),
    Case("l2l-unknown-family", "config field", "an optimizee family that does not exist",
         ("train", "configs/quadratic_l2l_gd.yaml", "--out", "OUT", "--set", "data.dataset=quadratc"),
         r"data.dataset must be an optimizee family \(quadratic, mlp\) for algorithm.name=l2l_gd: .* got 'quadratc'"),
    Case("l2l-unknown-optimizee", "config field", "an MLP optimizee source that does not exist",
         ("train", "configs/digits_l2l_gd.yaml", "--out", "OUT", "--set", "optimizee.source=mnst"),
         r"optimizee.source must be one of 'digits' \| 'omniglot' \| 'mnist', got 'mnst' \(did you mean 'mnist'\?\)"),
    Case("l2l-short-unroll", "config field", "an unroll shorter than its truncation",
         ("train", "configs/quadratic_l2l_gd.yaml", "--out", "OUT", "--set", "algorithm.unroll=10"),
         r"algorithm.unroll: 10 steps is shorter than its truncation window of 20"),
    Case("meta-lstm-sinusoid", "config field", "the LSTM meta-learner with a sinusoid config",
         ("train", "configs/sinusoid_maml.yaml", "--out", "OUT", "--set", "algorithm.name=meta_lstm"),
         r"algorithm.name meta_lstm needs image data, not sinusoids"),
    Case("config-missing", "config file", "a config path that does not exist", ("train", "configs/nope.yaml",
                                                                              "--out", "OUT"),
         r"config file configs/nope.yaml does not exist"),
    Case("config-bad-yaml", "config file", "YAML that does not parse", ("train", "BAD_YAML", "--out", "OUT"),
         r"config file .*bad.yaml is not valid YAML at line \d+", _write("bad.yaml", "train:\n  steps: [3\n")),
    Case("config-not-mapping", "config file", "a YAML list instead of sections", ("train", "LIST_YAML", "--out", "OUT"),
         r"config file .*list.yaml must hold a mapping of sections, got list", _write("list.yaml", "- a\n- b\n")),
    Case("config-duplicate-key", "config file", "a key given twice in one mapping",
         ("train", "TWICE_YAML", "--out", "OUT"),
         r"config file .*twice.yaml is not valid YAML at line 3: key 'steps' given twice \(first at line 2\)",
         _write("twice.yaml", "train:\n  steps: 3\n  steps: 5\n")),
    Case("config-alias-bomb", "config file", "nested aliases that expand to 387 million values (395 bytes)",
         ("train", "BOMB_YAML", "--out", "OUT"), r"bomb.yaml is not valid YAML at line \d+: its aliases expand to "
         r"more than 100,000 values", _write("bomb.yaml", ALIAS_BOMB)),
    Case("set-huge-value", "config field", "a 60,000-character value for a float",
         (*TRAIN, "--set", "optim.lr=" + "9x" * 30_000), r"^metatrain: error: optim.lr must be float, got '9x9x.{0,80}"
         r"' \(str\)$"),
    Case("data-missing", "data file", "no prepared store at data.path", (*TRAIN, "--set", "data.path=/nonexistent"),
         r"data.path: no prepared store at /nonexistent; make it with `metatrain prepare omniglot --source DIR "
         r"--out /nonexistent`"),
    Case("data-corrupt", "data file", "a Parquet file with one byte flipped", (*TRAIN, "--set", "data.path=BADSTORE"),
         r"\.parquet fails its sha256 check against .*manifest.json; re-run `metatrain prepare", _corrupt_store),
    Case("data-too-many-ways", "config field", "more ways than the split has classes",
         (*TRAIN, "--set", "data.ways=50"), r"ways = 50 exceeds the \d+ classes of split"),
    Case("prepare-out-inside-source", "CLI flag", "prepare --out inside its own --source folder",
         ("prepare", "imagefolder", "--source", "TMP/sup", "--out", "TMP/sup/store"),
         r"--out .*sup/store and --source .*sup overlap; write the store outside the source folder", _task()),
    Case("prepare-huge-size", "CLI flag", "prepare --size 100000 (every image would take 9.3 GiB)",
         ("prepare", "imagefolder", "--source", "TMP/sup", "--out", "OUT", "--size", "100000"),
         r"--size must be at most 1024 \(every image is stored at size x size", _task()),
    Case("predict-decompression-bomb", "data file", "a 10,000 x 10,000 PNG of 12 kB among the queries",
         PREDICT, r"image .*q/bomb.png has more than 89,478,485 pixels \(PIL's limit against decompression bombs\)",
         lambda ctx: (_task()(ctx), _bomb(ctx["TMP"] / "q" / "bomb.png"))),
    Case("prepare-class-subfolder", "data file", "prepare imagefolder with a sub-folder inside a class folder",
         ("prepare", "imagefolder", "--source", "TMP/sup", "--out", "OUT"),
         r"class folder .*sup/c1 holds a sub-folder more", _task("sup/c1/more/")),
    Case("prepare-stray-file", "data file", "prepare imagefolder with a file beside the class folders",
         ("prepare", "imagefolder", "--source", "TMP/sup", "--out", "OUT"),
         r".*sup/readme.txt lies outside the class folders of .*sup", _task("sup/readme.txt")),
    Case("prepare-corrupt-zip", "data file", "an archive that is not a zip",
         ("prepare", "omniglot", "--source", "BADZIP", "--out", "OUT"), r"images_background.zip",
         lambda ctx: (ctx.__setitem__("BADZIP", ctx["TMP"] / "badzip"), (ctx["TMP"] / "badzip").mkdir(),
                      (ctx["TMP"] / "badzip" / "images_background.zip").write_bytes(b"not a zip"),
                      (ctx["TMP"] / "badzip" / "images_evaluation.zip").write_bytes(b"not a zip"))),
    Case("resume-unknown-run", "CLI flag", "--resume of a run that does not exist",
         ("train", "--resume", "0123456789abcdef", "--out", "RUNDIR"),
         r"--resume 0123456789abcdef: no such metatrain run"),
    Case("resume-other-model", "checkpoint", "resume with a different model width",
         ("train", "--resume", "RUN", "--out", "RUNDIR", "--set", "model.hidden=16", "--quiet"),
         r"checkpoint .* was written for a different model or config"),
    Case("checkpoint-truncated", "checkpoint", "every checkpoint truncated to 100 bytes",
         ("train", "--resume", "RUN", "--out", "RUNCOPY", "--quiet"), r"no readable checkpoint in .*runcopy",
         _truncated_checkpoints),
    Case("checkpoint-pickle", "checkpoint", "a final checkpoint that runs code when unpickled",
         ("eval", "--run", "RUN", "--tracking-uri", "sqlite:///RUNCOPY/mlflow.db"),
         r"checkpoint .*runcopy/checkpoints/final.pt is not a metatrain checkpoint: a weights-only load refuses it",
         _pickled_checkpoints),
    Case("ray-address", "address", "an unreachable --ray-address", (*TRAIN, "--ray-address", "127.0.0.1:1"),
         r"--ray-address 127.0.0.1:1: cannot connect to a Ray cluster there", fresh_process=True),
    Case("tracking-unreachable", "address", "an unreachable tracking server whose URI carries a password",
         (*TRAIN, "--tracking-uri", f"http://admin:{SECRET}@127.0.0.1:9"),
         r"MLflow tracking server at http://admin:\*\*\*@127.0.0.1:9 is unreachable"),
    Case("gpus-without-gpu", "config field", "workers.gpus on a cluster without GPUs",
         (*TRAIN, "--set", "workers.gpus=1"), r"workers.gpus = 1 x 2 workers needs 2 GPUs; the Ray cluster has 0"),
    Case("eval-bad-model-uri", "CLI flag", "--model that is not a registry URI", ("eval", "--model", "runs:/abc"),
         r"--model must look like models:/NAME@ALIAS"),
    Case("eval-out-of-a-run", "CLI flag", "eval --out into a training run's folder (its eval.json is the run's)",
         ("eval", "--run", "RUN", "--tracking-uri", "sqlite:///RUNDIR/mlflow.db", "--tasks", "2", "--out", "RUNDIR"),
         r"--out .*run is a training run's folder; its eval.json and eval_tasks.parquet are that run's"),
    Case("eval-out-is-a-store", "CLI flag", "eval --out into a prepared task store",
         ("eval", "--run", "RUN", "--tracking-uri", "sqlite:///RUNDIR/mlflow.db", "--tasks", "2", "--out", "STORE"),
         r"--out .*store holds a prepared task store \(_manifest.json\)"),
    Case("train-out-is-a-file", "CLI flag", "train --out naming a file", (*TRAIN[:-3], "--out", "OUT_TXT", "--quiet"),
         r"--out .*out.txt is a file; give a folder", _write("out.txt", "not a folder\n")),
    Case("eval-unfinished-run", "checkpoint", "eval --run of a run with no final checkpoint (killed, failed)",
         ("eval", "--run", "RUN", "--tracking-uri", "sqlite:///RUNCOPY/mlflow.db", "--out", "OUT"),
         r"--run \w+ has not finished: no final checkpoint in .*runcopy/checkpoints; pass --checkpoint latest "
         r"\(newest: ckpt-00000003.pt\) or --checkpoint best", lambda ctx: _copy_run(ctx, _drop_final)),
    Case("retrain-bad-model-name", "CLI flag", "retrain --model with a name the registry refuses",
         ("retrain", "configs/omniglot_fomaml_5w1s.yaml", "--model", "team/omniglot", "--tracking-uri",
          "sqlite:///RUNDIR/mlflow.db", "--out", "OUT", "--set", "data.path=STORE"),
         r"--model 'team/omniglot': the model registry refuses this name"),
    Case("retrain-no-accuracy", "config file", "retrain of a task without accuracies (sinusoid regression)",
         ("retrain", "configs/sinusoid_maml.yaml", "--model", "sine", "--tracking-uri", "sqlite:///RUNDIR/mlflow.db",
          "--out", "OUT"), r"retrain compares accuracies; the task of configs/sinusoid_maml.yaml "
                           r"\(data.dataset=sinusoid\) has none"),
    Case("study-twin-cells", "config file", "a study whose cells list one cell twice",
         ("study", "TWINS_YAML", "--out", "OUT"), r"study file .*twins.yaml: cells 1 and 2 are the same cell "
                                                  r"\{'shots': 1\}",
         _write("twins.yaml", "config: configs/omniglot_fomaml_5w1s.yaml\ncells:\n  - {shots: 1}\n  - {shots: 1}\n")),
    Case("study-out-of-another-study", "CLI flag", "study --out into another study's folder",
         ("study", "ONE_YAML", "--out", "TMP/other"), r"--out .*other holds study 'other', not 'one'; choose another",
         _study_folder_of("other")),
    Case("study-out-is-a-store", "CLI flag", "study --out into a prepared task store",
         ("study", "ONE_YAML", "--out", "STORE"), r"--out .*store holds a prepared task store",
         _study_folder_of(None)),
    Case("train-out-under-a-file", "CLI flag", "train --out below a file", (*TRAIN[:-3], "--out", "OUT_TXT/run",
                                                                           "--quiet"),
         r"--out .*out.txt/run: .*out.txt is a file, so no folder can be made under it",
         _write("out.txt", "not a folder\n")),
    Case("eval-unknown-run", "CLI flag", "--run of a run that does not exist",
         ("eval", "--run", "abc", "--tracking-uri", "sqlite:///RUNDIR/mlflow.db"), r"--run abc: no such metatrain run"),
    Case("predict-missing-support", "data file", "a --support folder that does not exist",
         ("predict", "--run", "RUN", "--tracking-uri", "sqlite:///RUNDIR/mlflow.db", "--support", "TMP/nosupport",
          "--query", "TMP/query"), r"nosupport", _missing_support),
    Case("predict-class-subfolder", "data file", "a class folder with a sub-folder (its images would be dropped)",
         PREDICT,
         r"class folder .*sup/c1 holds a sub-folder more: a class's images sit directly in its folder",
         _task("sup/c1/more/")),
    Case("predict-query-not-an-image", "data file", "a file in --query that is not an image",
         PREDICT,
         r".*q/notes.txt is not an image", _task("q/notes.txt")),
    Case("predict-json-inside-query", "CLI flag", "predict --json into the --query folder it labels",
         (*PREDICT, "--json", "TMP/q/labels.json"), r"--json .*q/labels.json lies inside .*q, the task it labels",
         _task()),
    Case("sample-unknown-split", "CLI flag", "a split name with a typo", ("sample", "--data", "STORE", "--split",
                                                                         "bakground"),
         r"unknown split 'bakground'"),
    Case("study-search-typo", "config file", "a study's search over a config field that does not exist",
         ("study", "SEARCH_YAML", "--out", "OUT"), r"study file .*search.yaml: search optim.lrr = 0.001: unknown "
                                                   r"config key 'optim.lrr' \(did you mean 'optim.lr'\?\)",
         _write("search.yaml", "config: configs/omniglot_fomaml_5w1s.yaml\nsearch:\n"
                               "  optim.lrr: {loguniform: [0.001, 0.1]}\nnum_samples: 4\n")),
    Case("study-trials-changed", "CLI flag", "study --out of the same study whose cells changed since",
         ("study", "ONE_YAML", "--out", "TMP/other"), r"--out .*other holds study 'one' with other trials \(its cells, "
                                                      r"search or num_samples changed since\)",
         _study_folder_of("one", tune=True)),
    Case("within-alphabet-too-wide", "config field", "within-alphabet episodes wider than every alphabet",
         (*TRAIN, "--set", "data.within_alphabet=true", "--set", "data.ways=4", "--set", "data.rotations=off",
          "--set", "data.val_split=background"),
         r"ways = 4 with data.within_alphabet: no alphabet of split '[^']+' has that many classes \(the largest "
         r"has \d+\)"),
    Case("augment-bad-probability", "config field", "an augmentation probability above 1",
         (*TRAIN, "--set", "data.augment=true", "--set", "data.augment_p=1.5"),
         r"data.augment_p must be in \[0, 1\], got 1.5"),
]


# ---- the trained run and the integrity checks ---------------------------------------------------------------------

def trained_run(root: Path) -> dict:
    """Prepare a tiny store and train a 3-step run into ``root``; return the placeholders the cases use."""
    from conftest import write_tiny_omniglot
    from mlflow.tracking import MlflowClient

    store, run_dir = root / "store", root / "run"
    assert main(["prepare", "omniglot", "--source", str(write_tiny_omniglot(root / "src")), "--out", str(store)]) == 0
    argv = [a.replace("STORE", str(store)).replace("OUT", str(run_dir)) for a in TRAIN]
    argv = [*argv, "--set", "train.steps=3", "--set", "train.checkpoint_every=1", "--set", "train.meta_batch=2",
            "--set", "train.eval_tasks=4"]
    assert main(argv) == 0
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    return {"STORE": store, "RUNDIR": run_dir, "RUN": run.info.run_id}


def _hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for f in sorted(Path(root).rglob("*")):
            if f.is_file() and f.name != "mlflow.db" and not f.name.startswith("mlflow.db-"):
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _statuses(*run_dirs: Path) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    out = {}
    for d in run_dirs:
        if (d / "mlflow.db").is_file():
            client = MlflowClient(f"sqlite:///{d}/mlflow.db")
            for exp in client.search_experiments():
                for r in client.search_runs([exp.experiment_id]):
                    out[f"{d.name}/{r.info.run_id}"] = r.info.status
    return out


def snapshot(ctx: dict) -> tuple[dict, dict]:
    roots = [ctx[k] for k in ("STORE", "RUNDIR", "BADSTORE", "RUNCOPY") if k in ctx]
    return _hashes(*roots), _statuses(*[ctx[k] for k in ("RUNDIR", "RUNCOPY") if k in ctx])


def call_main(argv: list[str], fresh_process: bool = False) -> tuple[int, str]:
    """``main(argv)``'s exit code and what it printed to stderr (in this process, or a new one)."""
    import contextlib
    import io
    import os
    import subprocess
    import sys

    if fresh_process:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        proc = subprocess.run([sys.executable, "-m", "metatrain.pipeline", *argv], capture_output=True, text=True,
                              env=env,
                              cwd=Path(__file__).resolve().parents[1], timeout=300)
        return proc.returncode, proc.stderr
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def run_case(case: Case, base: dict, tmp: Path) -> str:
    """Run one case; assert its error and that nothing was corrupted; return the error line."""
    ctx = dict(base, TMP=tmp, OUT=tmp / "out")
    if case.setup:
        case.setup(ctx)
    before = snapshot(ctx)
    argv = [a for a in case.argv]
    for key in sorted(ctx, key=len, reverse=True):  # RUNDIR before RUN
        argv = [a.replace(key, str(ctx[key])) if isinstance(ctx[key], (str, Path)) else a for a in argv]
    code, err = call_main(argv, case.fresh_process)
    errors = [line for line in err.splitlines() if line.startswith("metatrain: error: ")]
    assert code == 2, (code, err[-2000:])
    assert len(errors) == 1, err[-2000:]
    assert re.search(case.message, errors[0]), errors[0]
    assert SECRET not in err
    after = snapshot(ctx)
    assert after[0] == before[0], "files changed"
    assert after[1] == before[1], "MLflow run statuses changed"
    assert "RUNNING" not in after[1].values()
    assert not (ctx["OUT"] / "checkpoints").exists()
    assert not (ctx.get("MARKER") and Path(ctx["MARKER"]).exists()), "a checkpoint's pickled code ran"
    return errors[0][len("metatrain: error: "):]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield trained_run(tmp_path_factory.mktemp("trained"))
    finally:
        ray.shutdown()


def test_the_table_has_twenty_cases_or_more():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
    assert {c.kind for c in CASES} >= {"CLI flag", "config field", "config file", "data file", "checkpoint", "address"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, trained, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_case(case, trained, tmp_path)


def test_an_address_of_another_cluster_is_refused_while_connected(trained):
    """In a process already connected to Ray (a notebook, these tests), --ray-address elsewhere is not ignored."""
    from metatrain.pipeline.distributed.engine import EngineError
    from metatrain.pipeline.jobs.train import init_ray

    with pytest.raises(EngineError, match="--ray-address 127.0.0.1:1: this process is already connected to the Ray "
                                          "cluster at .*; leave --ray-address out to use it"):
        init_ray("127.0.0.1:1")
    assert init_ray(None) is False  # the connected cluster is used as it is


def test_a_bad_gradient_is_rejected_counted_and_not_applied():
    """The gradient row of the table: a worker's non-finite contribution, seen by the parameter server."""
    from metatrain.pipeline.config import OptimConfig
    from metatrain.pipeline.distributed.parameter_server import ParameterServerCore

    ps = ParameterServerCore({"w": torch.zeros(3)}, OptimConfig(name="sgd", lr=1.0), total_steps=5,
                             checkpoint_dir=None, checkpoint_every=5)
    meta = {"worker": 1, "step": 1, "version": 0, "n_tasks": 1, "blocks": [[0]]}
    out = ps.apply_gradients(1, [meta], [[{"w": torch.tensor([1.0, float("nan"), 0.0])}]])
    assert not out["applied"] and out["rejected"] == ["worker 1, step 1: w has non-finite values"]
    assert ps.version == 0 and ps.counters["rejected"] == 1 and torch.equal(ps.get_weights()[1]["w"], torch.zeros(3))



def test_an_unfinished_run_is_used_when_asked_and_the_checkpoint_is_named(trained, tmp_path, capsys):
    ctx = dict(trained, TMP=tmp_path)
    _copy_run(ctx, _drop_final)
    uri = f"sqlite:///{ctx['RUNCOPY']}/mlflow.db"
    for which, name in (("latest", "ckpt-00000003.pt"), ("best", "best.pt")):
        assert main(["eval", "--run", trained["RUN"], "--tracking-uri", uri, "--checkpoint", which, "--tasks", "2",
                     "--out", str(tmp_path / which)]) == 0
        used = f"checkpoint: run {trained['RUN']} ({ctx['RUNCOPY']}/checkpoints/{name}), step "
        assert used in capsys.readouterr().out
        assert json.loads((tmp_path / which / "eval.json").read_text())["tasks"] == 2
    # The same evaluation again into its own folder replaces it; another run's evaluation there is refused.
    assert main(["eval", "--run", trained["RUN"], "--tracking-uri", uri, "--checkpoint", "best", "--tasks", "2",
                 "--out", str(tmp_path / "best")]) == 0
    assert main(["eval", "--run", trained["RUN"], "--tracking-uri", uri, "--checkpoint", "latest", "--tasks", "2",
                 "--out", str(tmp_path / "best")]) == 2
    assert "holds the evaluation of run" in capsys.readouterr().err
