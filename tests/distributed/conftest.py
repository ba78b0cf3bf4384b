"""One Ray cluster for the distributed tests: a head and a worker node on loopback.

Two raylets of one CPU each (the machines running the suite have two cores, shared), so
every distributed test also runs the multi-node path: decode tasks, encoder actors,
shard writes and shard hosts land on either node. Started once per session (a start
costs seconds) and shared by both test modules.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

# Ray's single-machine mode: every node, worker and driver (test subprocesses inherit
# it) uses 127.0.0.1, so nothing listens on the machine's network address. Read by Ray
# when it is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ray = pytest.importorskip("ray", reason="needs the ray extra (pip install 'clipsearch[ray]')")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
