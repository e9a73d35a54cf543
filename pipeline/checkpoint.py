"""Safe, atomic training checkpoints.

A checkpoint is one ``torch.save`` file holding a plain dict of tensors and plain values only, so it loads with
``torch.load(path, weights_only=True, map_location="cpu")``: loading never unpickles (and so never runs) arbitrary
objects, and a checkpoint written on a GPU machine loads on a CPU one. Its keys:

==============  ===========================================================================================
``format``      ``"metatrain-checkpoint/1"``; anything else is refused.
``fingerprint`` ``model_fingerprint(model, extra=<model + algorithm config>)``: resuming with another
                architecture, head size or algorithm is refused instead of half-loading.
``step``        int, the number of training steps already applied (resume continues at ``step``).
``params``      ``dict[str, Tensor]``: the model's parameters (``named_parameters`` names).
``buffers``     ``dict[str, Tensor]``: the model's persistent buffers (BatchNorm statistics and the like).
``optimizer``   the outer optimizer's ``state_dict()``.
``scheduler``   the LR scheduler's ``state_dict()``, or None.
``rng``         ``capture_rng()``: torch CPU (and, once initialised, CUDA) RNG state, numpy's and Python's
                global RNG state as tensors and ints.
``config``      the resolved run config as a JSON-able dict.
``extra``       dict of anything else plain (best validation accuracy, the MLflow run id, ...).
==============  ===========================================================================================

Files in a checkpoint folder::

    ckpt-00001000.pt   periodic checkpoints, named by step; only the newest ``keep`` survive
    best.pt, final.pt  named checkpoints (``save_named``), never pruned
    .ckpt-*.tmp-*      a write in progress (or a crashed one): invisible to readers

Every write goes to a hidden temporary file in the same folder, is flushed and fsynced, then ``os.replace``-d onto
its final name and the folder is fsynced: a crash at any moment leaves either the old file or the new one, never a
torn one under a checkpoint name.

Usage::

    fp = model_fingerprint(model, extra={"model": cfg["model"], "algorithm": cfg["algorithm"]})
    state = load_latest(out / "checkpoints", expected_fingerprint=fp)  # None on a fresh run
    if state is not None:
        step = apply_checkpoint(state, model, optimizer, scheduler)   # restores RNG too
    ...
    save_checkpoint(out / "checkpoints",
                    build_checkpoint(model, optimizer, step=step, fingerprint=fp, scheduler=scheduler,
                                     config=cfg, extra={"mlflow_run_id": tracker.run_id}), keep=3)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from metatrain.tasks.atomic import TMP_MARK, TMP_PREFIX, atomic_path
from metatrain.tasks.errors import MetatrainError

FORMAT = "metatrain-checkpoint/1"
REQUIRED_KEYS = ("format", "fingerprint", "step", "params", "buffers", "optimizer", "scheduler", "rng", "config",
                 "extra")

# Periodic checkpoints: exactly 8+ digits, so "ckpt-00000010.pt.tmp" or "ckpt-latest.pt" never count.
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})\.pt$")
# Temporary files (tasks/atomic.py) start with a dot, so no "ckpt-*.pt" glob, ours or a user's, ever matches them.
# A temp file this old belongs to a crashed writer (a checkpoint write takes seconds, not an hour): remove it.
_STALE_TMP_S = 3600.0


class CheckpointError(MetatrainError):
    """A checkpoint is missing, unreadable, not ours, or was written for another model/config.

    ``reason`` is one of ``"missing"``, ``"corrupt"``, ``"format"``, ``"fingerprint"``, ``"none_readable"``:
    ``load_latest`` falls back to an older file on the first three and stops on a fingerprint mismatch (an older
    checkpoint in the same folder would be for the same wrong model).
    """

    def __init__(self, message: str, *, reason: str, path: Path | None = None):
        super().__init__(" ".join(str(message).split()))  # one line, whatever torch put in it
        self.reason = reason
        self.path = path


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (unreadable) and an older one used instead."""


# --------------------------------------------------------------------------------------------------- fingerprint


def _canonical_json(obj: Any) -> str:
    # sort_keys + fixed separators: the same config always hashes the same, whatever dict order it was built in.
    # default=str keeps odd values (Paths, dtypes) hashable instead of failing the whole run.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)


