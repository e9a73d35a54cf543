"""Checkpoints: exact resume, atomic writes, pruning, fallback past a corrupt file, and refusal of unsafe files."""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from metatrain.tasks.errors import MetatrainError

import metatrain.pipeline.checkpoint as ck
from metatrain.pipeline.checkpoint import (
    FORMAT,
    CheckpointError,
    CheckpointWarning,
    apply_checkpoint,
    build_checkpoint,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    load_latest,
    model_fingerprint,
    restore_rng,
    save_checkpoint,
    save_named,
)


def make_model(hidden: int = 8, out: int = 3) -> torch.nn.Module:
    # A BatchNorm gives the model a persistent buffer (running stats), so buffers are exercised too.
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, out))


def train_step(model, opt, sched) -> None:
    # The batch is drawn from the global torch and numpy RNGs: resuming only matches if the RNG state is restored.
    x = torch.randn(16, 4) + float(np.random.standard_normal())
    y = torch.randint(0, 3, (16,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def fresh(seed: int):
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched


def state_at(step: int, fp: str = "f" * 16) -> dict:
    model, opt, sched = fresh(0)
    return build_checkpoint(model, opt, step=step, fingerprint=fp, scheduler=sched, config={"train": {"steps": 9}})


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    # Uninterrupted: 10 steps.
    model, opt, sched = fresh(0)
    torch.manual_seed(1)
    np.random.seed(1)
    for _ in range(10):
        train_step(model, opt, sched)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_lr = sched.get_last_lr()

    # Interrupted: 5 steps, checkpoint, then a new process-like start (other init, other RNG) that resumes.
    model, opt, sched = fresh(0)
    torch.manual_seed(1)
    np.random.seed(1)
    for _ in range(5):
        train_step(model, opt, sched)
    fp = model_fingerprint(model, extra={"algorithm": {"name": "maml"}})
    path = save_checkpoint(tmp_path, build_checkpoint(model, opt, step=5, fingerprint=fp, scheduler=sched,
                                                      config={"train": {"steps": 10}}, extra={"best": 0.5}))
    assert path.name == "ckpt-00000005.pt"

    model2, opt2, sched2 = fresh(123)
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)
    state = load_latest(tmp_path, expected_fingerprint=fp)
    assert state["format"] == FORMAT and state["step"] == 5 and state["extra"] == {"best": 0.5}
    assert state["config"] == {"train": {"steps": 10}}
    for k, v in state["params"].items():
        assert torch.equal(v, model.state_dict()[k])
    assert "1.running_mean" in state["buffers"] and "1.running_mean" not in state["params"]
    assert apply_checkpoint(state, model2, opt2, sched2) == 5
    for _ in range(5):
        train_step(model2, opt2, sched2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert sched2.get_last_lr() == expected_lr and sched2.last_epoch == 10
    assert torch.equal(opt2.state_dict()["state"][0]["step"], torch.tensor(10.0))


def test_checkpoint_loads_with_plain_weights_only_torch_load(tmp_path):
    path = save_checkpoint(tmp_path, state_at(3))
    raw = torch.load(path, weights_only=True, map_location="cpu")
    assert raw["format"] == FORMAT and raw["step"] == 3
    assert isinstance(raw["optimizer"]["param_groups"][0]["betas"], tuple)


def test_rng_capture_restore_round_trip():
    rng = capture_rng()
    a = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    torch.rand(5), np.random.rand(7), random.random()
    restore_rng(rng)
    b = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


def test_fingerprint_tells_architectures_and_configs_apart():
    assert model_fingerprint(make_model()) == model_fingerprint(make_model())  # values do not matter
    assert model_fingerprint(make_model(out=3)) != model_fingerprint(make_model(out=5))
    assert model_fingerprint(make_model(hidden=8)) != model_fingerprint(make_model(hidden=16))
    assert model_fingerprint(make_model()) != model_fingerprint(torch.nn.Linear(4, 3))
    a = model_fingerprint(make_model(), extra={"algorithm": {"name": "maml", "inner_lr": 0.4}, "b": 1})
    b = model_fingerprint(make_model(), extra={"b": 1, "algorithm": {"inner_lr": 0.4, "name": "maml"}})
    c = model_fingerprint(make_model(), extra={"algorithm": {"name": "reptile", "inner_lr": 0.4}, "b": 1})
    assert a == b != c
    assert len(a) == 16 and int(a, 16) >= 0


def test_crash_in_os_replace_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = save_checkpoint(tmp_path, state_at(1))

    def boom(src, dst):
        raise OSError("disk pulled out")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError, match="disk pulled out"):
        save_checkpoint(tmp_path, state_at(2))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no temp file left behind
    assert latest_checkpoint(tmp_path) == first
    assert load_latest(tmp_path)["step"] == 1


def test_crash_in_the_middle_of_torch_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = save_checkpoint(tmp_path, state_at(1))
    real_save = torch.save

    def half_write(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a zip")  # torn bytes, as if the process died mid-write
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", half_write)
    with pytest.raises(KeyboardInterrupt):
        save_named(tmp_path, "best.pt", state_at(2))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, state_at(2))
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    assert load_latest(tmp_path)["step"] == 1


def test_temp_file_of_a_killed_writer_is_invisible_and_eventually_removed(tmp_path):
    first = save_checkpoint(tmp_path, state_at(1))
    torn = tmp_path / ".ckpt-00000002.pt.tmp-4242-deadbeef"
    torn.write_bytes(b"PK\x03\x04 torn")
    assert latest_checkpoint(tmp_path) == first
    assert load_latest(tmp_path)["step"] == 1
    old = os.path.getmtime(torn) - 2 * 3600
    os.utime(torn, (old, old))
    save_checkpoint(tmp_path, state_at(3))
    assert not torn.exists()


def test_keep_n_prunes_old_periodic_checkpoints_but_never_named_ones(tmp_path):
    save_named(tmp_path, "best.pt", state_at(1))
    for step in range(1, 7):
        save_checkpoint(tmp_path, state_at(step * 10), keep=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "ckpt-00000040.pt", "ckpt-00000050.pt", "ckpt-00000060.pt"]
    save_named(tmp_path, "final.pt", state_at(60))
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 1
    assert load_checkpoint(tmp_path / "final.pt")["step"] == 60
    with pytest.raises(ValueError):
        save_named(tmp_path, "ckpt-00000001.pt", state_at(1))


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    # After a fallback resume the folder can hold a newer (corrupt) file from the abandoned timeline.
    save_checkpoint(tmp_path, state_at(30))
    (tmp_path / "ckpt-00000030.pt").write_bytes(b"garbage")
    written = save_checkpoint(tmp_path, state_at(20), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000020.pt", "ckpt-00000030.pt"]
    with pytest.warns(CheckpointWarning, match="ckpt-00000030.pt"):
        assert load_latest(tmp_path)["step"] == 20
    # Training on reaches step 30 again and atomically replaces the bad file.
    save_checkpoint(tmp_path, state_at(30), keep=1)
    assert not written.exists()
    assert load_latest(tmp_path)["step"] == 30


def test_corrupt_newest_falls_back_to_previous_with_a_warning(tmp_path):
    save_checkpoint(tmp_path, state_at(1))
    newest = save_checkpoint(tmp_path, state_at(2))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    with pytest.warns(CheckpointWarning, match=r"ckpt-00000002\.pt.*falling back to ckpt-00000001\.pt"):
        state = load_latest(tmp_path)
    assert state["step"] == 1
    assert newest.exists()  # left for inspection, not deleted


def test_all_checkpoints_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, state_at(step)).write_bytes(b"\x00" * 10)
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="no readable checkpoint") as ei:
        load_latest(tmp_path)
    assert str(tmp_path) in str(ei.value) and "ckpt-00000001.pt" in str(ei.value)


