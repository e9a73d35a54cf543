"""The command line: exit codes, one-line errors, and the printed sample episode."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

from metatrain.pipeline.cli import main


def test_prepare_and_sample(tiny_source, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["prepare", "omniglot", "--source", str(tiny_source), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert first.startswith(f"wrote {out} (new store)")
    assert "background        6 classes      120 images" in first
    assert main(["prepare", "omniglot", "--source", str(tiny_source), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"nothing to do: {out} (store is complete and up to date)")
    assert main(["sample", "--data", str(out), "--ways", "3", "--shots", "2", "--queries", "4",
                 "--split", "evaluation"]) == 0
    text = capsys.readouterr().out
    assert "3-way 2-shot, 4 queries/class" in text
    assert "support_x (6, 1, 28, 28) torch.float32, support_y [0, 0, 1, 1, 2, 2]" in text
    assert text.count("Gamma/character0") == 3


def test_source_from_environment(tiny_source, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("METATRAIN_OMNIGLOT_SOURCE", str(tiny_source))
    assert main(["prepare", "omniglot", "--out", str(tmp_path / "s")]) == 0
    monkeypatch.delenv("METATRAIN_OMNIGLOT_SOURCE")
    assert main(["prepare", "omniglot", "--out", str(tmp_path / "s2")]) == 2
    assert "pass --source DIR or set METATRAIN_OMNIGLOT_SOURCE" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["prepare", "omniglot", "--source", "/nonexistent", "--out", "OUT"], "/nonexistent does not exist"),
    (["prepare", "omniglot", "--source", "SRC", "--out", "OUT", "--size", "0"], "--size must be a positive integer"),
    (["sample", "--data", "/nonexistent/store"], "no prepared store at /nonexistent/store"),
    (["sample", "--data", "STORE", "--ways", "10"], "ways = 10 exceeds the 3 classes of split 'evaluation'"),
    (["sample", "--data", "STORE", "--shots", "15", "--queries", "6"], "shots \\+ queries = 21 exceeds"),
    (["sample", "--data", "STORE", "--split", "bakground"], "unknown split 'bakground'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tiny_source, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["prepare", "omniglot", "--source", str(tiny_source), "--out", str(store)]) == 0
    capsys.readouterr()
    subst = {"SRC": str(tiny_source), "OUT": str(tmp_path / "out"), "STORE": str(store)}
    assert main([subst.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metatrain: error: ") and err.count("\n") == 1
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_python_dash_m_and_argparse_errors():
    r = subprocess.run([sys.executable, "-m", "metatrain.pipeline", "prepare", "nope"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "metatrain.pipeline", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "prepare" in r.stdout


@pytest.mark.parametrize("argv, message", [
    (["train", "configs/omniglot_fomaml_5w1s.yaml", "--set", "train.stpes=3"],
     "unknown config key 'train.stpes' \\(did you mean 'train.steps'\\?\\)"),
    (["train", "configs/omniglot_fomaml_5w1s.yaml", "--set", "trainsteps"], "invalid --set 'trainsteps'"),
    (["train", "configs/omniglot_fomaml_5w1s.yaml", "--set", "optim.lr=fast"], "optim.lr must be float"),
    (["train", "configs/nope.yaml"], "config file configs/nope.yaml does not exist"),
    (["train", "configs/omniglot_fomaml_5w1s.yaml", "--set", "data.path=/nonexistent"],
     "no prepared store at /nonexistent; make it with `metatrain prepare omniglot"),
    (["train", "configs/omniglot_fomaml_5w1s.yaml", "--set", "data.path=STORE", "--set", "data.ways=3",
      "--set", "data.train_split=background", "--set", "data.val_split=evaluation", "--ray-address", "127.0.0.1:1"],
     "--ray-address 127.0.0.1:1: cannot connect to a Ray cluster there"),
    (["eval", "--model", "runs:/abc"], "--model must look like models:/NAME@ALIAS"),
    (["eval", "--run", "abc", "--tracking-uri", "sqlite:///TMP/mlflow.db"], "--run abc: no such metatrain run in sqlite:///"),
])
def test_train_and_eval_bad_input(argv, message, tiny_source, tmp_path, capsys, monkeypatch):
    import re

    monkeypatch.chdir(REPO)
    store = tmp_path / "store"
    assert main(["prepare", "omniglot", "--source", str(tiny_source), "--out", str(store)]) == 0
    capsys.readouterr()
    argv = [a.replace("STORE", str(store)).replace("TMP", str(tmp_path)) for a in argv]
    assert main([*argv, "--out", str(tmp_path / "out")] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("metatrain: error: "), err
    assert re.search(message, err[-1]), err[-1]
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("wrap_in_ray", [False, True])
def test_an_io_error_is_one_line_with_the_path_and_what_to_do(wrap_in_ray, monkeypatch, capsys):
    """Disk full (here, or in the parameter server's checkpoint write, which Ray hands back as a RayTaskError with
    the worker's traceback): one line naming the path, exit 1."""
    import errno

    from ray.exceptions import RayTaskError

    from metatrain.pipeline import cli

    error = OSError(errno.ENOSPC, "No space left on device", "/data/run/checkpoints/.ckpt-00000007.pt.tmp-1-ab")
    if wrap_in_ray:
        error = RayTaskError("ParameterServer.checkpoint", "Traceback (most recent call last):\n" + "  line\n" * 60,
                             error).as_instanceof_cause()
        assert isinstance(error, OSError)

    def full(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "eval", full)
    assert cli.main(["eval", "--run", "abc"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["metatrain: error: /data/run/checkpoints/.ckpt-00000007.pt.tmp-1-ab: No space left on "
                                "device; the disk is full: free space there or pass another --out"]
