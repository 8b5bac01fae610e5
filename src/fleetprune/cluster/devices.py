"""What a fleet is made of: device types, the nodes that carry them, and picking types by name.

Plain data with no Ray in it, so the in-process path (``--ray-address none``) shares it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from fleetprune.errors import DeviceError

log = logging.getLogger(__name__)

KINDS = ("cpu", "cuda")

# Tokens of ``--devices`` that pick every type of a kind rather than one type.
_KIND_ALIASES = {"cpu": "cpu", "cpus": "cpu", "gpu": "cuda", "gpus": "cuda", "cuda": "cuda"}


@dataclass(frozen=True)
class NodeInfo:
    """One node of the cluster (or this machine, without Ray).

    Attributes:
        node_id: Ray node id (hex); ``"local"`` without Ray.
        address: the node's IP address or host name.
        cpus: logical CPUs the node declares.
        gpus: GPUs the node declares.
    """

    node_id: str
    address: str
    cpus: int
    gpus: int

    @property
    def short_id(self) -> str:
        """The first 8 characters of the node id, as Ray's own tools show it."""
        return self.node_id[:8]


@dataclass(frozen=True)
class DeviceType:
    """One kind of device of the fleet: every node (or GPU) of it measures into one table.

    Attributes:
        name: what users type in ``--devices``: the Ray accelerator type of a GPU type (``H100``,
            ``FAKE_A``), the table key of a CPU type (``cpu-amd-epyc-7b13-t8``).
        kind: ``'cpu'`` or ``'cuda'``.
        nodes: the nodes that carry this type.
        key: the table key a real measurement gets (``cpu_device(threads).key`` or
            ``cuda_device().key`` as read on a node); None when it could not be read.
        label: human-readable device name (CPU model or GPU name).
        threads: intra-op threads a CPU type is measured with; None for GPU types.
    """

    name: str
    kind: str
    nodes: tuple[NodeInfo, ...]
    key: str | None = None
    label: str = ""
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def slots(self) -> int:
        """How many measuring actors this type gets: one per GPU, or one per CPU node."""
        if self.kind == "cuda":
            return sum(max(n.gpus, 0) for n in self.nodes)
        return len(self.nodes)

    def describe(self) -> str:
        """One line: name, kind, node and device counts."""
        n = len(self.nodes)
        nodes = f"{n} node{'s' if n != 1 else ''}"
        if self.kind == "cuda":
            return f"{self.name}: {nodes}, {self.slots} GPU{'s' if self.slots != 1 else ''}"
        cpus = sum(node.cpus for node in self.nodes)
        return f"{self.name}: {nodes}, {cpus} CPUs, measured with {self.threads} threads per node"


@dataclass(frozen=True)
class Fleet:
    """The device types found on a cluster, and the nodes that cannot measure anything.

    Attributes:
        types: usable device types, GPU types first, each sorted by name.
        unusable: (node, reason) for every node that carries no usable device.
        address: the cluster address (None for this machine without Ray).
    """

    types: tuple[DeviceType, ...]
    unusable: tuple[tuple[NodeInfo, str], ...] = field(default=())
    address: str | None = None

    def names(self) -> list[str]:
        """The type names, in order."""
        return [t.name for t in self.types]

    def known(self) -> str:
        """The known types for an error message: ``FAKE_A, cpu-amd-epyc-t2 (table cpu-...)``."""
        if not self.types:
            return "none"
        out = []
        for t in self.types:
            out.append(t.name if t.key in (None, t.name) else f"{t.name} (table key {t.key})")
        return ", ".join(out)


def sort_types(types: Iterable[DeviceType]) -> tuple[DeviceType, ...]:
    """GPU types first, then CPU types, each by name (a stable order for output and tests)."""
    return tuple(sorted(types, key=lambda t: (t.kind != "cuda", t.name.lower())))


def parse_devices(spec: str | Sequence[str] | None) -> list[str]:
    """``'all'``, ``'A,B'`` or a list of names as a list of tokens (``[]`` means all)."""
    if spec is None:
        return []
    tokens = spec.split(",") if isinstance(spec, str) else list(spec)
    tokens = [t.strip() for t in tokens if t and t.strip()]
    if any(t.lower() == "all" for t in tokens):
        return []
    return tokens


def select_types(fleet: Fleet, devices: str | Sequence[str] | None, *, extra_keys: dict[str, str] | None = None) -> list[DeviceType]:
    """The types ``devices`` asks for, in fleet order.

    A token matches (case-insensitively) a type's name, its table key, a key in ``extra_keys``
    (type name -> another table key it writes, e.g. a fake backend's), or ``cpu``/``gpu`` for every
    type of that kind; ``all`` (the default) takes every type.

    Raises:
        DeviceError: the fleet has no usable device, or a token matches no type (the message
            lists the known ones).
    """
    if not fleet.types:
        raise DeviceError(_no_device_message(fleet))
    tokens = parse_devices(devices)
    if not tokens:
        return list(fleet.types)
    extra_keys = extra_keys or {}
    chosen: list[DeviceType] = []
    unknown: list[str] = []
    for token in tokens:
        low = token.lower()
        hits = [
            t for t in fleet.types
            if low in {t.name.lower(), (t.key or "").lower(), extra_keys.get(t.name, "").lower()}
            or _KIND_ALIASES.get(low) == t.kind
        ]
        if not hits:
            unknown.append(token)
        chosen.extend(h for h in hits if h not in chosen)
    if unknown:
        where = f"the cluster at {fleet.address}" if fleet.address else "this machine"
        raise DeviceError(
            f"unknown device type{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} on {where}; "
            f"known device types: {fleet.known()} (or cpu, gpu, all); see `fleetprune fleet`"
        )
    return [t for t in fleet.types if t in chosen]


def _no_device_message(fleet: Fleet) -> str:
    where = f"the Ray cluster at {fleet.address}" if fleet.address else "this machine"
    text = f"{where} has no usable device to profile"
    if fleet.unusable:
        text += " (" + "; ".join(f"node {n.short_id} ({n.address}): {why}" for n, why in fleet.unusable) + ")"
    return text + "; add a node with GPUs or free CPUs, lower --threads, or profile this machine with --ray-address none"
