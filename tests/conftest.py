"""Shared fixtures: one simulated heterogeneous Ray cluster for the whole test session.

Ray allows one ``ray.init`` per process, and starting nodes costs seconds each, so every test that
needs a cluster shares the session-scoped :func:`ray_cluster`; it starts only when such a test runs.
Its nodes declare ``accelerator_type:FAKE_A`` (two nodes) and ``accelerator_type:FAKE_B`` (one),
each with one (simulated) GPU and one CPU; the head node is a one-CPU CPU node.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pytest

# Measured here: without these Ray asks about usage stats and token auth (see DESIGN.md).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# A removed node is declared dead after ~1.5 s instead of ~30 s, so node-loss tests stay short.
FAST_FAILURE_DETECTION = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_initial_delay_ms": 0,
}


@dataclass
class SimCluster:
    """The simulated cluster and which node carries which type.

    Attributes:
        cluster: the ``ray.cluster_utils.Cluster``.
        address: its GCS address (the driver of this session is connected to it).
        head_id: node id of the head (a CPU node).
        type_nodes: accelerator type -> node ids.
        nodes: node id -> the cluster's node object (for ``remove_node``).
    """

    cluster: Any
    address: str
    head_id: str
    type_nodes: dict[str, list[str]] = field(default_factory=dict)
    nodes: dict[str, Any] = field(default_factory=dict)

    def add_gpu_node(self, accel: str) -> str:
        """Add a node with one simulated GPU of type ``accel``; return its node id."""
        node = self.cluster.add_node(num_cpus=1, num_gpus=1, resources={f"accelerator_type:{accel}": 1})
        self.type_nodes.setdefault(accel, []).append(node.node_id)
        self.nodes[node.node_id] = node
        return node.node_id

    def remove(self, node_id: str) -> None:
        """Kill a node's processes, as a machine failure would."""
        self.cluster.remove_node(self.nodes.pop(node_id), allow_graceful=False)
        for ids in self.type_nodes.values():
            if node_id in ids:
                ids.remove(node_id)


@pytest.fixture(scope="session")
def ray_cluster() -> SimCluster:
    """The session's simulated cluster: head (CPU), FAKE_A x2, FAKE_B x1; the driver is connected."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(num_cpus=1, include_dashboard=False, _system_config=FAST_FAILURE_DETECTION),
    )
    sim = SimCluster(cluster, cluster.address, cluster.head_node.node_id)
    sim.nodes[sim.head_id] = cluster.head_node
    for accel in ("FAKE_A", "FAKE_A", "FAKE_B"):
        sim.add_gpu_node(accel)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield sim
    finally:
        ray.shutdown()
        cluster.shutdown()
