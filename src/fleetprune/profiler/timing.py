"""How one callable is timed: the protocol, the result, and the allocator tuning that keeps CPU numbers stable.

CPU: ``torch.utils.benchmark.Timer`` over blocks of back-to-back calls, with the intra-op thread
count set explicitly, after a warm-up, in a process whose glibc allocator keeps big buffers on the heap
(``tune_allocator``). Without that, glibc hands every large tensor back to the kernel and faults it
in again on the next call, which adds 50-60% and makes numbers differ between processes.

CUDA: CUDA events around ``R`` back-to-back calls (R chosen so one timed block lasts at least
``block_ms``), ``cudnn.benchmark`` on, one synchronize after all blocks.

Both report the minimum, the median and the 10th/90th percentiles of the per-call times of the
timed blocks. A table's latency is one of them, the protocol's ``statistic``: ``min`` by default.
On a shared machine interference from other work only ever adds time, so the fastest block is the
undisturbed cost: on our 2-vCPU VM (1 thread) per-configuration minima of two processes differ by a
median 3%, medians by 23% (BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
import torch.utils.benchmark as tbench

from fleetprune.errors import ProfileError

log = logging.getLogger(__name__)

# glibc mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 64 << 20
_TRIM_THRESHOLD = 128 << 20

ALLOCATOR_ENV: dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD),
}
"""The same allocator tuning as environment variables, for child processes and Ray actors
(``runtime_env={"env_vars": ALLOCATOR_ENV}``)."""

_allocator_tuned_inprocess = False

STATISTICS = ("min", "median")
"""The per-call figures a protocol may name as the latency."""

CACHE_MODES = ("warm", "cold")
"""How a layer's weights and input sit in the caches while it is timed: ``warm`` (one copy called back
to back: it stays in cache, as a layer timed alone always was) or ``cold`` (rotate through copies that
together exceed the last-level cache, and on CUDA flush L2 before every call, as Triton's ``do_bench``
does: what a layer sees inside a network, where the layers before it evicted its weights)."""

COLD_FOOTPRINT = 2.0
"""In ``cold`` mode the copies together hold at least this many times the last-level cache."""
COLD_MAX_COPIES = 256
COLD_MAX_BYTES = 1 << 30
"""Limits of the copies of one layer in ``cold`` mode (a layer larger than the cache needs one)."""
DEFAULT_LLC_BYTES = 32 << 20


@dataclass(frozen=True)
class TimingProtocol:
    """How long and how often to time one configuration.

    Attributes:
        warmup_ms: minimum warm-up time before timing (oneDNN primitive caches, cuDNN autotuning,
            allocator, clocks).
        min_run_time_s: minimum total timed time per configuration.
        repeats: minimum number of timed samples (blocks); raised run time if needed to reach it.
        noise_limit: a measurement whose noise figure (:meth:`Measurement.noise`) exceeds this is
            re-measured once and then flagged noisy.
        warmup_iters: minimum number of warm-up calls (on top of ``warmup_ms``).
        block_ms: CUDA only: minimum duration of one timed block of back-to-back launches, so short
            kernels are not dominated by event resolution. (CPU blocks last about
            ``min_run_time_s / (2 * repeats)``.)
        statistic: which per-call figure is the latency: ``min`` (the fastest timed block; the
            default, robust to interference) or ``median``.
        cache: ``warm`` (the default: one copy, hot in cache) or ``cold`` (see :data:`CACHE_MODES`).
    """

    warmup_ms: float = 50.0
    min_run_time_s: float = 0.2
    repeats: int = 15
    noise_limit: float = 0.10
    warmup_iters: int = 10
    block_ms: float = 1.0
    statistic: str = "min"
    cache: str = "warm"

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, not {self.statistic!r}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, not {self.cache!r}")
        if self.warmup_ms < 0 or self.min_run_time_s <= 0 or self.block_ms <= 0:
            raise ValueError("warmup_ms must be >= 0, min_run_time_s and block_ms > 0")
        if self.repeats < 1 or self.warmup_iters < 0:
            raise ValueError("repeats must be >= 1 and warmup_iters >= 0")
        if self.noise_limit <= 0:
            raise ValueError("noise_limit must be > 0")

    @classmethod
    def quick(cls) -> "TimingProtocol":
        """A fast protocol for tests and smoke runs (numbers are rough; never for real tables)."""
        return cls(warmup_ms=2.0, min_run_time_s=0.02, repeats=5, warmup_iters=2, block_ms=0.2)

    def latency(self, measurement: "Measurement") -> float:
        """The figure of ``measurement`` this protocol calls the latency (ms per call)."""
        return measurement.latency(self.statistic)

    def to_dict(self) -> dict[str, Any]:
        """The protocol as a JSON-ready dict (stored in table provenance)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> "TimingProtocol | None":
        """The protocol a table's provenance recorded (unknown keys ignored), or None if unusable.

        A protocol recorded without a ``statistic`` (schema version 1 tables) used the median; one
        without a ``cache`` mode (schema 1 and 2) timed layers ``warm``.
        """
        if not isinstance(raw, Mapping):
            return None
        try:
            fields = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
            fields.setdefault("statistic", "median")
            fields.setdefault("cache", "warm")
            return cls(**fields)
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Measurement:
    """Latency statistics of one configuration or model, in milliseconds per call.

    Attributes:
        median_ms, p10_ms, p90_ms: statistics over the timed samples.
        n: number of timed samples (blocks), not the number of calls.
        min_ms: the fastest timed sample (defaults to ``p10_ms`` where only percentiles are known).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    min_ms: float | None = None

    def __post_init__(self) -> None:
        if self.min_ms is None:
            object.__setattr__(self, "min_ms", self.p10_ms)

    def latency(self, statistic: str = "min") -> float:
        """The per-call figure named by ``statistic`` (``min`` or ``median``), in ms."""
        if statistic == "min":
            return float(self.min_ms)
        if statistic == "median":
            return float(self.median_ms)
        raise ValueError(f"statistic must be one of {STATISTICS}, not {statistic!r}")

    @property
    def spread(self) -> float:
        """Relative spread (p90 - p10) / median, the noise figure the profiler checks."""
        if self.median_ms <= 0:
            return math.inf
        return (self.p90_ms - self.p10_ms) / self.median_ms

    def noise(self, statistic: str = "min") -> float:
        """How far to trust the figure ``statistic`` names: for ``min``, (p10 - min) / min, i.e.
        whether other blocks come near the fastest one (a lone fast block is suspect); for
        ``median``, :attr:`spread`."""
        if statistic == "median":
            return self.spread
        if not self.min_ms or self.min_ms <= 0:
            return math.inf
        return (self.p10_ms - self.min_ms) / self.min_ms

    def combine(self, other: "Measurement", statistic: str = "min") -> "Measurement":
        """The better of two measurements of the same thing: the lower minimum under ``min``
        (more blocks only bring the minimum closer to the undisturbed cost), the smaller spread
        under ``median``."""
        if statistic == "median":
            return other if other.spread < self.spread else self
        return other if other.min_ms < self.min_ms else self

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> "Measurement":
        """Statistics of per-call times in milliseconds (linear-interpolated percentiles)."""
        if not samples_ms:
            raise ValueError("no samples")
        values = sorted(float(s) for s in samples_ms)
        return cls(
            median_ms=_percentile(values, 50.0),
            p10_ms=_percentile(values, 10.0),
            p90_ms=_percentile(values, 90.0),
            n=len(values),
            min_ms=values[0],
        )


def _percentile(sorted_values: list[float], q: float) -> float:
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator() -> bool:
    """Set glibc's mmap threshold to 64 MiB and trim threshold to 128 MiB in this process.

    Same effect as starting the process with :data:`ALLOCATOR_ENV`: big tensors stay on the heap
    between calls instead of being unmapped and faulted in again. Idempotent; a no-op (returning
    False) where the C library is not glibc.

    Returns:
        True if the thresholds are in effect (set now, earlier, or by the environment).
    """
    global _allocator_tuned_inprocess
    if _allocator_tuned_inprocess:
        return True
    libc = _glibc()
    if libc is None:
        log.info("not glibc: allocator tuning skipped")
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if not (ok_mmap and ok_trim):
        log.warning("mallopt refused the allocator thresholds (mmap ok=%s, trim ok=%s)", ok_mmap, ok_trim)
        return _env_tuned()
    _allocator_tuned_inprocess = True
    log.debug("glibc allocator tuned in-process: mmap threshold %d, trim threshold %d",
              _MMAP_THRESHOLD, _TRIM_THRESHOLD)
    return True


def _env_tuned() -> bool:
    return all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items())


def allocator_state() -> dict[str, Any]:
    """How this process's allocator is tuned (for provenance)."""
    return {
        "glibc": _glibc() is not None,
        "env": _env_tuned(),
        "mallopt": _allocator_tuned_inprocess,
        "mmap_threshold": _MMAP_THRESHOLD,
        "trim_threshold": _TRIM_THRESHOLD,
    }


