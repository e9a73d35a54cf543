"""Prepared task stores: a hive-partitioned Parquet dataset plus ``_manifest.json``, written atomically, read once.

Layout of a store folder::

    _manifest.json                    counts, image shape, source sha256s, file sha256s, schema version, time
    split=background/part-0.parquet   one row per image: alphabet, character, class_id, drawer, source_file, image
    split=evaluation/part-0.parquet

Writing (``write_store``) builds the whole store in a hidden sibling folder and renames it into place, so a reader
never sees a half-written store and an interrupted ``prepare`` leaves the old store (if any) untouched. Reading
(``TaskStore.open``) checks every file against the manifest (size, row count, sha256) before trusting it, then
loads all images into one contiguous uint8 tensor with a class -> rows index: 32,460 Omniglot images at 28x28 are
25 MB, so each process (driver, every Ray worker) holds the whole store and samples episodes by indexing.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from metatrain.tasks.errors import DataError
from metatrain.tasks.sources import RawClass, decode_class, sha256_file

SCHEMA_VERSION = 1
# The leading "_": pyarrow's and pandas' dataset readers skip such names, so the store folder reads as a Parquet
# dataset (pd.read_parquet(store), pyarrow.dataset.dataset(store, partitioning="hive")).
MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"  # its name before; still read, and renamed by the next `prepare`


def manifest_path(path: Path) -> Path:
    """The manifest of the store at ``path``: ``_manifest.json``, or a store's written before as ``manifest.json``."""
    new, old = path / MANIFEST, path / LEGACY_MANIFEST
    return old if old.is_file() and not new.is_file() else new


def image_schema(pixels: int) -> pa.Schema:
    """The row schema of a store whose images hold ``pixels`` = channels*size*size bytes each."""
    return pa.schema([
        ("split", pa.string()),
        ("alphabet", pa.string()),
        ("character", pa.string()),
        ("class_id", pa.int32()),
        ("drawer", pa.int16()),
        ("source_file", pa.string()),
        ("image", pa.list_(pa.uint8(), pixels)),
    ])


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------

def _is_store_like(path: Path) -> bool:
    """True if ``path`` holds only what a (possibly damaged) store holds: replacing it loses nothing of the user's."""
    return all(p.name in (MANIFEST, LEGACY_MANIFEST) or (p.is_dir() and p.name.startswith("split="))
               for p in path.iterdir())


def _sweep_partials(out: Path) -> None:
    """Remove temporary folders left by an interrupted prepare of the same store (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        alive = pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid()
        if not alive:
            shutil.rmtree(p, ignore_errors=True)


def check_output_folder(out: Path) -> None:
    """Refuse to replace a folder that is not a metatrain store, so ``--out`` never deletes a user's files."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_store_like(out))):
        raise DataError(f"--out {out} exists and is not a metatrain store (no {MANIFEST}); "
                        "choose an empty or new folder")


