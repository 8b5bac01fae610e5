"""The fake timing backend: deterministic, staircase in channels, sleeps when asked."""

from __future__ import annotations

import time

import pytest

from fleetprune.profiler import FakeTimingBackend, TimingBackend, fake_device
from fleetprune.tables.config import LayerConfig

DEV = fake_device("fake-cpu-t1", "Fake CPU")


def _conv(cin, cout, **kw):
    return LayerConfig("conv", cin, cout, kh=3, kw=3, ph=1, pw=1, in_h=16, in_w=16, **kw)


def test_fake_backend_is_a_timing_backend_and_deterministic():
    a, b = FakeTimingBackend(DEV), FakeTimingBackend(DEV)
    assert isinstance(a, TimingBackend)
    assert "Fake" in type(a).__name__
    cfg = _conv(24, 40)
    ma, mb = a.measure(cfg), b.measure(cfg)
    assert ma == mb == a.measure(cfg)
    assert ma.p10_ms <= ma.median_ms <= ma.p90_ms and ma.n > 0
    assert a.calls == 2


def test_fake_latency_is_a_16_channel_staircase():
    be = FakeTimingBackend(DEV)
    lat = be.latency_ms
    assert lat(_conv(32, 17)) == lat(_conv(32, 32)) > lat(_conv(32, 16))
    assert lat(_conv(17, 32)) == lat(_conv(32, 32)) > lat(_conv(16, 32))
    assert lat(_conv(33, 48)) > lat(_conv(32, 48))
    dw = lambda c: LayerConfig("dwconv", c, c, kh=3, kw=3, ph=1, pw=1, groups=c, in_h=16, in_w=16)  # noqa: E731
    assert lat(dw(17)) == lat(dw(32)) > lat(dw(16))
    assert lat(dw(32)) < lat(_conv(32, 32))  # depthwise does cin/groups = 1 work per output


def test_fake_latency_follows_work_dtype_and_speed():
    be = FakeTimingBackend(DEV)
    assert be.latency_ms(_conv(64, 64)) > be.latency_ms(_conv(32, 32))
    assert be.latency_ms(_conv(64, 64, dtype="bf16")) < be.latency_ms(_conv(64, 64))
    assert be.latency_ms(_conv(64, 64, batch=4)) > be.latency_ms(_conv(64, 64))
    fast = FakeTimingBackend(DEV, speed=2.0)
    assert fast.latency_ms(_conv(64, 64)) < be.latency_ms(_conv(64, 64))
    assert be.latency_ms(LayerConfig("linear", 64, 10)) > 0


def test_fake_backend_sleeps_cost_s_per_measure():
    be = FakeTimingBackend(DEV, cost_s=0.05)
    start = time.perf_counter()
    be.measure(_conv(16, 16))
    assert time.perf_counter() - start >= 0.05
    with pytest.raises(ValueError):
        FakeTimingBackend(DEV, cost_s=-1)