def _warm_up(fn: Callable[[], Any], protocol: TimingProtocol, sync: Callable[[], None]) -> float:
    """Run ``fn`` for at least ``warmup_iters`` calls and ``warmup_ms``; return seconds per call."""
    start = time.perf_counter()
    calls = 0
    deadline = protocol.warmup_ms / 1e3
    tail_start, tail_calls = start, 0
    while calls < max(1, protocol.warmup_iters) or time.perf_counter() - start < deadline:
        fn()
        sync()
        calls += 1
        tail_calls += 1
        # The first calls pay for primitive creation; estimate from the later half.
        if calls == max(1, protocol.warmup_iters) // 2:
            tail_start, tail_calls = time.perf_counter(), 0
    elapsed = time.perf_counter() - tail_start
    return elapsed / max(1, tail_calls)


def _timed_block(timer: tbench.Timer, number: int) -> float:
    """Seconds for ``number`` back-to-back calls of the timer's statement (no warm-up)."""
    try:
        return timer._timeit(number)  # noqa: SLF001 - Timer.timeit() would add >= 2 warm-up calls per sample
    except AttributeError:  # a torch whose Timer lacks the private hook
        return timer.timeit(number).raw_times[0]


def time_cpu(fn: Callable[[], Any], protocol: TimingProtocol, threads: int) -> Measurement:
    """Time ``fn`` on the CPU with ``threads`` intra-op threads (``torch.utils.benchmark.Timer``).

    Samples are blocks of back-to-back calls lasting about ``min_run_time_s / (2 * repeats)``
    (at least one call), and there are at least ``repeats`` of them and enough to fill
    ``min_run_time_s``. Timer's own ``blocked_autorange`` is not used: its power-of-ten block sizes
    with a 1e-4 overhead target give blocks of 25-100 ms here, so only 2-3 samples in 0.2 s.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        per_call_s = max(_warm_up(fn, protocol, lambda: None), 1e-7)
        timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
        block_s = protocol.min_run_time_s / (2 * protocol.repeats)
        number = max(1, round(block_s / per_call_s))
        blocks = max(protocol.repeats, math.ceil(protocol.min_run_time_s / (number * per_call_s)))
        samples = [_timed_block(timer, number) / number * 1e3 for _ in range(blocks)]
    finally:
        # The thread count is process-wide; leave it as the caller had it.
        torch.set_num_threads(previous)
    return Measurement.from_samples(samples)


def time_cuda(fn: Callable[[], Any], protocol: TimingProtocol, index: int = 0) -> Measurement:
    """Time ``fn`` on CUDA device ``index`` with CUDA events around blocks of back-to-back calls."""
    if not torch.cuda.is_available():
        raise ProfileError("CUDA timing asked for, but no CUDA device is visible to this process")
    torch.backends.cudnn.benchmark = True  # autotuning happens during warm-up
    with torch.cuda.device(index):
        sync = torch.cuda.synchronize
        _warm_up(fn, protocol, sync)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # Estimate device time per call, growing the probe until it is long enough to trust.
        probe = 1
        while True:
            start.record()
            for _ in range(probe):
                fn()
            end.record()
            end.synchronize()
            probe_ms = start.elapsed_time(end)
            if probe_ms >= protocol.block_ms or probe >= 4096:
                break
            probe = min(4096, max(probe * 2, math.ceil(probe * protocol.block_ms / max(probe_ms, 1e-3))))
        per_call_ms = max(probe_ms / probe, 1e-4)
        reps = max(1, math.ceil(protocol.block_ms / per_call_ms))
        blocks = max(protocol.repeats, math.ceil(protocol.min_run_time_s * 1e3 / (reps * per_call_ms)))
        blocks = min(blocks, max(protocol.repeats, 1000))
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(blocks)
        ]
        # No host synchronize between blocks: they queue back to back, so a block measures the
        # device's time for its calls (plus launch gaps only where launching is the bottleneck,
        # which eager deployment pays too); one synchronize at the end.
        for ev_start, ev_end in events:
            ev_start.record()
            for _ in range(reps):
                fn()
            ev_end.record()
        sync()
        samples = [s.elapsed_time(e) / reps for s, e in events]
    return Measurement.from_samples(samples)


def time_cuda_flushed(fn: Callable[[], Any], protocol: TimingProtocol, index: int = 0,
                      flush_bytes: int | None = None) -> Measurement:
    """Time single calls of ``fn`` on CUDA with L2 flushed before each (as Triton's ``do_bench``):
    a buffer larger than L2 is zeroed between calls, outside the events around the call."""
    if not torch.cuda.is_available():
        raise ProfileError("CUDA timing asked for, but no CUDA device is visible to this process")
    torch.backends.cudnn.benchmark = True
    with torch.cuda.device(index):
        size = flush_bytes or 2 * last_level_cache_bytes("cuda", index)
        cache = torch.empty(int(size) // 4, dtype=torch.int32, device=f"cuda:{index}")
        _warm_up(fn, protocol, torch.cuda.synchronize)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cache.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        per_call_ms = max(start.elapsed_time(end), 1e-3)
        n = max(protocol.repeats, math.ceil(protocol.min_run_time_s * 1e3 / per_call_ms))
        n = min(n, max(protocol.repeats, 1000))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for ev_start, ev_end in events:
            cache.zero_()
            ev_start.record()
            fn()
            ev_end.record()
        torch.cuda.synchronize()
        samples = [s.elapsed_time(e) for s, e in events]
        del cache
    return Measurement.from_samples(samples)


def last_level_cache_bytes(kind: str = "cpu", index: int = 0) -> int:
    """The last-level cache of this machine's CPU (sysfs, the largest cache level of cpu0) or of CUDA
    device ``index`` (its L2); :data:`DEFAULT_LLC_BYTES` where it cannot be read."""
    if kind == "cuda":
        try:
            return int(torch.cuda.get_device_properties(index).L2_cache_size) or DEFAULT_LLC_BYTES
        except (AttributeError, RuntimeError, AssertionError):
            return DEFAULT_LLC_BYTES
    best, base = 0, "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(base, entry, "size"), encoding="ascii") as fh:
                text = fh.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        return DEFAULT_LLC_BYTES
    return best or DEFAULT_LLC_BYTES


def cold_copies(footprint_bytes: int, cache_bytes: int, *, factor: float = COLD_FOOTPRINT,
                max_copies: int = COLD_MAX_COPIES, max_bytes: int = COLD_MAX_BYTES) -> int:
    """How many copies of a layer (``footprint_bytes`` each: weights, input, output) to rotate through so
    that together they exceed ``factor`` times the cache: 1 when one copy already does, at most
    ``max_copies`` and ``max_bytes`` in all (at least 1)."""
    footprint = max(1, int(footprint_bytes))
    want = math.ceil(factor * cache_bytes / footprint)
    return max(1, min(want, max_copies, max(1, max_bytes // footprint)))


def time_callable(fn: Callable[[], Any], device: Any, protocol: TimingProtocol, *, flush: bool = False) -> Measurement:
    """Time ``fn`` on ``device`` (a :class:`~fleetprune.profiler.device.DeviceInfo`) with ``protocol``.

    ``flush`` (the profiler's ``cold`` mode on CUDA): single calls with L2 flushed before each
    (:func:`time_cuda_flushed`). The caller decides the autograd mode; the profiler calls this under
    ``torch.inference_mode``.
    """
    if device.kind == "cuda":
        if flush:
            return time_cuda_flushed(fn, protocol, device.index)
        return time_cuda(fn, protocol, device.index)
    return time_cpu(fn, protocol, int(device.threads or torch.get_num_threads()))
