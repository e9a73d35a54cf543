"""``metatrain prepare``: turn raw images into a verified task store, once.

    metatrain prepare omniglot --source ../shared/data/omniglot --out data/omniglot [--size 28]
    metatrain prepare imagefolder --source my_images/ --out data/mine [--size 28] [--channels 1] [--split all]

Idempotent: when ``--out`` already holds a complete store made from the same source files (sha256) with the same
settings, nothing is rewritten and the result says so. A store that is outdated, half-written or corrupt is rebuilt
from scratch in a temporary folder and swapped in atomically (see ``metatrain.tasks.store.write_store``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from metatrain.tasks.errors import DataError, MetatrainError
from metatrain.tasks.sources import iter_imagefolder, iter_omniglot, omniglot_inputs, sha256_file, sha256_tree
from metatrain.tasks.store import LEGACY_MANIFEST, MANIFEST, manifest_path, read_manifest, verify_store, write_store

OMNIGLOT_IMAGES = 32_460


@dataclass(frozen=True)
class PrepareResult:
    """What ``prepare`` did."""

    path: Path
    """The store folder."""
    manifest: dict
    """The store's manifest (new or existing)."""
    rebuilt: bool
    """False when the store was already complete and up to date (nothing written)."""
    reason: str
    """Why it was (re)built, or why not."""


MAX_SIZE = 1024  # pixels a side; few-shot benchmarks use 28 to 105 (Omniglot), 84 (mini-ImageNet)


def _check_size(size: int, channels: int = 1) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise MetatrainError(f"--size must be a positive integer, got {size!r}")
    if size > MAX_SIZE:
        raise MetatrainError(f"--size must be at most {MAX_SIZE} (every image is stored at size x size: "
                             f"{size} x {size} is {size * size * channels / 2**20:.0f} MiB an image), got {size}")
    if channels not in (1, 3):
        raise MetatrainError(f"--channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


def _existing(out: Path, wanted: dict) -> tuple[dict | None, str]:
    """The manifest of a complete, matching store at ``out``, or None and why it must be (re)built."""
    if not out.exists():
        return None, "new store"
    try:
        manifest = read_manifest(out)
        for key, value in wanted.items():
            if manifest.get(key) != value:
                return None, f"store was built with {key}={manifest.get(key)!r}, now {value!r}"
        verify_store(out, manifest)
    except DataError as e:
        return None, f"existing store is incomplete or corrupt ({e})"
    if manifest_path(out).name == LEGACY_MANIFEST:  # a store from before the rename: same content, new name
        os.replace(out / LEGACY_MANIFEST, out / MANIFEST)
        return manifest, f"store is complete and up to date; renamed its {LEGACY_MANIFEST} to {MANIFEST}"
    return manifest, "store is complete and up to date"


def _prepare(out: Path, wanted: dict, build: Callable[[], dict]) -> PrepareResult:
    manifest, reason = _existing(out, wanted)
    if manifest is not None:
        return PrepareResult(out, manifest, False, reason)
    return PrepareResult(out, build(), True, reason)


def _check_outside(out: Path, source: Path) -> None:
    """A store inside its own source would be read as part of the source by the next prepare (and change its
    checksum); the source inside the store would be deleted when the store is replaced."""
    o, src = out.resolve(), source.resolve()
    if o == src or o.is_relative_to(src) or src.is_relative_to(o):
        raise DataError(f"--out {out} and --source {source} overlap; write the store outside the source folder")


def prepare_omniglot(source: str | Path, out: str | Path, size: int = 28,
                     progress: Callable[[int], None] | None = None) -> PrepareResult:
    """Build (or confirm) the Omniglot store at ``out`` from the two archives (or unpacked folders) in ``source``."""
    _check_size(size)
    source, out = Path(source), Path(out)
    _check_outside(out, source)
    inputs = omniglot_inputs(source)
    sources = {p.name: (sha256_file(p) if p.is_file() else sha256_tree(p)) for p in inputs.values()}
    wanted = {"dataset": "omniglot", "image_shape": [1, size, size], "sources": sources}

    def build():
        classes = (raw for split, path in inputs.items() for raw in iter_omniglot(split, path))
        command = f"metatrain prepare omniglot --source {source} --out {out} --size {size}"
        return write_store(out, classes, dataset="omniglot", size=size, channels=1, invert=True, sources=sources,
                           prepare_command=command, progress=progress)

    return _prepare(out, wanted, build)


def prepare_imagefolder(source: str | Path, out: str | Path, size: int = 28, channels: int = 1, split: str = "all",
                        progress: Callable[[int], None] | None = None) -> PrepareResult:
    """Build (or confirm) a store from a folder with one sub-folder of images per class, all in partition ``split``;
    or from a folder of split folders (``train/``, ``val/``, ``test/``, each of class folders), one partition each."""
    _check_size(size, channels)
    if not split or "/" in split or "=" in split:
        raise MetatrainError(f"--split must be a plain name such as 'all' or 'train', got {split!r}")
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise DataError(f"image folder {source} does not exist")
    _check_outside(out, source)
    sources = {source.name: sha256_tree(source)}
    wanted = {"dataset": "imagefolder", "image_shape": [channels, size, size], "sources": sources}

    def build():
        return write_store(out, iter_imagefolder(source, split), dataset="imagefolder", size=size, channels=channels,
                           invert=False, sources=sources,
                           prepare_command=(f"metatrain prepare imagefolder --source {source} --out {out} "
                                            f"--size {size} --channels {channels} --split {split}"),
                           progress=progress)

    return _prepare(out, wanted, build)
