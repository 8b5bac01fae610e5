"""The ``profile`` verb for Python users: model name -> plan -> configurations -> fleet -> tables.

Defaults (shared with ``fleetprune profile``):

* dtype: fp32 on CPUs, fp16 on GPUs (what each deploys with; a fixed ``dtype`` applies to all);
* memory format: nhwc (channels_last: CPU conv latency is nearly monotone in channels in it, and
  it is the fast layout for tensor cores);
* round-to: 16 for fp32 (the AVX-512 fp32 staircase), 8 for fp16/bf16 (tensor-core alignment).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import replace
from typing import Sequence

from fleetprune.cluster.devices import Fleet
from fleetprune.cluster.spec import BackendSpec
from fleetprune.cluster.summary import ProgressCallback, RunSummary
from fleetprune.errors import FleetpruneError
from fleetprune.tables.config import DTYPES, MEMORY_FORMATS, LayerConfig

log = logging.getLogger(__name__)

DEFAULT_TABLES = "tables"
DEFAULT_MEMORY_FORMAT = "nhwc"
DEFAULT_ADDRESS = "local"


def default_dtype(kind: str) -> str:
    """The dtype a device of ``kind`` (``cpu``/``cuda``) is profiled in unless one is asked for."""
    return "fp32" if kind == "cpu" else "fp16"


def default_round_to(dtype: str) -> int:
    """Channel alignment of width choices: 16 for fp32, 8 for fp16/bf16."""
    return 16 if dtype == "fp32" else 8


def plan_configs(model: str, *, batch: int = 1, dtype: str = "fp32", memory_format: str = DEFAULT_MEMORY_FORMAT,
                 round_to: int | None = None, input_size: Sequence[int] | int | None = None,
                 num_classes: int | None = None, max_choices: int = 32) -> list[LayerConfig]:
    """Every layer configuration the pruner may choose for a named model (its plan's configurations).

    ``input_size``, ``num_classes`` and ``max_choices`` must match what ``prune`` will be asked for,
    or the table lacks configurations the pruner needs.

    Raises:
        ModelError: an unknown model name or a model the pruner cannot plan.
        FleetpruneError: a bad input size.
    """
    import torch

    from fleetprune import models
    from fleetprune.api._common import sample_shape
    from fleetprune.pruner.plan import build_plan

    shape = sample_shape(model, input_size)  # unknown name -> ModelError before building anything
    net = models.create(model, **({} if num_classes is None else {"num_classes": int(num_classes)})).eval()
    example = torch.randn(batch, *shape)
    plan = build_plan(net, example, round_to=round_to or default_round_to(dtype), max_choices=max_choices,
                      dtype=dtype, memory_format=memory_format)
    return plan.configs()


def backend_from_text(text: str) -> BackendSpec | None:
    """The timing backend named ``torch`` (None: the default) or ``fake[:SECONDS]`` (made-up latencies,
    SECONDS of sleep per configuration; for tests and demos).

    Raises:
        FleetpruneError: any other text.
    """
    kind, _, cost = text.partition(":")
    if kind == "torch" and not cost:
        return None
    if kind == "fake":
        try:
            return BackendSpec.fake(float(cost or 0.0))
        except ValueError:
            pass
    raise FleetpruneError(f"--backend must be torch or fake[:SECONDS], got {text!r}")


def _check(batch: int, dtype: str | None, memory_format: str, round_to: int | None, threads: int | None) -> None:
    if batch < 1:
        raise FleetpruneError(f"batch must be >= 1, got {batch}")
    if dtype is not None and dtype not in DTYPES:
        raise FleetpruneError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if memory_format not in MEMORY_FORMATS:
        raise FleetpruneError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    if round_to is not None and round_to < 1:
        raise FleetpruneError(f"round_to must be >= 1, got {round_to}")
    if threads is not None and threads < 1:
        raise FleetpruneError(f"threads must be >= 1, got {threads}")


def profile(
    model: str,
    *,
    batch: int = 1,
    dtype: str | None = None,
    memory_format: str = DEFAULT_MEMORY_FORMAT,
    round_to: int | None = None,
    input_size: Sequence[int] | int | None = None,
    num_classes: int | None = None,
    max_choices: int = 32,
    tables: str = DEFAULT_TABLES,
    devices: str | Sequence[str] = "all",
    ray_address: str = DEFAULT_ADDRESS,
    threads: int | None = None,
    quick: bool = False,
    timing_cache: str = "warm",
    protocol: object | None = None,
    backend: BackendSpec | None = None,
    chunk_size: int | None = None,
    max_retries: int = 2,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> RunSummary:
    """Measure every layer configuration of ``model`` on the chosen device types into ``tables``.

    Configurations a device's table already holds are skipped, so a rerun measures only what is
    missing (nothing, after a complete run).

    Args:
        model: a name from :func:`fleetprune.models.names`.
        batch: batch size of the configurations.
        dtype: ``fp32``/``fp16``/``bf16`` for every device; None: fp32 on CPUs, fp16 on GPUs.
        memory_format: ``nhwc`` (default) or ``nchw``.
        round_to: channel alignment of the width choices; None: 16 for fp32, 8 otherwise.
        input_size: spatial input size (``64`` or ``(64, 48)``) instead of the model's default.
        num_classes: classifier outputs, if not the model's default.
        max_choices: most width choices per group (as ``prune`` will be given).
        tables: table root (folder or pyarrow filesystem URI).
        devices: ``all``, or device type names / table keys / ``cpu`` / ``gpu``.
        ray_address: ``local`` (embedded Ray, default), ``auto``, ``HOST:PORT`` or ``none`` (no Ray).
        threads: threads each CPU is measured with (default: all of a node's CPUs).
        quick: use the profiler's quick timing protocol (rough numbers, for smoke runs).
        timing_cache: ``warm`` or ``cold`` (weights and input out of cache, see ``TimingProtocol.cache``).
        protocol: a :class:`~fleetprune.profiler.TimingProtocol` (overrides ``quick`` and ``timing_cache``).
        backend: what to time with (default: the real torch backend with that protocol).
        chunk_size: configurations per chunk and part file (default: automatic).
        max_retries: how often the chunk of a dead actor is handed to another actor.
        seed: shuffles the measuring order.
        progress: called with a :class:`~fleetprune.cluster.summary.ProgressEvent` per chunk.

    Returns:
        A :class:`~fleetprune.cluster.summary.RunSummary`; failed configurations are in it.

    Raises:
        ModelError: unknown or unplannable model.
        DeviceError: unknown device type, unreachable cluster, no usable device.
        ProfileError: fp16 asked of a CPU (refused before Ray starts or anything is measured).
        TableError: an unusable table root.
    """
    from fleetprune.tables.store import TableStore

    _check(batch, dtype, memory_format, round_to, threads)
    if max_choices < 1:
        raise FleetpruneError(f"max_choices must be >= 1, got {max_choices}")
    started = time.perf_counter()
    plans: dict[str, list[LayerConfig]] = {}

    def configs_for(kind: str) -> list[LayerConfig]:
        want = dtype or default_dtype(kind)
        if want not in plans:
            plans[want] = plan_configs(model, batch=batch, dtype=want, memory_format=memory_format, round_to=round_to,
                                       input_size=input_size, num_classes=num_classes, max_choices=max_choices)
        return plans[want]

    # Check the root, then plan, before Ray starts: a bad root, model name or layer fails in a
    # second, not after start-up.
    store = TableStore(tables)
    configs_for("cpu")
    if backend is None:
        if protocol is None and (quick or timing_cache != "warm"):
            from fleetprune.profiler import TimingProtocol

            protocol = replace(TimingProtocol.quick() if quick else TimingProtocol(), cache=timing_cache)
        backend = BackendSpec.torch(protocol)  # type: ignore[arg-type]
    if dtype == "fp16" and ray_address.strip().lower() in ("none", "local"):
        _refuse_fp16_here(configs_for, devices, threads, backend)
    common = dict(devices=devices, threads=threads, backend=backend, chunk_size=chunk_size, seed=seed,
                  progress=progress)
    if ray_address.strip().lower() == "none":
        from fleetprune.cluster.local import profile_local

        summary = profile_local(configs_for, store, **common)
    else:
        from fleetprune.cluster.connect import connect
        from fleetprune.cluster.run import profile_fleet

        keep = _caller_sigterm()
        with connect(ray_address) as conn:
            if keep is not None and signal.getsignal(signal.SIGTERM) is not keep:  # a CLI's Ctrl-C-like exit
                signal.signal(signal.SIGTERM, keep)  # type: ignore[arg-type]
            connected = time.perf_counter()
            summary = profile_fleet(configs_for, store, max_retries=max_retries, address=conn.display, **common)
        summary.startup_s += connected - started
    summary.seconds = time.perf_counter() - started
    log.info("profile %s: %d measured, %d failed, %.1f s", model, summary.measured, summary.failed, summary.seconds)
    return summary


def _caller_sigterm() -> object:
    """The SIGTERM handler the caller installed (a Python function), or None. Starting Ray replaces
    it with one that exits through a native stack dump; profile() puts the caller's back."""
    current = signal.getsignal(signal.SIGTERM)
    return current if callable(current) else None


def _refuse_fp16_here(configs_for, devices, threads, backend) -> None:  # noqa: ANN001 - see profile()
    """fp16 asked of this machine's CPU: refuse before Ray starts (the runners refuse it too, later)."""
    from fleetprune.cluster.devices import select_types
    from fleetprune.cluster.local import local_fleet
    from fleetprune.cluster.work import refuse_fp16_on_cpu
    from fleetprune.errors import DeviceError

    here = local_fleet(threads)
    extra = {t.name: backend.fake_key(t.name) for t in here.types} if backend.is_fake else None
    try:
        chosen = select_types(here, devices, extra_keys=extra)
    except DeviceError:  # names an embedded Ray's discovery may know; the runner checks again
        return
    refuse_fp16_on_cpu(chosen, configs_for)


def fleet(ray_address: str = DEFAULT_ADDRESS, *, threads: int | None = None, probe_gpus: bool = True) -> Fleet:
    """The device types ``profile`` would measure on (``none``: this machine's, without Ray).

    Raises:
        DeviceError: an unreachable cluster.
    """
    if ray_address.strip().lower() == "none":
        from fleetprune.cluster.local import local_fleet

        return local_fleet(threads)
    from fleetprune.cluster.connect import connect
    from fleetprune.cluster.discover import discover

    with connect(ray_address) as conn:
        return discover(threads=threads, probe_gpus=probe_gpus, address=conn.address if conn.mode != "local" else None)


__all__ = ["backend_from_text", "default_dtype", "default_round_to", "fleet", "plan_configs", "profile"]
