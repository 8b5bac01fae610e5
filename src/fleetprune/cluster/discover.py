"""Finding the device types of a Ray cluster.

GPU types come from the ``accelerator_type:<T>`` resource Ray puts on every GPU node (a node with
GPUs but no such resource is of type ``GPU``). Nodes without GPUs are CPU nodes, grouped by the
table key the profiler gives their CPU, ``cpu_device(threads).key``; that key is read by a tiny
task pinned to each node, because node resources do not say which CPU a node has. GPU nodes get
the same probe on one node per type (with a sliver of a GPU) so their table key is known before any
actor starts; if the probe cannot answer, the actors report the key.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fleetprune.cluster.devices import DeviceType, Fleet, NodeInfo, sort_types

log = logging.getLogger(__name__)

ACCEL_PREFIX = "accelerator_type:"
GPU_FALLBACK_TYPE = "GPU"
PROBE_TIMEOUT_S = 120.0
# A sliver of a GPU makes Ray expose one device to the probe without taking it from anyone.
PROBE_GPU_FRACTION = 0.001


def probe_device(kind: str, threads: int | None) -> dict[str, Any]:
    """Run on a node: the profiler's key and name of its CPU (with ``threads``) or first GPU."""
    try:
        from fleetprune.profiler.device import cpu_device, cuda_device

        device = cpu_device(threads) if kind == "cpu" else cuda_device(0)
    except Exception as exc:  # noqa: BLE001 - reported as the node's problem
        return {"key": None, "label": "", "error": f"{type(exc).__name__}: {exc}", "pid": os.getpid()}
    return {"key": device.key, "label": device.name, "error": None, "pid": os.getpid()}


def cluster_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the connected cluster as Ray reports them."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def discover(*, threads: int | None = None, probe_gpus: bool = True,
             probe_timeout_s: float = PROBE_TIMEOUT_S, address: str | None = None) -> Fleet:
    """The device types of the connected Ray cluster.

    Args:
        threads: threads every CPU node is measured with (one actor per node takes that many
            CPUs); default: each node's whole CPU count.
        probe_gpus: read the table key of each GPU type on its nodes (needs torch with CUDA there).
        probe_timeout_s: how long to wait for the probes.
        address: the cluster address, for messages.

    Nodes that cannot measure (no CPUs, fewer CPUs than ``threads``, fleetprune not importable)
    are listed in :attr:`Fleet.unusable` with the reason.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    gpu_groups: dict[str, list[NodeInfo]] = {}
    cpu_nodes: list[tuple[NodeInfo, int]] = []
    unusable: list[tuple[NodeInfo, str]] = []
    for raw in cluster_nodes():
        res = raw.get("Resources", {})
        node = NodeInfo(
            node_id=raw["NodeID"],
            address=raw.get("NodeManagerAddress", "?"),
            cpus=int(res.get("CPU", 0)),
            gpus=int(res.get("GPU", 0)),
        )
        accel = sorted(k[len(ACCEL_PREFIX):] for k in res if k.startswith(ACCEL_PREFIX))
        if node.gpus > 0:
            if len(accel) > 1:
                log.warning("node %s declares several accelerator types %s; using %s", node.short_id, accel, accel[0])
            gpu_groups.setdefault(accel[0] if accel else GPU_FALLBACK_TYPE, []).append(node)
        elif accel:
            unusable.append((node, f"accelerator {accel[0]} without GPUs (not a device fleetprune can time)"))
        else:
            want = threads or node.cpus
            if node.cpus < 1:
                unusable.append((node, "declares no CPUs"))
            elif node.cpus < want:
                unusable.append((node, f"has {node.cpus} CPUs, fewer than --threads {want}"))
            else:
                cpu_nodes.append((node, want))

    probe = ray.remote(probe_device)
    # max_calls=1: the worker exits afterwards instead of idling with a CUDA context on the GPU.
    gpu_probe = ray.remote(max_calls=1)(probe_device)
    refs: dict[Any, tuple[str, NodeInfo, Any]] = {}
    for node, want in cpu_nodes:
        ref = probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote("cpu", want)
        refs[ref] = ("cpu", node, want)
    if probe_gpus:
        # One node per type: Ray's accelerator type already says all its nodes carry the same GPU.
        for name, nodes in gpu_groups.items():
            ref = gpu_probe.options(num_cpus=0, num_gpus=PROBE_GPU_FRACTION,
                                    scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[0].node_id, soft=False)
                                    ).remote("cuda", None)
            refs[ref] = ("cuda", nodes[0], name)
    answers = _gather(refs, probe_timeout_s)

    types: list[DeviceType] = []
    cpu_groups: dict[str, list[NodeInfo]] = {}
    cpu_meta: dict[str, tuple[str, int]] = {}
    for node, want in cpu_nodes:
        ans = answers.get(node.node_id + ":cpu")
        if ans is None or ans["key"] is None:
            unusable.append((node, _probe_problem(ans, probe_timeout_s)))
            continue
        cpu_groups.setdefault(ans["key"], []).append(node)
        cpu_meta[ans["key"]] = (ans["label"], want)
    for key, nodes in cpu_groups.items():
        label, want = cpu_meta[key]
        types.append(DeviceType(name=key, kind="cpu", nodes=tuple(nodes), key=key, label=label, threads=want))
    for name, nodes in gpu_groups.items():
        ans = answers.get(nodes[0].node_id + ":cuda")
        if probe_gpus and (ans is None or ans["key"] is None):
            log.warning("GPU type %s: could not read its device on node %s (%s); its actors will report it", name,
                        nodes[0].short_id, _probe_problem(ans, probe_timeout_s))
        key = ans["key"] if ans else None
        types.append(DeviceType(name=name, kind="cuda", nodes=tuple(nodes), key=key,
                                label=(ans or {}).get("label") or name))
    fleet = Fleet(sort_types(types), tuple(unusable), address)
    log.info("fleet: %s", "; ".join(t.describe() for t in fleet.types) or "no usable device")
    return fleet


def _gather(refs: dict[Any, tuple[str, NodeInfo, Any]], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Probe answers keyed ``<node_id>:<kind>``; a probe that fails or times out is left out."""
    import ray

    if not refs:
        return {}
    done, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    out: dict[str, dict[str, Any]] = {}
    for ref in done:
        kind, node, _ = refs[ref]
        try:
            out[f"{node.node_id}:{kind}"] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            out[f"{node.node_id}:{kind}"] = {"key": None, "label": "", "error": _first_line(exc)}
    for ref in late:
        ray.cancel(ref, force=True)
    return out


def _probe_problem(answer: dict[str, Any] | None, timeout_s: float) -> str:
    if answer is None:
        return f"did not answer a probe within {timeout_s:g} s (busy or unreachable node)"
    err = answer.get("error") or "unknown error"
    if "ModuleNotFoundError" in err or "No module named" in err:
        return f"cannot import fleetprune there; install it on every node ({err})"
    return f"probe failed: {err}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
