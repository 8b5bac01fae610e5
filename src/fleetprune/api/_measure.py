"""Who measures a device's networks for ``prune``: this process, an actor on the cluster, or nobody.

A device is reachable when it is this machine (its table's key is one of this machine's devices at
the table's thread count) or when the connected cluster has a node of its type. Either way a network
is described as data (:class:`~fleetprune.pruner.variant.VariantSpec` and a factory of the dense
model) and built where it is timed, with the table's own timing protocol.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from torch import nn

from fleetprune import models
from fleetprune.api._common import table_protocol
from fleetprune.api._parallel import waiting
from fleetprune.errors import DeviceError
from fleetprune.pruner.calibrate import Measure, Network, Timing
from fleetprune.pruner.setting import Setting
from fleetprune.pruner.variant import VariantSpec, build_network

log = logging.getLogger(__name__)

RAY_ADDRESS_NONE = "none"
MEASURE_ROUNDS = 5
"""Interleaved rounds of every side-by-side measurement of ``prune`` (each network keeps its fastest)."""


def create_model(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """``models.create(name, **kwargs)``, module-level so a ``functools.partial`` of it travels to actors."""
    return models.create(name, **dict(kwargs))


@dataclass
class Target:
    """One device's table and what its networks are built from."""

    table: Any
    setting: Setting
    model_name: str
    model_kwargs: dict[str, Any]
    plan: dict[str, Any]
    factory: Callable[[], nn.Module]
    protocol: Any = None

    @property
    def device_key(self) -> str:
        return self.table.device_key

    @property
    def fake(self) -> bool:
        prov = self.table.provenance
        return bool((prov.get("fingerprint") or {}).get("fake")) or prov.get("timing_method") == "fake"

    def timing_protocol(self) -> Any:
        return self.protocol if self.protocol is not None else table_protocol(self.table)

    def builders(self, networks: Sequence[Network]) -> list[Callable[[], nn.Module]]:
        """One picklable builder per network."""
        return [functools.partial(build_network, VariantSpec(self.model_name, self.model_kwargs,
                                                             self.setting.input_shape, self.plan, dict(n.widths),
                                                             n.state), self.factory) for n in networks]


def local_device(table: Any) -> Any:
    """This machine's ``DeviceInfo`` the table was measured on (at its thread count), else None."""
    from fleetprune.profiler import local_devices

    if (table.provenance.get("fingerprint") or {}).get("fake"):
        return None
    threads = table.provenance.get("threads")
    try:
        candidates = local_devices(int(threads) if threads else None)
    except (TypeError, ValueError, DeviceError):
        candidates = local_devices()
    return next((dev for dev in candidates if dev.key == table.device_key), None)


def local_measure(target: Target, device: Any, rounds: int = MEASURE_ROUNDS) -> Measure:
    """Measure ``target``'s networks in this process on ``device`` (built here, timed side by side)."""
    from fleetprune.profiler import TorchTimingBackend

    protocol = target.timing_protocol()
    backend = TorchTimingBackend(device, protocol)
    s = target.setting

    def measure(networks: Sequence[Network]) -> Timing:
        nets = [build() for build in target.builders(networks)]
        found = backend.measure_networks(nets, s.full_shape, s.dtype, s.memory_format, rounds=rounds)
        return Timing([protocol.latency(m) for m in found], {"device_key": device.key, "node_id": "local",
                                                             "pid": os.getpid(), "via": "this process"})

    return measure


@dataclass
class Reach:
    """How each device of a run is measured: ``measure[key]`` (None: it cannot be), ``why[key]`` it cannot,
    and which keys are measured on the cluster (``remote``: they can run side by side)."""

    measure: dict[str, Measure | None]
    why: dict[str, str]
    remote: set[str]


