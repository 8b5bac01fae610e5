"""Timing protocol, statistics and allocator tuning."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest
import torch

from fleetprune.profiler import ALLOCATOR_ENV, Measurement, TimingProtocol, cpu_device, time_callable, tune_allocator
from fleetprune.profiler.timing import allocator_state


def test_measurement_statistics_from_samples():
    m = Measurement.from_samples([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0])
    assert m.n == 11
    assert m.median_ms == 6.0
    assert m.p10_ms == pytest.approx(2.0)
    assert m.p90_ms == pytest.approx(10.0)
    assert m.spread == pytest.approx(8.0 / 6.0)
    one = Measurement.from_samples([2.5])
    assert (one.p10_ms, one.median_ms, one.p90_ms, one.n) == (2.5, 2.5, 2.5, 1)
    with pytest.raises(ValueError):
        Measurement.from_samples([])


def test_protocol_validates_and_quick_is_quicker():
    quick, default = TimingProtocol.quick(), TimingProtocol()
    assert quick.min_run_time_s < default.min_run_time_s and quick.repeats <= default.repeats
    assert default.noise_limit == 0.10
    with pytest.raises(ValueError):
        TimingProtocol(repeats=0)
    with pytest.raises(ValueError):
        TimingProtocol(min_run_time_s=0)
    assert set(default.to_dict()) >= {"warmup_ms", "min_run_time_s", "repeats", "noise_limit"}


def test_cpu_timing_gives_ordered_stats_and_enough_samples():
    calls = []
    a = torch.randn(64, 64)

    def fn():
        calls.append(1)
        return a @ a

    proto = TimingProtocol.quick()
    m = time_callable(fn, cpu_device(1), proto)
    assert m.n >= proto.repeats
    assert 0 < m.p10_ms <= m.median_ms <= m.p90_ms
    assert len(calls) >= m.n + proto.warmup_iters


def test_slow_callable_still_gets_repeats_samples():
    import time

    proto = TimingProtocol(warmup_ms=0, min_run_time_s=0.001, repeats=4, warmup_iters=1)
    m = time_callable(lambda: time.sleep(0.004), cpu_device(1), proto)
    assert m.n >= 4
    assert m.median_ms >= 4.0


def test_timing_sets_the_requested_threads():
    seen = []
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    time_callable(lambda: seen.append(torch.get_num_threads()), cpu_device(target), TimingProtocol.quick())
    assert set(seen) == {target}
    assert torch.get_num_threads() == before  # restored for the rest of the process


def test_allocator_env_matches_in_process_thresholds():
    assert ALLOCATOR_ENV == {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "134217728"}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_allocator_keeps_big_buffers_off_mmap():
    assert tune_allocator() is True
    assert tune_allocator() is True  # idempotent
    assert allocator_state()["mallopt"] is True
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblks
    ptr = libc.malloc(40 << 20)  # above glibc's largest dynamic threshold (32 MiB), below ours
    mapped = libc.mallinfo2().hblks - before
    libc.free(ptr)
    assert mapped == 0


def test_protocol_round_trips_through_provenance_and_rejects_junk():
    from fleetprune.profiler import TimingProtocol

    p = TimingProtocol.quick()
    assert TimingProtocol.from_dict({**p.to_dict(), "unknown_future_field": 1}) == p
    assert TimingProtocol.from_dict({"repeats": 0}) is None  # invalid values
    assert TimingProtocol.from_dict("not a dict") is None


def test_the_minimum_is_kept_and_the_protocol_names_the_latency():
    m = Measurement.from_samples([3.0, 1.5, 2.0, 9.0, 2.5])
    assert m.min_ms == 1.5 and m.latency("min") == 1.5 and m.latency("median") == m.median_ms == 2.5
    assert TimingProtocol().statistic == "min" and TimingProtocol().latency(m) == 1.5
    assert TimingProtocol(statistic="median").latency(m) == 2.5
    with pytest.raises(ValueError, match="statistic"):
        TimingProtocol(statistic="mean")
    # percentiles only (a fake backend, old callers): the minimum defaults to the 10th percentile
    assert Measurement(2.0, 1.0, 3.0, 5).min_ms == 1.0


def test_a_protocol_recorded_without_a_statistic_used_the_median():
    assert TimingProtocol.from_dict({"repeats": 5}).statistic == "median"  # a schema 1 table
    assert TimingProtocol.from_dict(TimingProtocol().to_dict()) == TimingProtocol()
    assert TimingProtocol.from_dict({"statistic": "mode"}) is None


def test_noise_and_combining_follow_the_statistic():
    lone = Measurement(median_ms=2.0, p10_ms=1.8, p90_ms=2.4, n=20, min_ms=1.0)  # one block far below the rest
    backed = Measurement(median_ms=2.2, p10_ms=1.62, p90_ms=2.6, n=20, min_ms=1.6)
    assert lone.noise("min") == pytest.approx(0.8) and backed.noise("min") == pytest.approx(0.0125)
    assert lone.noise("median") == lone.spread == pytest.approx(0.3)
    assert lone.combine(backed, "min") is lone  # the lower minimum wins
    assert backed.combine(lone, "min") is lone
    assert lone.combine(backed, "median") is lone  # the smaller spread wins (0.3 < 0.45)
