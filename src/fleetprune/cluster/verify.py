"""Measuring whole networks on the fleet's devices, for the pruner's closed-loop verification.

A table's device is reachable when the connected cluster has a node of its type: a real table's key
is the key the fleet discovers for a type (CPU nodes by CPU model and threads, GPU types by their
probed key), a fake table's key is the fake backend's key of a type (placement tests). One
:class:`~fleetprune.cluster.actors.ProfilerActor` is pinned to a node of each reachable type, as for
profiling, and built with the table's own timing protocol; networks travel to it as builders
(``functools.partial`` of a module-level function over plain data and a state dict: never a pickled
module), are built and timed there, and the figures come back with the node and process they ran in.
A dead actor or node raises :class:`~fleetprune.errors.DeviceLostError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from fleetprune.cluster.actors import ActorHandle, spawn
from fleetprune.cluster.devices import DeviceType, Fleet
from fleetprune.cluster.discover import discover
from fleetprune.cluster.spec import BackendSpec
from fleetprune.errors import DeviceLostError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Wanted:
    """A table whose device should be reached: its key, whether it is fake, its CPU threads and protocol."""

    device_key: str
    fake: bool = False
    threads: int | None = None
    protocol: Any = None


@dataclass
class FleetMeasurer:
    """Actors pinned to the reachable devices among ``wanted`` on the connected cluster.

    Use as a context manager (Ray must be connected: :func:`fleetprune.cluster.connect`); the actors
    are killed on exit. ``reachable`` maps each reachable device key to its type.
    """

    wanted: Sequence[Wanted]
    fleet: Fleet | None = None
    start_timeout_s: float = START_TIMEOUT_S
    reachable: dict[str, DeviceType] = field(default_factory=dict)
    _actors: dict[str, ActorHandle] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)

    def __enter__(self) -> "FleetMeasurer":
        import ray

        if self.fleet is None:
            threads = next((w.threads for w in self.wanted if w.threads and not w.fake), None)
            self.fleet = discover(threads=threads, probe_gpus=any(not w.fake for w in self.wanted))
        refs = {}
        for w in self.wanted:
            spec = BackendSpec.fake() if w.fake else BackendSpec.torch(w.protocol)
            match = [t for t in self.fleet.types if (spec.fake_key(t.name) if w.fake else t.key) == w.device_key]
            if not match:
                self.unreachable[w.device_key] = "no node of this device type in the cluster"
                continue
            device_type = match[0]
            first = DeviceType(device_type.name, device_type.kind, device_type.nodes[:1], device_type.key,
                               device_type.label, device_type.threads)
            actor = spawn(first, spec)[0]
            self._actors[w.device_key] = actor
            refs[w.device_key] = actor.handle.start.remote()
        for key, ref in refs.items():
            try:
                info = ray.get(ref, timeout=self.start_timeout_s)
            except Exception as exc:  # noqa: BLE001 - a node that cannot start an actor is unreachable
                info = {"error": f"{type(exc).__name__}: {exc}"}
            if info.get("error"):
                self.unreachable[key] = f"its actor could not start: {info['error']}"
                self._kill(key)
            else:
                self.reachable[key] = self._actors[key].device_type
        for key, why in self.unreachable.items():
            log.info("%s is not reachable on the cluster: %s", key, why)
        return self

    def __exit__(self, *exc: Any) -> None:
        for key in list(self._actors):
            self._kill(key)

    def _kill(self, key: str) -> None:
        import ray

        actor = self._actors.pop(key, None)
        if actor is not None:
            try:
                ray.kill(actor.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass

    def measure(self, device_key: str, builders: Sequence[Callable[[], Any]], input_shape: Sequence[int],
                dtype: str, memory_format: str, rounds: int = 3) -> tuple[list[float], dict[str, Any]]:
        """Build and time ``builders`` side by side on ``device_key``'s actor.

        Returns:
            Each network's latency in ms, and where it ran (``device_key``, ``node_id``, ``pid``, ``via``).

        Raises:
            DeviceLostError: the actor or its node died (or was never reachable).
        """
        import ray

        actor = self._actors.get(device_key)
        if actor is None:
            raise DeviceLostError(f"{device_key} has no measuring actor: {self.unreachable.get(device_key, 'gone')}")
        try:
            out: Mapping[str, Any] = ray.get(actor.handle.measure_networks.remote(
                list(builders), tuple(int(s) for s in input_shape), dtype, memory_format, rounds))
        except (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.ActorUnschedulableError) as exc:
            self._kill(device_key)
            self.unreachable[device_key] = "its actor died"
            lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
            raise DeviceLostError(f"the actor measuring {device_key} on node {actor.node.short_id} died: "
                                  f"{lines[-1] if lines else type(exc).__name__}") from exc
        where = {"device_key": out["device_key"], "node_id": out["node_id"], "pid": out["pid"], "via": "ray actor",
                 "device_type": actor.device_type.name}
        return list(out["ms"]), where