def test_empty_or_missing_folder_means_fresh_start(tmp_path):
    assert load_latest(tmp_path / "nope") is None
    assert latest_checkpoint(tmp_path) is None


def test_fingerprint_mismatch_names_file_and_both_fingerprints(tmp_path):
    fp_a = model_fingerprint(make_model(out=3))
    fp_b = model_fingerprint(make_model(out=5))
    save_checkpoint(tmp_path, state_at(1, fp=fp_a))
    path = save_checkpoint(tmp_path, state_at(2, fp=fp_a))
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path, expected_fingerprint=fp_b)
    msg = str(ei.value)
    assert msg == (f"checkpoint {path} was written for a different model or config "
                   f"(fingerprint {fp_a} != {fp_b})")
    assert isinstance(ei.value, MetatrainError) and "\n" not in msg
    # No fallback to an older file on a mismatch: that one was written for the same other model.
    with pytest.raises(CheckpointError, match="different model or config"):
        load_latest(tmp_path, expected_fingerprint=fp_b)


class Payload:
    """Unpickling this runs ``Path(marker).touch()``: the classic pickle code-execution gadget."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class ShellPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_payload_really_executes_under_plain_pickle(tmp_path):
    # Proves the refusal test below tests something: a plain unpickle of the same payload does run it.
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(Payload(canary)))
    assert canary.exists()


@pytest.mark.parametrize("writer", ["torch_save", "raw_pickle", "shell_in_checkpoint"])
def test_pickled_code_is_refused_and_never_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt-00000009.pt"
    if writer == "torch_save":
        torch.save({"format": FORMAT, "params": Payload(marker)}, path)
    elif writer == "raw_pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        good = state_at(9)
        good["extra"] = {"x": ShellPayload(marker)}
        torch.save(good, path)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    assert ei.value.reason == "format"
    assert str(ei.value).startswith(f"checkpoint {path} is not a metatrain checkpoint")
    if writer != "raw_pickle":  # the unpickler's own reason, never torch's advice to load unsafely
        assert re.search(r"a weights-only load refuses it \((Unsupported global: )?.*GLOBAL ", str(ei.value)), \
            str(ei.value)
    assert "weights_only" not in str(ei.value) and "add_safe_globals" not in str(ei.value)
    assert not marker.exists()
    # The driver's path: the unsafe newest file is skipped with a warning, never executed.
    save_checkpoint(tmp_path, state_at(1))
    with pytest.warns(CheckpointWarning):
        assert load_latest(tmp_path)["step"] == 1
    assert not marker.exists()


def test_wrong_format_and_missing_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "ckpt-00000001.pt"
    with pytest.raises(CheckpointError, match=f"checkpoint {missing} does not exist"):
        load_checkpoint(missing)
    other = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, other)
    with pytest.raises(CheckpointError, match=rf"checkpoint {other} is not a metatrain checkpoint \(format None"):
        load_checkpoint(other)
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(CheckpointError, match=rf"checkpoint {junk} is (unreadable|not a metatrain)"):
        load_checkpoint(junk)


def test_saving_an_unloadable_object_fails_at_save_time(tmp_path):
    state = state_at(1)
    state["extra"] = {"callback": lambda: 1}
    with pytest.raises(TypeError, match=r"state\['extra'\]\['callback'\] is a .*function"):
        save_checkpoint(tmp_path, state)
    assert list(tmp_path.iterdir()) == []
    ok = state_at(2)
    ok["extra"] = {"best": np.float64(0.75), "n": np.int64(3), "arr": np.arange(3)}
    loaded = load_checkpoint(save_checkpoint(tmp_path, ok))
    assert loaded["extra"]["best"] == 0.75 and type(loaded["extra"]["best"]) is float
    assert torch.equal(loaded["extra"]["arr"], torch.arange(3))


def test_views_of_a_large_buffer_are_saved_compactly(tmp_path):
    flat = torch.zeros(1_000_000)
    state = state_at(1)
    state["params"] = {"w": flat[:10]}
    path = save_checkpoint(tmp_path, state)
    assert path.stat().st_size < 200_000  # not the 4 MB of the whole flat buffer
    assert torch.equal(load_checkpoint(path)["params"]["w"], torch.zeros(10))
