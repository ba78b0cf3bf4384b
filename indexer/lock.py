"""One writer at a time: an exclusive lock file holding the writer's pid and host.

The lock file is created atomically with its content (written to a temp name, then
hard-linked to ``LOCK``, which fails if it exists), so it is never seen empty. A lock
left by a process that no longer exists on this host is stale: it is reported in the
log and taken over. A lock from another host cannot be checked and is never taken over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from clipsearch.indexer.fsutil import make_dirs, write_error
from clipsearch.retrieval.errors import IndexLockedError

log = logging.getLogger(__name__)

LOCK_FILE = "LOCK"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class IndexLock:
    """Context manager holding ``<root>/LOCK`` for one write operation."""

    def __init__(self, root: Path, operation: str) -> None:
        self.root = root
        self.path = root / LOCK_FILE
        self.operation = operation
        self._held = False

    def acquire(self) -> None:
        make_dirs(self.root)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "operation": self.operation,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp = self.root / f"{LOCK_FILE}.tmp-{os.getpid()}"
        try:
            tmp.write_text(json.dumps(info), encoding="utf-8")
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise write_error(e, self.path, "taking the index lock") from e
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    self._handle_existing()
                    continue
                except OSError as e:
                    raise write_error(e, self.path, "taking the index lock") from e
                self._held = True
                return
        finally:
            tmp.unlink(missing_ok=True)
        raise IndexLockedError(f"{self.path}: could not take the index lock (it keeps changing)")

    def _handle_existing(self) -> None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile: retry
        except (ValueError, KeyError, TypeError) as e:
            raise IndexLockedError(
                f"{self.path}: unreadable lock file; if no clipsearch writer is running on "
                "this index, delete it and retry"
            ) from e
        if host == socket.gethostname() and not _pid_alive(pid):
            log.warning("taking over stale lock %s of dead process %d (%s)", self.path, pid, holder)
            self.path.unlink(missing_ok=True)
            return
        raise IndexLockedError(
            f"{self.root}: another writer holds the index lock ({holder.get('operation', '?')} "
            f"by pid {pid} on {host} since {holder.get('since', '?')}); wait for it to finish. "
            f"If that process is gone, delete {self.path}"
        )

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> IndexLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
