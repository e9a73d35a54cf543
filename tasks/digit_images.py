"""Digit image sets for the MLP optimizees: scikit-learn's 8x8 digits (shipped inside the package) and MNIST read
from local IDX files (for users who downloaded it; metatrain never downloads at run time).

Both come back as flat float32 rows in [0, 1] and int64 labels 0..9, loaded once per process (``lru_cache``):
an MLP optimizee draws its minibatches from them on every step.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch
from metatrain.tasks.errors import DataError
from metatrain.tasks.sources import unit_pixels


def load_digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits: x (1797, 64) float32 in [0, 1] (pixel / 16), y (1797,) int64 in 0..9.

    They ship inside the scikit-learn package (no download), which is why they are the default: real images on
    every machine. Imported here, not at module level, so the rest of metatrain does not pay for scikit-learn.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("source 'digits' needs scikit-learn (pip install scikit-learn), which ships the 8x8 "
                        "digits") from None
    d = load_digits()
    return torch.from_numpy(d.data.astype(np.float32) / 16.0), torch.from_numpy(d.target.astype(np.int64))


#: IDX type byte -> big-endian numpy dtype (the format of LeCun's MNIST files).
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> tuple[int, np.ndarray]:
    """(magic number, array) of an IDX file (gzipped if its name ends in ``.gz``); DataError naming it if malformed.

    IDX: two zero bytes, a type byte, a dimension count n, n big-endian uint32 sizes, then the values row-major
    (MNIST images have magic 2051 = 0x00000803: uint8, 3 dims; labels 2049 = 0x00000801: uint8, 1 dim).
    """
    path = Path(path)
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path} ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(f"{path} is not an IDX file (magic bytes {raw[:4].hex() or 'missing'}, expected "
                        "00 00 <type> <dims>)")
    magic, ndim = int.from_bytes(raw[:4], "big"), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its header promises {ndim} dimensions")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    want = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != want:
        raise DataError(f"{path} has {len(raw)} bytes; its header (shape {list(shape)}, {dtype.name}) needs {want}")
    return magic, np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def mnist_files(root: str | os.PathLike, split: str = "train") -> tuple[Path, Path]:
    """The (images, labels) IDX files of MNIST ``split`` ('train' or 'test') under ``root``.

    Looks in ``root`` and in ``root/MNIST/raw`` (where ``torchvision.datasets.MNIST(root, download=True)`` puts
    them: that is how a user with internet obtains the files; metatrain never downloads at run time), each file
    plain or ``.gz``; DataError naming the missing file otherwise.
    """
    prefix = {"train": "train", "test": "t10k"}[_split(split)]
    root = Path(root)
    found = []
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        tried = [folder / (name + gz) for folder in (root, root / "MNIST" / "raw") for gz in ("", ".gz")]
        hit = next((p for p in tried if p.is_file()), None)
        if hit is None:
            raise DataError(f"MNIST file {name} not found in {root} (nor {root / 'MNIST' / 'raw'}, plain or .gz); "
                            f"get it with torchvision.datasets.MNIST({str(root)!r}, download=True)")
        found.append(hit)
    return found[0], found[1]


def load_mnist(root: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``split`` from local IDX files: x (n, 784) float32 in [0, 1] (pixel / 255), y (n,) int64 in 0..9."""
    images, labels = mnist_files(root, split)
    return _load_mnist_cached(str(images), str(labels), images.stat().st_mtime_ns, labels.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _load_mnist_cached(images: str, labels: str, *_mtimes) -> tuple[torch.Tensor, torch.Tensor]:
    """Once per process (and file version): the 60,000 training images are 188 MB as float32."""
    magic, x = read_idx(images)
    if magic != 2051 or x.ndim != 3:
        raise DataError(f"{images} is not an MNIST image file (magic number {magic}, expected 2051)")
    magic, y = read_idx(labels)
    if magic != 2049 or y.ndim != 1:
        raise DataError(f"{labels} is not an MNIST label file (magic number {magic}, expected 2049)")
    if len(x) != len(y):
        raise DataError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    if len(y) and int(y.max()) > 9:
        raise DataError(f"{labels} has label {int(y.max())}; MNIST labels are 0..9")
    x = unit_pixels(torch.from_numpy(x).reshape(len(x), -1))
    return x, torch.from_numpy(y.astype(np.int64))


@functools.lru_cache(maxsize=1)
def cached_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """load_digits_data() once per process (shared tensors: callers index them, never write to them)."""
    return load_digits_data()


def _split(split: str) -> str:
    if split not in ("train", "test"):
        raise DataError(f"split: expected 'train' or 'test', got {split!r}")
    return split
