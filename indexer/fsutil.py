"""Crash-safe file writing: temp name, fsync, rename, fsync the directory.

A reader never sees a half-written file under a final name: either the old content (or
no file) or the complete new one. Temp names carry the ``.tmp-`` marker so that leftovers
of a killed writer are recognisable and removed by the next writer (under the lock).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_MARKER = ".tmp-"


def tmp_path_for(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}")


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        produce(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


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
            p.unlink(missing_ok=True)
            n += 1
    return n