def model_fingerprint(model: torch.nn.Module, extra: dict | None = None) -> str:
    """A short sha256 (16 hex chars) of the model's structure and ``extra`` (the model + algorithm config).

    Covers the class name and every parameter and buffer name, shape and dtype -- not the values, so it stays the
    same as training proceeds. Two architectures, or the same one with another head size, differ.
    The class's qualified name is used without its module path, so moving a class between modules does not
    orphan old checkpoints.
    """
    spec = {
        "class": type(model).__qualname__,
        "params": [[n, list(p.shape), str(p.dtype)] for n, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [[n, list(b.shape), str(b.dtype)] for n, b in model.named_buffers(remove_duplicate=False)],
        "extra": extra if extra is not None else {},
    }
    return hashlib.sha256(_canonical_json(spec).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict:
    """The global RNG states as tensors/ints (weights_only-loadable): torch CPU, CUDA (if initialised), numpy, Python.

    CUDA state is captured only when CUDA is already initialised here: querying it otherwise would initialise CUDA
    in a CPU-only driver (slow, and fatal after a fork).
    """
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert name == "MT19937"
    py_version, py_state, py_gauss = random.getstate()
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gaussian": float(cached),
        "python_version": int(py_version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),  # 625 ints < 2**32: exact in int64
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return rng


def restore_rng(rng: Mapping) -> None:
    """Set the global RNGs back to ``capture_rng()``'s state; keys that are absent are left alone.

    A CUDA state is restored only when this process sees the same number of CUDA devices (resuming a GPU run on a
    CPU machine is allowed; the CPU streams are still exact).
    """
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].to(torch.uint8))
    if "numpy_keys" in rng:
        keys = rng["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, int(rng["numpy_pos"]), int(rng["numpy_has_gauss"]),
                             float(rng["numpy_cached_gaussian"])))
    if "python_state" in rng:
        state = tuple(int(v) for v in rng["python_state"].tolist())
        random.setstate((int(rng["python_version"]), state, rng.get("python_gauss")))
    cuda = rng.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda])


# --------------------------------------------------------------------------------------------------- state


def _plain(obj: Any, where: str) -> Any:
    """A copy of ``obj`` reduced to what a weights-only load accepts, or TypeError naming the offending entry.

    Checking at save time turns "this checkpoint cannot be loaded" (found out hours later, at resume) into an
    immediate error at the line that put a function or a custom object into the state.
    """
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    # Subclasses (IntEnum, np.float64, a str Enum) become the plain type: the weights-only unpickler refuses them.
    for plain in (bool, int, float, str):
        if isinstance(obj, plain):
            return plain(obj.value) if hasattr(obj, "value") and isinstance(obj.value, plain) else plain(obj)
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        # torch.save writes a view's whole storage: a 10-element slice of a 100M-element flat parameter buffer
        # (as a parameter server may keep) would save all 100M. Copy such views down to their own elements.
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        return t
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint state {where} has a key {k!r} of type {type(k).__name__}; "
                                "keys must be str or int")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, torch.Size):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        # Plain tuples stay tuples (Adam's betas); namedtuples and other subclasses become plain tuples.
        return tuple(items) if isinstance(obj, tuple) else items
    if isinstance(obj, (torch.dtype, torch.device)):
        return obj  # both on torch's weights-only allowlist (optimizer and scheduler states may hold them)
    raise TypeError(f"checkpoint state {where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints "
                    "hold only tensors, numbers, strings, bools, None and lists/dicts of those")


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(params, buffers)`` from ``model.state_dict()``: parameters by name, and the persistent buffers."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    sd = model.state_dict()
    return {k: v for k, v in sd.items() if k in names}, {k: v for k, v in sd.items() if k not in names}


def build_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *, step: int,
                     fingerprint: str, scheduler: Any = None, config: dict | None = None,
                     extra: dict | None = None, rng: dict | None = None) -> dict:
    """The checkpoint dict for ``model`` + ``optimizer`` (+ ``scheduler``) after ``step`` applied steps.

    ``rng`` defaults to ``capture_rng()`` now: call this at the step boundary the run will resume from.
    """
    params, buffers = model_tensors(model)
    return checkpoint_state(params, buffers, optimizer.state_dict() if optimizer is not None else {}, step=step,
                            fingerprint=fingerprint, config=config, extra=extra, rng=rng,
                            scheduler=scheduler.state_dict() if scheduler is not None else None)


