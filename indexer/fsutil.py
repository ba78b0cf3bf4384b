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


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(file)`` to a temp name, fsync it, rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


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
