"""Crash-safe file writing: temp name, fsync, rename, fsync the directory.

A reader never sees a half-written file under a final name: either the old content (or
no file) or the complete new one. Temp names carry the ``.tmp-`` marker so that leftovers
of a killed writer are recognisable and removed by the next writer (under the lock).

A write that fails because the disk is full, the filesystem read-only or the folder not
writable raises :class:`IndexWriteError` (what, where, how to fix) after removing its
temp file, instead of a bare ``OSError``; callers above keep the previous version live.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from clipsearch.retrieval.errors import IndexWriteError

TMP_MARKER = ".tmp-"

# errno -> (what happened, how to fix it). Other OSErrors propagate unchanged.
_WRITE_ERRORS = {
    errno.ENOSPC: (
        "no space left on the device",
        "free disk space (e.g. `clipsearch index compact` removes unreferenced files) "
        "or write the index elsewhere, then re-run the same command",
    ),
    errno.EDQUOT: (
        "disk quota exceeded",
        "free space within your quota or write the index elsewhere, then re-run",
    ),
    errno.EFBIG: ("file too large for the filesystem", "write the index to another filesystem"),
    errno.EROFS: (
        "the filesystem is read-only",
        "remount it read-write or write the index to a writable folder",
    ),
    errno.EACCES: (
        "permission denied",
        "make the index folder writable for this user or write the index elsewhere",
    ),
    errno.EPERM: (
        "operation not permitted",
        "make the index folder writable for this user or write the index elsewhere",
    ),
    errno.EIO: ("input/output error", "check the disk (dmesg) and re-run"),
}


def write_error(e: OSError, path: Path | str, action: str = "writing") -> OSError:
    """``e`` as an :class:`IndexWriteError` when it is a storage failure, else ``e``."""
    if isinstance(e, IndexWriteError) or e.errno not in _WRITE_ERRORS:
        return e
    what, fix = _WRITE_ERRORS[e.errno]
    message = (
        f"{path}: {what} while {action} (errno {errno.errorcode.get(e.errno, e.errno)}); "
        f"nothing was committed and the index keeps its previous version; {fix}"
    )
    return IndexWriteError(message, code=e.errno, path=path)


def tmp_path_for(path: Path) -> Path:
    """A temp name unique per process and thread (two threads may write one path)."""
    return path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}-{threading.get_ident()}")


def fsync_dir(directory: Path) -> None:
    """Make a rename/creation inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush ``path``'s content to disk (for files written by a library we hand a path to)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_path(
    path: Path, produce: Callable[[Path], object], *, sync_dir: bool = True
) -> None:
    """Let ``produce(tmp)`` write a temp file, fsync it, rename it to ``path``.

    For writers that want a path rather than a file object (pyarrow, safetensors,
    shutil.copyfile). ``sync_dir=False`` skips the directory fsync, for callers that write
    many files into one folder and fsync the folder once at the end.
    """
    tmp = tmp_path_for(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        produce(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(path.parent)
    except OSError as e:
        _discard(tmp)
        raise write_error(e, path) from e
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):  # read-only filesystem: nothing was created either
        tmp.unlink(missing_ok=True)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` that reports a storage failure as :class:`IndexWriteError`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, path, "creating a folder") from e


def atomic_write(path: Path, write: Callable[[BinaryIO], object], *, sync_dir: bool = True) -> None:
    """Write ``path`` through ``write(file)`` to a temp name, fsync it, rename it into place."""

    def produce(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write_path(path, produce, sync_dir=sync_dir)


def atomic_write_bytes(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    atomic_write(path, lambda f: f.write(data), sync_dir=sync_dir)


def atomic_write_text(path: Path, text: str, *, sync_dir: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), sync_dir=sync_dir)


def remove_temp_files(directory: Path) -> int:
    """Delete leftovers of killed writers in ``directory``; returns how many were removed."""
    if not directory.is_dir():
        return 0
    n = 0
    for p in directory.iterdir():
        if TMP_MARKER in p.name and p.is_file():
            try:
                p.unlink(missing_ok=True)
            except OSError as e:
                raise write_error(e, p, "removing a leftover temp file") from e
            n += 1
    return n
