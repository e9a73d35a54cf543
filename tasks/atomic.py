"""Atomic file replacement: readers see the old file or the new one, never a torn write.

    with atomic_path(out / "eval.json") as tmp:
        tmp.write_text(text)

The content goes to a hidden temporary file in the same folder (``.NAME.tmp-PID-RANDOM``, so two writers never share
one), which is ``os.replace``-d onto the final name only once the block ends without an exception; on an exception
(KeyboardInterrupt included) the temporary file is removed and the old file stays. ``durable=True`` also fsyncs the
file before the rename and the folder after it, so the new name survives a power cut.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = "."
TMP_MARK = ".tmp-"


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename is only durable then); best effort where the filesystem refuses."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """A temporary path next to ``final`` to write; it replaces ``final`` when the block succeeds."""
    final = Path(final)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, final)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: name the one we wrote
            raise OSError(e.errno, e.strerror or str(e), str(final)) from e
        raise
    if durable:
        fsync_dir(final.parent)