def checkpoint_state(params: dict, buffers: dict, optimizer_state: dict, *, step: int, fingerprint: str,
                     config: dict | None = None, extra: dict | None = None, rng: dict | None = None,
                     scheduler: dict | None = None) -> dict:
    """The one layout of a checkpoint (``FORMAT``), from tensors already detached (the parameter server has no
    ``nn.Module``: it calls this directly)."""
    return {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "step": int(step),
        "params": params,
        "buffers": buffers,
        "optimizer": optimizer_state,
        "scheduler": scheduler,
        "rng": rng if rng is not None else capture_rng(),
        "config": config if config is not None else {},
        "extra": extra if extra is not None else {},
    }


def apply_checkpoint(state: Mapping, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     scheduler: Any = None, *, rng: bool = True) -> int:
    """Load ``state`` into ``model`` (strictly: every name must match), optimizer, scheduler and the RNGs.

    Returns the step to continue from. Tensors are moved to the model's device by ``load_state_dict``; the
    optimizer state follows its parameters' device (``Optimizer.load_state_dict`` casts it).
    """
    model.load_state_dict({**state["params"], **state["buffers"]}, strict=True)
    if optimizer is not None and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if rng and state.get("rng"):
        restore_rng(state["rng"])
    return int(state["step"])


# --------------------------------------------------------------------------------------------------- writing


