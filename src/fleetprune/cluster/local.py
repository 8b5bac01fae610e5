"""Profiling without Ray (``--ray-address none``): this machine's devices, one after another, in-process.

For machines that have no Ray (the GPU box). Same chunks, same streaming writes, same summary as
the Ray runner; this module never imports Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Sequence

from fleetprune.cluster.devices import DeviceType, Fleet, NodeInfo, select_types, sort_types
from fleetprune.cluster.spec import BackendSpec
from fleetprune.cluster.summary import ActorRecord, DeviceRun, Failure, ProgressCallback, RunSummary
from fleetprune.cluster.work import ConfigSource, measure_chunk, open_ledger, refuse_fp16_on_cpu, todo_configs
from fleetprune.errors import DeviceError
from fleetprune.tables.config import LayerConfig
from fleetprune.tables.store import TableStore

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may run on (what Ray would give an embedded instance)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_fleet(threads: int | None = None) -> Fleet:
    """This machine's devices as a fleet of one node: its CPU and each CUDA device model.

    Args:
        threads: threads the CPU is measured with (default: every CPU this process may use).
    """
    from fleetprune.profiler import cpu_device, cuda_device

    cpus = usable_cpus()
    want = threads or cpus
    gpus: list = []
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:  # noqa: BLE001 - a broken CUDA setup still leaves the CPU
        log.warning("cannot query CUDA devices (%s); profiling the CPU only", exc)
        count = 0
    for i in range(count):
        try:
            gpus.append(cuda_device(i))
        except DeviceError as exc:
            log.warning("CUDA device %d is not usable: %s", i, exc)
    node = NodeInfo("local", socket.gethostname(), cpus=cpus, gpus=len(gpus))
    cpu = cpu_device(want)
    types = [DeviceType(name=cpu.key, kind="cpu", nodes=(node,), key=cpu.key, label=cpu.name, threads=want)]
    seen: set[str] = set()
    for g in gpus:
        if g.key not in seen:
            seen.add(g.key)
            types.append(DeviceType(name=g.key, kind="cuda", nodes=(node,), key=g.key, label=g.name))
    return Fleet(sort_types(types), (), None)


def profile_local(
    configs: Sequence[LayerConfig] | ConfigSource,
    store: TableStore | str,
    *,
    devices: str | Sequence[str] | None = "all",
    threads: int | None = None,
    backend: BackendSpec | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    fleet: Fleet | None = None,
) -> RunSummary:
    """Measure ``configs`` on this machine's chosen devices, in this process, into ``store``.

    Arguments as :func:`fleetprune.cluster.run.profile_fleet`. Devices are measured one after
    another (a CPU measurement must not share cores with a GPU's host thread); each chunk is
    written as it finishes, so an interrupted run resumes from the table.

    Raises:
        DeviceError: an unknown device type.
        ProfileError: fp16 asked of a CPU.
        TableError: the table root cannot be read or written.
    """
    started = time.perf_counter()
    spec = backend or BackendSpec.torch()
    store = store if isinstance(store, TableStore) else TableStore(store)
    source = configs if callable(configs) else (lambda _kind, fixed=list(configs): fixed)
    fleet = fleet or local_fleet(threads)
    extra = {t.name: spec.fake_key(t.name) for t in fleet.types} if spec.is_fake else None
    chosen = select_types(fleet, devices, extra_keys=extra)
    refuse_fp16_on_cpu(chosen, source)
    runs: list[DeviceRun] = []
    first_ready: float | None = None
    ledger = None
    try:
        for t in chosen:
            from fleetprune.profiler import provenance

            index = _cuda_index(t.key) if t.kind == "cuda" else 0
            kind_configs = list(source(t.kind))
            record = ActorRecord(node_id="local", pid=os.getpid(), state="running")
            try:
                device = spec.device(t.kind, t.name, threads=t.threads, index=index, label=t.label)
                timer = spec.build(device)
            except DeviceError as exc:
                record.state, record.error = "failed to start", str(exc)
                keys = tuple(c.key for c in todo_configs(kind_configs, set()))
                runs.append(DeviceRun(spec.table_key(t.name, t.key) or t.name, t.name, t.kind, t.label,
                                      total=len(keys), failures=[Failure(keys, str(exc))], actors=[record]))
                continue
            # Holds the device's profile lock (waits for another run of it on this root) until closed.
            ledger = open_ledger(store, kind_configs, key=device.key, device_type=t.name, kind=t.kind,
                                 label=device.name, workers=1, chunk_size=chunk_size, seed=seed, progress=progress,
                                 statistic=spec.statistic)
            ledger.run.actors.append(record)
            runs.append(ledger.run)
            first_ready = first_ready or time.perf_counter()
            prov = provenance(device, getattr(timer, "protocol", None))
            while (chunk := ledger.take()) is not None:
                result = measure_chunk(timer, chunk.configs, seed=seed + chunk.index)
                if result.rows:
                    store.write(device.key, result.rows, prov)
                ledger.returned(chunk, result, record)
            record.state = "finished"
            ledger.close()
    finally:
        if ledger is not None:
            ledger.close()
    return RunSummary(
        tables=store.root,
        address="none",
        devices=runs,
        seconds=time.perf_counter() - started,
        startup_s=(first_ready or time.perf_counter()) - started,
    )


def _cuda_index(key: str | None) -> int:
    """The first CUDA index whose device has table key ``key``."""
    import torch

    from fleetprune.profiler import cuda_device

    for i in range(torch.cuda.device_count()):
        if cuda_device(i).key == key:
            return i
    return 0
