"""Search an index whose shards live on Ray actors (the ``ray`` extra).

``DistributedSearchEngine.open(path, options=DistributedOptions(...))`` gives an object
with the shape of :class:`~clipsearch.retrieval.engine.SearchEngine`; see
:mod:`clipsearch.retrieval.distributed.coordinator` for the query path, placement,
failover and rollout, and ``docs/scale-out.md`` for running it on a cluster. Ray is
imported only when an engine is opened.
"""

from clipsearch.retrieval.distributed.coordinator import (
    DistributedOptions,
    DistributedSearchEngine,
    ShardsUnavailableError,
    assign_groups,
)

__all__ = [
    "DistributedOptions",
    "DistributedSearchEngine",
    "ShardsUnavailableError",
    "assign_groups",
]
