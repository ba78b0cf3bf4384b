"""Committing a version: write the manifest, then swap ``CURRENT``.

Callers write every new data file first (through :mod:`clipsearch.indexer.fsutil`); ``commit`` then
writes ``manifests/vNNNNNN.json`` the same crash-safe way and finally replaces
``CURRENT``. Until that last rename, readers keep seeing the previous version; after it,
the new one. A crash in between leaves an unreferenced manifest that the next commit
skips over (version numbers only grow) and ``index compact`` removes.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from clipsearch.indexer.fsutil import atomic_write_bytes
from clipsearch.retrieval.manifest import (
    CURRENT_FILE,
    Manifest,
    list_versions,
    manifest_path,
    version_name,
)

log = logging.getLogger(__name__)


def next_version(root: Path) -> int:
    """A version number higher than every manifest on disk, committed or not."""
    versions = list_versions(root)
    return (versions[-1] if versions else 0) + 1


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def commit(root: Path, manifest: Manifest) -> Manifest:
    """Write ``manifest`` and make it the live version. Returns it as written."""
    manifest = replace(manifest, created_at=utc_now())
    path = root / manifest_path(manifest.version)
    if path.exists():
        raise FileExistsError(f"{path} already exists; manifests are immutable")
    atomic_write_bytes(path, manifest.to_json().encode("utf-8"))
    _crash_point("commit:manifest")
    atomic_write_bytes(root / CURRENT_FILE, f"{version_name(manifest.version)}.json\n".encode())
    log.info("committed %s version %d (%s)", root, manifest.version, manifest.operation)
    return manifest


def _crash_point(stage: str) -> None:
    from clipsearch.indexer.crash import crash_point

    crash_point(stage)
