"""The service's warm profiling replica: one Ray Serve replica per GPU or CPU node, as the fleet's actors.

It wraps the fleet's :class:`~fleetprune.cluster.actors.ProfilerActor` (same backend, same chunk
measuring) and adds end-to-end measurement of a whole network, built by a function the api layer
injects (this package knows no models and no pruner).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from fleetprune.cluster.actors import ProfilerActor, actor_options
from fleetprune.cluster.devices import DeviceType, NodeInfo
from fleetprune.cluster.spec import BackendSpec
from fleetprune.cluster.work import Chunk, ChunkResult

log = logging.getLogger(__name__)

NODE_ID_LABEL = "ray.io/node-id"

NetworkBuilder = Callable[[dict, str], tuple]
"""``build(request, kind) -> (module, input_shape (N, C, H, W), dtype, memory_format)`` for ``POST /v1/measure``."""


class ProfilerReplica:
    """Measures chunks and networks on the one device its process owns (Serve: one request at a time).

    Args:
        spec: how to time (real or fake backend).
        device_type: the type it measures.
        build_network: the injected network builder (None: the service cannot measure networks).
    """

    def __init__(self, spec: BackendSpec, device_type: DeviceType, build_network: NetworkBuilder | None = None):
        self._actor = ProfilerActor(spec, device_type.kind, device_type.name, device_type.threads,
                                    device_type.label or None)
        self._info = self._actor.start()
        self._spec = spec
        self._kind = device_type.kind
        self._threads = device_type.threads
        self._build = build_network
        if self._info.get("error"):
            log.warning("profiling replica of %s cannot measure: %s", device_type.name, self._info["error"])

    def info(self) -> dict[str, Any]:
        """Node id, pid, device key and name, provenance, or the error that keeps it from measuring."""
        out = {k: v for k, v in self._info.items() if k != "device"}
        device = self._info.get("device")
        if device is not None:
            out.update(device_key=device.key, device_name=device.name, kind=device.kind)
        return out

    def measure(self, chunk: Chunk, seed: int) -> ChunkResult:
        """Measure one chunk with the fleet's code."""
        if self._info.get("error"):
            raise RuntimeError(f"this replica cannot measure: {self._info['error']}")
        return self._actor.measure(chunk, seed)

    def measure_network(self, request: dict[str, Any]) -> dict[str, Any]:
        """Build the network ``request`` names and time it end to end on this device.

        A fake backend cannot time anything on its make-believe device, so it times the network on
        this node's CPU with the quick protocol and says so (``"fake": true``).
        """
        from fleetprune.errors import ProfileError
        from fleetprune.profiler import TimingProtocol, cpu_device, measure_model
        from fleetprune.profiler.endtoend import measure_networks

        if self._build is None:
            raise ProfileError("this service was started without a network builder; it cannot measure networks")
        device = self._info.get("device")
        if device is None:
            raise ProfileError(f"this replica cannot measure: {self._info.get('error')}")
        model, shape, dtype, memory_format = self._build(request, self._kind)
        protocol = TimingProtocol.quick() if request.get("quick") else getattr(self._spec, "protocol", None)
        on = device
        if self._spec.is_fake:
            on, protocol, dtype = cpu_device(self._threads or 1), TimingProtocol.quick(), "fp32"
        rounds = int(request.get("rounds", 3))
        protocol = protocol or TimingProtocol()
        side = [self._build({**request, "widths": w}, self._kind)[0] for w in request.get("side_by_side") or []]
        if side:  # every network prepared once and timed in the same interleaved rounds
            found = measure_networks([model, *side], shape, on, dtype, memory_format, protocol, rounds=rounds)
            m, extra = found[0], {"side_by_side_ms": [protocol.latency(x) for x in found[1:]]}
        else:
            m, extra = measure_model(model, shape, on, dtype, memory_format, protocol=protocol, rounds=rounds), {}
        return {**extra,
            "device_key": device.key, "measured_ms": protocol.latency(m), "statistic": protocol.statistic,
            "min_ms": m.min_ms, "median_ms": m.median_ms, "p10_ms": m.p10_ms, "p90_ms": m.p90_ms, "n": m.n,
            "input_shape": list(shape), "dtype": dtype, "memory_format": memory_format,
            "params": sum(p.numel() for p in model.parameters()), "fake": self._spec.is_fake,
            "timed_on": on.key, "node_id": self._info.get("node_id"), "pid": self._info.get("pid"),
        }


def replica_options(device_type: DeviceType, node: NodeInfo) -> dict[str, Any]:
    """Serve ``ray_actor_options`` pinning a replica exactly as the fleet pins its actor on ``node``.

    The fleet's hard node affinity becomes Serve's node-id label selector; resources, accelerator
    type and environment are the fleet's own (:func:`~fleetprune.cluster.actors.actor_options`).
    """
    opts = actor_options(device_type, node)
    out = {k: opts[k] for k in ("num_cpus", "num_gpus", "accelerator_type", "runtime_env") if k in opts}
    out["label_selector"] = {NODE_ID_LABEL: node.node_id}
    return out


__all__ = ["NetworkBuilder", "ProfilerReplica", "replica_options"]