def write_store(out: Path, classes: Iterable[RawClass], *, dataset: str, size: int, channels: int, invert: bool,
                sources: dict[str, str], prepare_command: str,
                progress: Callable[[int], None] | None = None) -> dict:
    """Decode ``classes`` into a new store at ``out``, atomically replacing an outdated one; return its manifest.

    Class ids are assigned in iteration order, which sources make sorted, so they are stable across runs.
    """
    check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        cols: dict[str, list] = {k: [] for k in ("split", "alphabet", "character", "class_id", "drawer", "source_file")}
        images = []
        per_split: dict[str, dict] = {}
        for class_id, raw in enumerate(classes):
            pix = decode_class(raw, size, channels, invert)
            n = pix.shape[0]
            images.append(pix.reshape(n, -1).numpy())
            cols["split"] += [raw.split] * n
            cols["alphabet"] += [raw.alphabet] * n
            cols["character"] += [raw.character] * n
            cols["class_id"] += [class_id] * n
            cols["drawer"] += list(raw.drawers)
            cols["source_file"] += list(raw.members)
            s = per_split.setdefault(raw.split, {"classes": 0, "images": 0, "alphabets": set(),
                                                 "min_images_per_class": n, "max_images_per_class": n})
            s["classes"] += 1
            s["images"] += n
            s["alphabets"].add(raw.alphabet)
            s["min_images_per_class"] = min(s["min_images_per_class"], n)
            s["max_images_per_class"] = max(s["max_images_per_class"], n)
            if progress:
                progress(n)
        if not images:
            raise DataError("the source holds no classes")
        pixels = channels * size * size
        flat = np.concatenate(images).reshape(-1)
        table = pa.table({k: pa.array(v, type=image_schema(pixels).field(k).type) for k, v in cols.items()}
                         | {"image": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint8()), pixels)},
                         schema=image_schema(pixels))
        # One file per split keeps the store simple to inspect with pandas/DuckDB; row groups of ~64k rows.
        pads.write_dataset(table, tmp, format="parquet", partitioning=["split"], partitioning_flavor="hive",
                           basename_template="part-{i}.parquet", max_rows_per_group=1 << 16, use_threads=False,
                           existing_data_behavior="error")
        files = {}
        for f in sorted(tmp.rglob("*.parquet")):
            rel = f.relative_to(tmp).as_posix()
            files[rel] = {"rows": pq.ParquetFile(f).metadata.num_rows, "bytes": f.stat().st_size,
                          "sha256": sha256_file(f)}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "dataset": dataset,
            "image_shape": [channels, size, size],
            "pixels": "ink-high: 0 = background, 255 = stroke" if invert else "as decoded (no inversion)",
            "classes": sum(s["classes"] for s in per_split.values()),
            "images": int(table.num_rows),
            "splits": {k: {**v, "alphabets": len(v["alphabets"] - {""})} for k, v in per_split.items()},
            "sources": sources,
            "files": files,
            "prepare_command": prepare_command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # Swap in: the old folder (damaged or outdated store) moves aside first, so at no moment does `out` hold a
        # mix of both; if we die between the two renames, `out` is simply missing and the next prepare rebuilds it.
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------------------
# Verifying and reading
# --------------------------------------------------------------------------------------------------------------

def read_manifest(path: Path) -> dict:
    mf = manifest_path(path)
    if not path.is_dir():
        raise DataError(f"no prepared store at {path} (run `metatrain prepare omniglot --out {path}` first)")
    if not mf.is_file():
        raise DataError(f"{mf} is missing: {path} is not a complete store (re-run `metatrain prepare`)")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{mf} is not valid JSON ({e}); re-run `metatrain prepare`") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        found = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise DataError(f"{mf} has schema_version {found}, expected {SCHEMA_VERSION}; re-run `metatrain prepare`")
    for key in ("image_shape", "files", "splits", "images", "classes"):
        if key not in manifest:
            raise DataError(f"{mf} lacks the field {key!r}; re-run `metatrain prepare`")
    return manifest


def verify_store(path: Path, manifest: dict | None = None, *, checksums: bool = True) -> dict:
    """Check that the files of a store are exactly those its manifest lists; return the manifest or raise DataError.

    Catches a truncated, replaced, missing or extra Parquet file. ``checksums=False`` skips the sha256 (size and
    row counts only), for callers that just verified the same store.
    """
    manifest = manifest or read_manifest(path)
    redo = f"re-run `{manifest.get('prepare_command') or 'metatrain prepare'}`"
    on_disk = {f.relative_to(path).as_posix() for f in path.rglob("*.parquet")}
    listed = set(manifest["files"])
    if on_disk != listed:
        extra, missing = sorted(on_disk - listed), sorted(listed - on_disk)
        raise DataError(f"store {path} does not match its manifest (missing {missing}, unexpected {extra}); {redo}")
    rows = 0
    for rel, meta in manifest["files"].items():
        f = path / rel
        if f.stat().st_size != meta["bytes"]:
            raise DataError(f"{f} has {f.stat().st_size} bytes, manifest says {meta['bytes']}; {redo}")
        if checksums and sha256_file(f) != meta["sha256"]:
            raise DataError(f"{f} fails its sha256 check against {manifest_path(path)}; {redo}")
        try:
            n = pq.ParquetFile(f).metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{f} is not a readable Parquet file ({e}); {redo}") from None
        if n != meta["rows"]:
            raise DataError(f"{f} has {n} rows, manifest says {meta['rows']}; {redo}")
        rows += n
    if rows != manifest["images"]:
        raise DataError(f"store {path} has {rows} images, manifest says {manifest['images']}; {redo}")
    return manifest


