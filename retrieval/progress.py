"""The one progress protocol of every long clipsearch operation.

A long call (``build``, ``add``, ``delete``, ``compact``, ``train``, the demo's
generate/evaluate/run) takes ``progress: ProgressCallback | None`` and calls it with
:class:`Progress` events. Each event says how far one *stage* is: ``done`` of ``total``
``unit`` (``total`` None while the amount is not known yet). Stages are reported as they
really run, in the order they run; a stage that repeats (one ``train index`` per shard)
starts again from ``done=0``. ``done`` never exceeds ``total``.

The CLI renders these events with one renderer (``clipsearch.cli.common.progress_bars``);
a backend can forward them to its own UI or logs. Importing this module is cheap (no
numpy, torch or faiss), so a backend can type its callbacks without paying for them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeAlias


@dataclass(frozen=True)
class Progress:
    """How far one stage of a long operation is.

    Example: ``Progress("embed", 300, 1000, "items", skipped=4)``.
    """

    # What is running, in a few lowercase words: "scan", "embed", "train index",
    # "tune index", "write shard", "commit", "train", "generate catalog", ...
    stage: str
    # Units of work finished in this stage so far (0 <= done <= total).
    done: int
    # Units of work the stage has in all; None while unknown (e.g. how many search
    # settings tuning will try before it reaches the target recall).
    total: int | None
    # What done/total count, plural: "items", "vectors", "shards", "steps", "products".
    unit: str
    # Of ``done``, units that produced nothing (a failed or already indexed item).
    skipped: int = 0
    # Stage-specific numbers for people and logs, in the order worth showing: the loss,
    # learning rate and logit scale of a training step, validation recall, the recall
    # of a tuning setting, the ingest's unchanged/failed split. Never needed to act on.
    detail: Mapping[str, float | int | str] = field(default_factory=dict, hash=False)


# What every long operation accepts as ``progress``.
ProgressCallback: TypeAlias = Callable[[Progress], None]


def ignore(event: Progress) -> None:
    """A callback that drops every event (for ``progress or ignore``)."""


def prefixed(progress: ProgressCallback | None, prefix: str) -> ProgressCallback | None:
    """Forward events to ``progress`` with ``prefix`` before their stage name, so that a
    call nested in a bigger operation keeps its stages apart ("index: embed")."""
    if progress is None:
        return None
    callback = progress

    def forward(event: Progress) -> None:
        callback(replace(event, stage=prefix + event.stage))

    return forward


def within(
    progress: ProgressCallback | None, *, offset: int, total: int | None
) -> ProgressCallback | None:
    """Forward events of a part of a stage as events of the whole: ``done`` of the part
    becomes ``offset + done`` of ``total`` (e.g. the validation images, loaded after the
    training images, continue the one "load images" bar)."""
    if progress is None:
        return None
    callback = progress

    def forward(event: Progress) -> None:
        callback(replace(event, done=offset + event.done, total=total))

    return forward