@contextlib.contextmanager
def measurers(targets: Sequence[Target], *, ray_address: str = RAY_ADDRESS_NONE, enabled: bool = True,
              rounds: int = MEASURE_ROUNDS, on_measured: Callable[[str, Timing], None] | None = None,
              service: str | None = None) -> Iterator[Reach]:
    """How each device of the run is measured, for the duration of the block.

    This machine's devices are measured in this process; the others, with a ``service`` URL, by the
    running profiling service (``fleetprune serve``) on a replica of their type, else with a
    ``ray_address`` other than ``none`` on the connected cluster's actors (started here, stopped on
    exit). ``on_measured(device_key, timing)`` is called after every measurement.
    """
    if on_measured is not None:
        with measurers(targets, ray_address=ray_address, enabled=enabled, rounds=rounds, service=service) as reach:
            for key, m in reach.measure.items():
                if m is not None:
                    reach.measure[key] = _reporting(key, m, on_measured)
            yield reach
        return
    found: dict[str, Measure | None] = {t.device_key: None for t in targets}
    why: dict[str, str] = {}
    remote: list[Target] = []
    for t in targets:
        if not enabled:
            why[t.device_key] = "not measured (--no-measure)"
            continue
        dev = None if t.fake else local_device(t.table)
        if dev is not None:
            found[t.device_key] = local_measure(t, dev, rounds)
        elif service is not None:
            if isinstance(t.factory, ModelFactory):
                found[t.device_key] = _service_measure(service, t, rounds)
            else:
                why[t.device_key] = "a model outside the registry cannot be built by the service"
        elif ray_address == RAY_ADDRESS_NONE:
            why[t.device_key] = "not this machine, and no cluster to reach it (--ray-address none)"
        else:
            remote.append(t)
    if not remote:
        yield Reach(found, why, set())
        return
    from fleetprune.cluster.connect import connect
    from fleetprune.cluster.verify import FleetMeasurer, Wanted

    wanted = [Wanted(t.device_key, t.fake, t.table.provenance.get("threads"), t.timing_protocol()) for t in remote]
    with connect(ray_address) as conn, FleetMeasurer(wanted) as fleet:
        for t in remote:
            if t.device_key in fleet.reachable:
                found[t.device_key] = _remote_measure(fleet, t, rounds)
            else:
                why[t.device_key] = f"not reachable on the cluster at {conn.display}: " \
                                    f"{fleet.unreachable.get(t.device_key, 'no node of its type')}"
        yield Reach(found, why, set(fleet.reachable))


def _reporting(key: str, measure: Measure, on_measured: Callable[[str, Timing], None]) -> Measure:
    def wrapped(networks: Sequence[Network]) -> Timing:
        timing = measure(networks)
        on_measured(key, timing)
        return timing

    return wrapped


def _service_measure(url: str, target: Target, rounds: int) -> Measure:
    from fleetprune.api.serve import remote_measure_side_by_side

    s = target.setting
    size = None if s.default_shape is not None and s.default_shape[1:] == s.input_shape[1:] else list(s.input_shape[1:])

    def measure(networks: Sequence[Network]) -> Timing:
        from fleetprune.client import ServiceError
        from fleetprune.errors import DeviceLostError

        try:
            ms, where = remote_measure_side_by_side(
                url, target.device_key, model=target.model_name, widths=[dict(n.widths) for n in networks],
                batch=s.batch, dtype=s.dtype, memory_format=s.memory_format, input_size=size,
                num_classes=target.model_kwargs.get("num_classes"), round_to=s.round_to, max_choices=s.max_choices,
                rounds=rounds)
        except ServiceError as exc:
            if exc.status and exc.status < 500:  # a refusal (bad token, bad request): the user must act
                raise
            raise DeviceLostError(f"the service at {url} could not measure on {target.device_key}: {exc}") from exc
        return Timing(ms, where)

    return measure


def _remote_measure(fleet: Any, target: Target, rounds: int) -> Measure:
    s = target.setting

    def measure(networks: Sequence[Network]) -> Timing:
        ms, where = fleet.measure(target.device_key, target.builders(networks), s.full_shape, s.dtype,
                                  s.memory_format, rounds)
        return Timing(ms, where)

    return waiting(measure)


@dataclass(frozen=True)
class ModelFactory:
    """Builds the dense model by name (picklable: it travels to the cluster's actors)."""

    name: str
    kwargs: Mapping[str, Any]

    def __call__(self) -> nn.Module:
        return create_model(self.name, self.kwargs)