def _remove_stale_temps(directory: Path) -> None:
    now = time.time()
    for p in directory.glob(f"{TMP_PREFIX}*{TMP_MARK}*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                p.unlink()
        except OSError:
            pass  # another process cleaned it up first, or it is not ours to remove


def _atomic_save(state: Mapping, final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    # A KeyboardInterrupt mid-write included: the old checkpoint stays, the torn temp file goes.
    with atomic_path(final, durable=True) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    return final


def _validated(state: Mapping) -> dict:
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint state must be a dict, not {type(state).__name__}")
    state = {**state, "format": FORMAT}
    for key in ("fingerprint", "step"):
        if key not in state:
            raise ValueError(f"checkpoint state has no {key!r}")
    if not isinstance(state["step"], int) or isinstance(state["step"], bool) or state["step"] < 0:
        raise ValueError(f"checkpoint state 'step' must be an int >= 0, not {state['step']!r}")
    for key in REQUIRED_KEYS:
        state.setdefault(key, None if key == "scheduler" else {})
    return _plain(state, "state")


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """Where ``save_checkpoint`` puts the checkpoint of ``step``."""
    return Path(directory) / f"ckpt-{int(step):08d}.pt"


def _periodic(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every periodic checkpoint, oldest first; temp files and named ones excluded."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(directory: str | os.PathLike, state: Mapping, *, keep: int | None = 3) -> Path:
    """Atomically write ``ckpt-{step:08d}.pt`` into ``directory``, then keep only the newest ``keep`` of them.

    ``keep=None`` keeps all. Pruning never removes the file just written and never touches files with a higher
    step: after a fallback resume (newest was corrupt) those belong to the abandoned timeline and are overwritten
    when training reaches them again. Raises TypeError/ValueError (a bug in the caller) if ``state`` holds
    anything a weights-only load would refuse.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, not {keep}")
    directory = Path(directory)
    clean = _validated(state)
    final = _atomic_save(clean, checkpoint_path(directory, clean["step"]))
    _remove_stale_temps(directory)
    if keep is not None:
        older = [p for s, p in _periodic(directory) if s < clean["step"]]
        for p in older[: max(0, len(older) - (keep - 1))]:
            try:
                p.unlink()
            except FileNotFoundError:
                pass  # a concurrent writer pruned it already
    return final


def save_named(directory: str | os.PathLike, name: str, state: Mapping) -> Path:
    """Atomically write ``directory/name`` (``best.pt``, ``final.pt``); named checkpoints are never pruned."""
    if not name or "/" in name or os.sep in name or name.startswith(".") or _CKPT_RE.match(name):
        raise ValueError(f"checkpoint name {name!r} must be a plain file name, not hidden and not ckpt-NNNNNNNN.pt")
    return _atomic_save(_validated(state), Path(directory) / name)


# --------------------------------------------------------------------------------------------------- reading


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The periodic checkpoint with the highest step in ``directory`` (None if there is none).

    "Complete" by construction: only ``os.replace`` creates a ``ckpt-*.pt`` name; temp files never match.
    Whether it is readable is ``load_checkpoint``'s business (``load_latest`` falls back when it is not).
    """
    for _, p in reversed(_periodic(Path(directory))):
        try:
            if p.stat().st_size > 0:
                return p
        except FileNotFoundError:
            continue  # pruned by a concurrent writer between listing and stat
    return None


def _unpickler_reason(text: str) -> str:
    """The useful part of torch's weights-only refusal ("Unsupported global: GLOBAL posix.system ...").

    Only the unpickler's own sentence is kept: the rest of torch's message advises ``weights_only=False`` or
    allowlisting the global, which is exactly what must not be done with a file nobody vouches for.
    """
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text) or re.search(r"^\s*(.*\bGLOBAL\b.*)$", text, re.M)
    if m:
        reason = re.split(r"\.\s+Please use|\. Please", m.group(1))[0].strip().rstrip(".")
        return reason[:200]
    return "it holds objects other than tensors and plain values"


def load_checkpoint(path: str | os.PathLike, expected_fingerprint: str | None = None) -> dict:
    """Load one checkpoint with ``weights_only=True`` on the CPU, checking its format and fingerprint.

    Raises CheckpointError naming the file if it is missing, unreadable/truncated, not a metatrain checkpoint
    (including files a weights-only load refuses, such as a pickled object that would run code: refused, never
    executed), or written for another model/config.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist", reason="missing", path=path)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write itself; the refusal below says all that matters.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist", reason="missing", path=path) from None
    except Exception as e:
        import pickle

        first = (str(e).strip().splitlines() or [""])[0][:200]
        if isinstance(e, pickle.UnpicklingError):
            # torch's weights-only unpickler met a global it does not allow (a class, a function, os.system):
            # whatever the file is, it is not something we wrote, and nothing in it has been run. Quote only the
            # unpickler's reason: torch's first line advises weights_only=False, exactly what must not be done.
            why = _unpickler_reason(str(e))
            raise CheckpointError(f"checkpoint {path} is not a metatrain checkpoint: a weights-only load refuses it "
                                  f"({why})", reason="format", path=path) from None
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({type(e).__name__}: {first})",
                              reason="corrupt", path=path) from None
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt != FORMAT:
        got = f"format {fmt!r}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise CheckpointError(f"checkpoint {path} is not a metatrain checkpoint ({got}, expected {FORMAT!r})",
                              reason="format", path=path)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a complete metatrain checkpoint (no {', '.join(missing)})",
                              reason="format", path=path)
    if expected_fingerprint is not None and state["fingerprint"] != expected_fingerprint:
        raise CheckpointError(f"checkpoint {path} was written for a different model or config (fingerprint "
                              f"{state['fingerprint']} != {expected_fingerprint})", reason="fingerprint", path=path)
    return state


def load_latest(directory: str | os.PathLike, expected_fingerprint: str | None = None) -> dict | None:
    """The newest readable periodic checkpoint in ``directory``, or None if there is none at all.

    An unreadable newest file (truncated by a full disk, say) gives a CheckpointWarning and the next older one is
    tried; the bad file is left where it is for inspection. A fingerprint mismatch raises at once: the folder
    belongs to another model/config and an older file from it would be just as wrong. If checkpoints exist but
    none is readable, CheckpointError (starting from scratch silently would throw the run's progress away).
    """
    directory = Path(directory)
    candidates = [p for _, p in reversed(_periodic(directory))]
    if not candidates:
        return None
    failures = []
    for i, path in enumerate(candidates):
        try:
            return load_checkpoint(path, expected_fingerprint)
        except CheckpointError as e:
            if e.reason == "fingerprint":
                raise
            failures.append(path.name)
            nxt = candidates[i + 1].name if i + 1 < len(candidates) else None
            warnings.warn(f"{e}; " + (f"falling back to {nxt}" if nxt else "no older checkpoint left"),
                          CheckpointWarning, stacklevel=2)
    raise CheckpointError(f"no readable checkpoint in {directory} ({len(failures)} unreadable: "
                          f"{', '.join(failures)}); move them away to start over", reason="none_readable",
                          path=directory)
