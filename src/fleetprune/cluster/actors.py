"""Profiling actors pinned to the devices of a fleet.

One actor per physical GPU (``num_gpus=1`` and the node's accelerator type) and one per CPU node
(``num_cpus`` = the threads it measures with), so two measuring actors never share a device or
cores. Each runs one chunk at a time (``max_concurrency=1``) with the profiler's own code, in a
process started with the allocator settings the profiler asks for.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from fleetprune.cluster.devices import DeviceType, NodeInfo
from fleetprune.cluster.discover import GPU_FALLBACK_TYPE
from fleetprune.cluster.spec import BackendSpec
from fleetprune.cluster.work import Chunk, ChunkResult, measure_chunk

log = logging.getLogger(__name__)


class ProfilerActor:
    """Measures chunks of configurations on the one device its process owns.

    The backend is built in :meth:`start`, not in ``__init__``, so a device that cannot be timed
    (no CUDA on a simulated GPU node, say) comes back as a clean message instead of a dead actor.
    """

    def __init__(self, spec: BackendSpec, kind: str, type_name: str, threads: int | None, label: str | None):
        self._args = (spec, kind, type_name, threads, label)
        self._backend: Any = None
        self._node_id = "unknown"

    def start(self) -> dict[str, Any]:
        """Build the backend; return the device, its table provenance, node id and pid, or the error."""
        import ray

        spec, kind, type_name, threads, label = self._args
        self._node_id = ray.get_runtime_context().get_node_id()
        info: dict[str, Any] = {"node_id": self._node_id, "pid": os.getpid()}
        try:
            from fleetprune.profiler import provenance

            device = spec.device(kind, type_name, threads=threads, label=label)
            self._backend = spec.build(device)
            info.update(device=device, provenance=provenance(device, getattr(self._backend, "protocol", None)))
        except Exception as exc:  # noqa: BLE001 - the driver reports it per device type
            info["error"] = f"{type(exc).__name__}: {exc}"
        return info

    def measure(self, chunk: Chunk, seed: int) -> ChunkResult:
        """Measure one chunk (seeded per chunk, so a retried chunk is shuffled the same way)."""
        return measure_chunk(self._backend, chunk.configs, seed=seed + chunk.index, node_id=self._node_id)

    def measure_networks(self, builders: list[Any], input_shape: tuple[int, ...], dtype: str, memory_format: str,
                         rounds: int = 3) -> dict[str, Any]:
        """Build each network here (``builder()``: architecture and weights travel as data) and time them
        side by side with this device's backend; the figures come back with where they were taken."""
        models = [build() for build in builders]
        found = self._backend.measure_networks(models, tuple(input_shape), dtype, memory_format, rounds=rounds)
        statistic = self._backend.protocol.statistic if self._backend.protocol is not None else "min"
        return {"ms": [m.latency(statistic) for m in found], "node_id": self._node_id, "pid": os.getpid(),
                "device_key": self._backend.device.key}


@dataclass
class ActorHandle:
    """A spawned actor, the node it was pinned to and the device type it measures."""

    handle: Any
    node: NodeInfo
    device_type: DeviceType


def actor_options(device_type: DeviceType, node: NodeInfo) -> dict[str, Any]:
    """The Ray options that pin one measuring actor of ``device_type`` to ``node``."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from fleetprune.profiler import ALLOCATOR_ENV

    env = dict(ALLOCATOR_ENV)
    opts: dict[str, Any] = dict(
        max_concurrency=1,
        max_restarts=0,
        max_task_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
    )
    if device_type.kind == "cuda":
        # One host core drives the GPU, where the node has a core per GPU.
        opts.update(num_gpus=1, num_cpus=1 if node.cpus >= node.gpus else 0)
        if device_type.name != GPU_FALLBACK_TYPE:
            opts["accelerator_type"] = device_type.name
        env["OMP_NUM_THREADS"] = "1"
    else:
        opts.update(num_cpus=device_type.threads)
        env["OMP_NUM_THREADS"] = str(device_type.threads)
    opts["runtime_env"] = {"env_vars": env}
    return opts


def spawn(device_type: DeviceType, spec: BackendSpec) -> list[ActorHandle]:
    """Start the measuring actors of one device type: one per GPU, or one per CPU node."""
    import ray

    remote = ray.remote(ProfilerActor)
    out = []
    for node in device_type.nodes:
        for _ in range(node.gpus if device_type.kind == "cuda" else 1):
            handle = remote.options(**actor_options(device_type, node)).remote(
                spec, device_type.kind, device_type.name, device_type.threads, device_type.label or None
            )
            out.append(ActorHandle(handle, node, device_type))
    log.info("started %d actors for %s", len(out), device_type.name)
    return out