@dataclass(frozen=True)
class TaskStore:
    """All images of a prepared store in memory, indexed by class.

    ``images[class_offsets[c]:class_offsets[c+1]]`` are the images of class ``c`` (class ids are ``0..C-1``),
    sorted by drawer. Open with :meth:`open`, which caches one instance per store and process.
    """

    path: Path
    """The store folder."""
    manifest: dict
    """Its manifest (``_manifest.json``), as verified."""
    images: torch.Tensor
    """``(n_images, C, H, W)`` uint8, contiguous, ink-high for Omniglot."""
    class_offsets: torch.Tensor
    """``(n_classes + 1,)`` int64: the first row of each class, then the total."""
    class_split: tuple[str, ...]
    """The partition of each class (``background``/``evaluation``, ...)."""
    class_names: tuple[str, ...]
    """``alphabet/character`` of each class, for people."""

    _cache = {}
    _lock = threading.Lock()

    @property
    def num_classes(self) -> int:
        return len(self.class_split)

    @property
    def class_sizes(self) -> torch.Tensor:
        return self.class_offsets[1:] - self.class_offsets[:-1]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.class_split)))

    def classes_of(self, split: str) -> np.ndarray:
        """Class ids of one partition, ascending."""
        return np.flatnonzero(np.asarray(self.class_split) == split)

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True) -> TaskStore:
        """Load (once per process; later calls return the cached store) and verify a prepared store."""
        path = Path(path).resolve()
        manifest = read_manifest(path)
        key = (str(path), manifest.get("created"), json.dumps(manifest["files"], sort_keys=True))
        with cls._lock:
            if key in cls._cache:
                return cls._cache[key]
            if verify:
                verify_store(path, manifest)
            store = cls._load(path, manifest)
            cls._cache = {key: store}  # one store per process at a time is the common case; drop stale ones
            return store

    @classmethod
    def _load(cls, path: Path, manifest: dict) -> TaskStore:
        shape = tuple(manifest["image_shape"])
        pixels_per_image = int(np.prod(shape))
        try:
            files = [str(path / rel) for rel in sorted(manifest["files"])]
            # The system allocator and a single thread: Arrow's default pool (mimalloc) and its readahead threads
            # keep ~300 MB of RSS per process after a 25 MB read, paid again in every Ray worker.
            table = pads.dataset(files, format="parquet", partitioning="hive", partition_base_dir=str(path)).to_table(
                columns=["split", "alphabet", "character", "class_id", "drawer", "image"],
                use_threads=False, memory_pool=pa.system_memory_pool())
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"cannot read store {path} ({e}); re-run `metatrain prepare`") from None
        if table.schema.field("image").type.list_size != pixels_per_image:
            raise DataError(f"store {path}: image column holds {table.schema.field('image').type.list_size} bytes "
                            f"per image, manifest says shape {list(shape)}; re-run `metatrain prepare`")
        # Files come back in any order: sort rows so each class is one contiguous run, drawers ascending. Done in
        # numpy on zero-copy views of the Arrow buffers, so the images are copied exactly once, into their tensor.
        class_id = table.column("class_id").to_numpy()
        order = np.lexsort((table.column("drawer").to_numpy(), class_id))
        chunks = [c.values.to_numpy().reshape(-1, pixels_per_image) for c in table.column("image").chunks]
        flat = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        images = torch.from_numpy(flat[order]).view(-1, *shape)
        class_id = class_id[order]
        n_classes = int(class_id.max()) + 1
        counts = np.bincount(class_id, minlength=n_classes)
        if (counts == 0).any() or n_classes != manifest["classes"]:
            raise DataError(f"store {path}: class ids are not 0..{manifest['classes'] - 1}; re-run `metatrain prepare`")
        offsets = np.zeros(n_classes + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        first = order[offsets[:-1]]  # table rows of each class's first image
        split, alphabet, character = (table.column(k).take(first).to_pylist()
                                      for k in ("split", "alphabet", "character"))
        names = tuple(f"{a}/{c}" if a else c for a, c in zip(alphabet, character))
        return cls(path, manifest, images, torch.from_numpy(offsets), tuple(split), names)
