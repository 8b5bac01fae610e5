"""The work of one device type: chunks of configurations, measuring one chunk, and the book-keeping.

Shared by the Ray runner and the in-process runner; imports no Ray.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from fleetprune.cluster.devices import DeviceType
from fleetprune.cluster.summary import ActorRecord, DeviceRun, Failure, ProgressCallback, ProgressEvent
from fleetprune.errors import ProfileError
from fleetprune.tables.config import LayerConfig

if TYPE_CHECKING:
    from fleetprune.tables.store import TableStore

log = logging.getLogger(__name__)

# Chunks per measuring process a device type's work is cut into: enough that a fast process takes
# more chunks than a slow one (load balance), few enough that part files stay few.
CHUNKS_PER_WORKER = 4
MAX_CHUNK = 32

ConfigSource = Callable[[str], Sequence[LayerConfig]]
"""Configurations to measure on a device of the given kind (``'cpu'`` or ``'cuda'``)."""


@dataclass
class Chunk:
    """Configurations measured by one call of one measuring process, written as one part file."""

    index: int
    configs: tuple[LayerConfig, ...]
    attempts: int = 0


@dataclass
class ChunkResult:
    """What a measuring process returns for a chunk.

    Attributes:
        rows: table rows of the configurations it measured.
        failures: (configuration key, reason) of those it could not measure.
        seconds: wall time of the chunk in the measuring process.
        node_id: node the process runs on.
        pid: its process id.
    """

    rows: list[dict[str, Any]]
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    node_id: str = "local"
    pid: int = 0


def chunk_size_for(n_configs: int, workers: int, chunk_size: int | None = None) -> int:
    """``chunk_size`` if given, else at least CHUNKS_PER_WORKER chunks per worker of at most MAX_CHUNK.

    The number of chunks is rounded up to a multiple of ``workers`` so that equal workers finish
    together instead of one of them measuring a last chunk alone.
    """
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    workers = max(1, workers)
    chunks = max(CHUNKS_PER_WORKER * workers, math.ceil(n_configs / MAX_CHUNK))
    chunks = math.ceil(chunks / workers) * workers
    return max(1, math.ceil(n_configs / chunks))


def make_chunks(configs: Sequence[LayerConfig], size: int, *, seed: int = 0) -> list[Chunk]:
    """Shuffle ``configs`` (seeded) and cut them into chunks of ``size``.

    Shuffling mixes small and large layers in every chunk, so chunks take about as long each.
    """
    order = list(configs)
    random.Random(seed).shuffle(order)
    return [Chunk(i, tuple(order[s:s + size])) for i, s in enumerate(range(0, len(order), size))]


def refuse_fp16_on_cpu(types: Sequence[DeviceType], source: ConfigSource) -> None:
    """Refuse, before anything is measured, fp16 configurations for a CPU type among ``types``.

    The profiler refuses fp16 on a CPU configuration by configuration (PyTorch emulates it there);
    caught here once, the user gets one line instead of one failure per configuration.

    Raises:
        ProfileError: a CPU type is chosen and its configurations are fp16.
    """
    cpus = [t.name for t in types if t.kind == "cpu"]
    if cpus and any(c.dtype == "fp16" for c in source("cpu")):
        raise ProfileError(
            f"fp16 is not profiled on a CPU ({', '.join(cpus)}): PyTorch emulates it there and nobody deploys "
            "it; profile CPUs with --dtype bf16 or --dtype fp32 (or leave --dtype out: fp32 on CPUs, fp16 on "
            "GPUs), or only the GPUs with --devices gpu"
        )


def todo_configs(configs: Sequence[LayerConfig], measured: set[str]) -> list[LayerConfig]:
    """Unique configurations (first occurrence) whose key is not in ``measured``."""
    seen: dict[str, LayerConfig] = {}
    for c in configs:
        if c.key not in measured and c.key not in seen:
            seen[c.key] = c
    return list(seen.values())


def unique_count(configs: Sequence[LayerConfig]) -> int:
    """Number of distinct configuration keys."""
    return len({c.key for c in configs})


def measure_chunk(backend: Any, configs: Sequence[LayerConfig], *, seed: int = 0, node_id: str = "local") -> ChunkResult:
    """Measure ``configs`` with the profiler's :func:`~fleetprune.profiler.profile_configs`.

    If a configuration fails, the ones already measured stand and the rest are measured one at a
    time, so a single unbuildable layer costs only itself.
    """
    from fleetprune.profiler import profile_configs

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    try:
        rows.extend(profile_configs(configs, backend, seed=seed))
    except Exception as exc:  # noqa: BLE001 - isolate the failing configuration below
        log.warning("chunk on %s hit an error (%s); measuring its other configurations one by one",
                    backend.device.key, exc)
        done = {r["key"] for r in rows}
        for config in configs:
            if config.key in done:
                continue
            done.add(config.key)
            try:
                rows.extend(profile_configs([config], backend, seed=seed))
            except Exception as one:  # noqa: BLE001 - reported as a failure of this configuration
                failures.append((config.key, f"{type(one).__name__}: {one}"))
    return ChunkResult(rows, failures, time.perf_counter() - started, node_id, os.getpid())


class Ledger:
    """The work and the tally of one device type (table key) during a run.

    Args:
        run: the summary entry it fills (device key, type, totals).
        chunks: the chunks to measure.
        progress: called after each chunk is written.
        lock: the table's profile lock (``TableStore.lock_device``), freed by :meth:`close`.
    """

    def __init__(self, run: DeviceRun, chunks: list[Chunk], progress: ProgressCallback | None = None,
                 lock: Any = None):
        self.run = run
        self.lock = lock
        self.pending: deque[Chunk] = deque(chunks)
        self.in_flight = 0
        self.provenance: dict[str, Any] | None = None
        self._progress = progress
        self._started: float | None = None
        self._last: float | None = None

    def close(self) -> None:
        """Free the table's profile lock, so a waiting profile of the same device may go on."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @property
    def finished(self) -> bool:
        """Nothing left to hand out and nothing in flight."""
        return not self.pending and self.in_flight == 0

    def take(self) -> Chunk | None:
        """The next chunk to hand out, or None."""
        if not self.pending:
            return None
        if self._started is None:
            self._started = time.perf_counter()
        self.in_flight += 1
        return self.pending.popleft()

    def returned(self, chunk: Chunk, result: ChunkResult, actor: ActorRecord | None = None) -> None:
        """Count a chunk whose rows were written."""
        self.in_flight -= 1
        self.run.measured += len(result.rows)
        self.run.noisy += sum(bool(r.get("noisy")) for r in result.rows)
        by_reason: dict[str, list[str]] = {}
        for key, reason in result.failures:
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            self.run.failures.append(Failure(tuple(keys), reason))
        if actor is not None:
            actor.chunks += 1
            actor.rows += len(result.rows)
        self._last = time.perf_counter()
        self.run.seconds = self._last - (self._started or self._last)
        self.notify(result.node_id, result.pid)

    def lost(self, chunk: Chunk, reason: str, max_retries: int) -> None:
        """A chunk whose measuring process died: queue it again first, or fail it after ``max_retries``."""
        self.in_flight -= 1
        chunk.attempts += 1
        if chunk.attempts > max_retries:
            self._fail([chunk], f"{reason}; gave up after {chunk.attempts} attempts")
            self.notify()
        else:
            self.run.retried_chunks += 1
            self.pending.appendleft(chunk)

    def fail_pending(self, reason: str) -> None:
        """Fail every chunk not yet handed out (no measuring process of this type is left)."""
        if self.pending:
            self._fail(list(self.pending), reason)
            self.pending.clear()
            self.notify()

    def _fail(self, chunks: list[Chunk], reason: str) -> None:
        keys = tuple(c.key for chunk in chunks for c in chunk.configs)
        log.warning("%s: %d configurations failed: %s", self.run.device_key, len(keys), reason)
        self.run.failures.append(Failure(keys, reason))

    def notify(self, node_id: str | None = None, pid: int | None = None) -> None:
        """Tell the progress callback where this device type stands."""
        if self._progress is not None:
            self._progress(ProgressEvent(self.run.device_key, self.run.device_type, self.run.done,
                                         self.run.total, node_id, pid))


def open_ledger(store: "TableStore", configs: Sequence[LayerConfig], *, key: str, device_type: str, kind: str,
                label: str, workers: int, chunk_size: int | None, seed: int,
                progress: ProgressCallback | None, statistic: str | None = None) -> Ledger:
    """The ledger of table key ``key``: what of ``configs`` its table still lacks, cut into chunks.

    With ``statistic``, rows the table holds with another statistic count as lacking. The table's
    profile lock is taken first (waiting for another process profiling ``key`` into the same root),
    so what that process measured counts as done; the ledger holds it until :meth:`Ledger.close`.
    """
    lock = store.lock_device(key)
    try:
        todo = todo_configs(configs, store.measured_keys(key, statistic))
    except BaseException:
        lock.release()
        raise
    size = chunk_size_for(len(todo), workers, chunk_size)
    total = unique_count(configs)
    run = DeviceRun(device_key=key, device_type=device_type, kind=kind, label=label, total=total,
                    skipped=total - len(todo))
    ledger = Ledger(run, make_chunks(todo, size, seed=seed), progress, lock)
    log.info("%s (%s): %d configurations, %d already measured, chunks of %d", key, device_type, total,
             run.skipped, size)
    ledger.notify()
    return ledger
