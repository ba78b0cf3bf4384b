"""Deterministic crash points for testing crash safety.

Set ``CLIPSEARCH_CRASH_AT=<stage>:<n>`` and the process kills itself with SIGKILL (no
cleanup, no finally blocks, exactly like ``kill -9``) the ``n``-th time it reaches
``crash_point(stage)``. Stages: ``embed:item`` (each embedded item, before it is
buffered), ``spill:written`` (a checkpoint's spill files and journal entry written),
``shard:written`` (after a shard's files are written and journaled),
``commit:manifest`` (manifest written, CURRENT not yet swapped), ``compact:shard``.
Unset, a crash point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "CLIPSEARCH_CRASH_AT"
_hits: dict[str, int] = {}


def crash_point(stage: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    want_stage, _, count = spec.rpartition(":")
    if want_stage != stage:
        return
    _hits[stage] = _hits.get(stage, 0) + 1
    if _hits[stage] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
