"""profile_configs: one valid row per configuration, shuffled order, noisy re-measure logic."""

from __future__ import annotations

import dataclasses
import random

import pytest

from fleetprune.errors import ProfileError
from fleetprune.profiler import (
    FakeTimingBackend,
    Measurement,
    TimingProtocol,
    TorchTimingBackend,
    cpu_device,
    fake_device,
    profile_configs,
)
from fleetprune.tables.config import LayerConfig
from fleetprune.tables.schema import ROW_SCHEMA, rows_to_table

DEV = fake_device("fake-cpu-t1", "Fake CPU")


def _grid(n=12):
    return [LayerConfig("conv", 8 * (i % 4 + 1), 8 * (i // 4 + 1), kh=3, kw=3, ph=1, pw=1, in_h=8, in_w=8)
            for i in range(n)]


class ScriptedBackend:
    """A fake backend whose spread follows a script per configuration key (median protocol)."""

    def __init__(self, spreads):
        self.device = DEV
        self.protocol = dataclasses.replace(TimingProtocol.quick(), statistic="median")
        self.spreads = spreads  # key -> list of spreads for successive measurements
        self.calls: dict[str, int] = {}

    def measure(self, config):
        i = self.calls.get(config.key, 0)
        self.calls[config.key] = i + 1
        script = self.spreads.get(config.key, [0.02])
        spread = script[min(i, len(script) - 1)]
        median = 1.0 + i  # tells which measurement was kept
        return Measurement(median, median * (1 - spread / 2), median * (1 + spread / 2), 10 + i)


def test_real_cpu_rows_are_valid_and_one_per_config():
    configs = [
        LayerConfig("conv", 4, 8, kh=3, kw=3, ph=1, pw=1, in_h=8, in_w=8),
        LayerConfig("dwconv", 8, 8, kh=3, kw=3, ph=1, pw=1, groups=8, in_h=8, in_w=8, memory_format="nhwc"),
        LayerConfig("linear", 16, 4, act="none"),
    ]
    backend = TorchTimingBackend(cpu_device(1), TimingProtocol.quick())
    rows = list(profile_configs(configs, backend))
    assert sorted(r["key"] for r in rows) == sorted(c.key for c in configs)
    for row in rows:
        assert row["device_key"] == backend.device.key
        assert 0 < row["lat_ms_min"] <= row["lat_ms_p10"] <= row["lat_ms_median"] <= row["lat_ms_p90"]
        assert row["lat_ms"] == row["lat_ms_min"]  # the default protocol's statistic
        assert row["n_samples"] >= TimingProtocol.quick().repeats
        assert isinstance(row["noisy"], bool)
    table = rows_to_table(rows, {"device_key": backend.device.key})
    assert table.schema.equals(ROW_SCHEMA, check_metadata=False) and table.num_rows == 3


def test_order_is_shuffled_by_seed_and_duplicates_are_measured_once():
    configs = _grid(12)
    backend = FakeTimingBackend(DEV)
    order0 = [r["key"] for r in profile_configs(configs + configs[:3], backend, seed=0)]
    assert len(order0) == 12 and backend.calls == 12
    assert order0 != [c.key for c in configs]
    assert order0 == [r["key"] for r in profile_configs(configs, FakeTimingBackend(DEV), seed=0)]
    assert order0 != [r["key"] for r in profile_configs(configs, FakeTimingBackend(DEV), seed=1)]
    expected = list(configs)
    random.Random(0).shuffle(expected)
    assert order0 == [c.key for c in expected]


def test_noisy_first_measurement_is_remeasured_and_not_flagged_when_clean():
    clean, recovers, stays, worse = _grid(4)
    backend = ScriptedBackend({
        recovers.key: [0.5, 0.03],  # noisy, then fine: keep the second, not noisy
        stays.key: [0.3, 0.2],  # noisy twice: keep the better (second), flag noisy
        worse.key: [0.2, 0.4],  # noisy twice, re-measure worse: keep the first, flag noisy
    })
    rows = {r["key"]: r for r in profile_configs([clean, recovers, stays, worse], backend)}
    assert backend.calls == {clean.key: 1, recovers.key: 2, stays.key: 2, worse.key: 2}
    assert not rows[clean.key]["noisy"] and rows[clean.key]["lat_ms_median"] == 1.0
    assert not rows[recovers.key]["noisy"] and rows[recovers.key]["lat_ms_median"] == 2.0
    assert rows[stays.key]["noisy"] and rows[stays.key]["lat_ms_median"] == 2.0
    assert rows[worse.key]["noisy"] and rows[worse.key]["lat_ms_median"] == 1.0
    assert rows[worse.key]["n_samples"] == 10


def test_noise_limit_comes_from_the_protocol_or_the_argument():
    (cfg,) = _grid(1)
    backend = ScriptedBackend({cfg.key: [0.15]})
    assert list(profile_configs([cfg], backend))[0]["noisy"]  # 15% > quick protocol's 10%
    backend = ScriptedBackend({cfg.key: [0.15]})
    row = list(profile_configs([cfg], backend, noise_limit=0.2))[0]
    assert not row["noisy"] and backend.calls[cfg.key] == 1


class MinimumBackend:
    """A fake backend under the default (minimum) protocol: each measurement's (min, p10) is scripted."""

    def __init__(self, script):
        self.device = DEV
        self.protocol = TimingProtocol.quick()
        self.script = script  # key -> list of (min, p10) for successive measurements
        self.calls: dict[str, int] = {}

    def measure(self, config):
        i = self.calls.get(config.key, 0)
        self.calls[config.key] = i + 1
        script = self.script.get(config.key, [(1.0, 1.02)])
        low, p10 = script[min(i, len(script) - 1)]
        return Measurement(median_ms=2 * p10, p10_ms=p10, p90_ms=3 * p10, n=10, min_ms=low)


def test_under_the_minimum_protocol_rows_carry_the_minimum_and_lone_fast_blocks_are_rechecked():
    steady, lone, stays = _grid(3)
    backend = MinimumBackend({
        lone.key: [(0.5, 1.0), (0.9, 0.95)],  # a lone fast block, then a consistent slower one: 0.5 stands, noisy
        stays.key: [(0.5, 1.0), (0.6, 1.0)],  # inconsistent twice: the lower min, flagged noisy
    })
    assert TimingProtocol.quick().statistic == "min"
    rows = {r["key"]: r for r in profile_configs([steady, lone, stays], backend)}
    assert backend.calls == {steady.key: 1, lone.key: 2, stays.key: 2}
    assert rows[steady.key]["lat_ms"] == rows[steady.key]["lat_ms_min"] == 1.0
    assert rows[steady.key]["lat_ms_median"] == pytest.approx(2.04) and not rows[steady.key]["noisy"]
    assert rows[lone.key]["lat_ms"] == 0.5 and rows[lone.key]["noisy"]  # 0.5 is still alone below p10 1.0
    assert rows[stays.key]["lat_ms"] == 0.5 and rows[stays.key]["noisy"]


def test_unbuildable_config_raises_after_earlier_rows():
    good = LayerConfig("conv", 4, 4, kh=1, kw=1, in_h=4, in_w=4)
    bad = LayerConfig("conv", 4, 4, kh=1, kw=1, in_h=4, in_w=4, dtype="fp16")
    backend = TorchTimingBackend(cpu_device(1), TimingProtocol.quick())
    rows = []
    with pytest.raises(ProfileError, match="fp16"):
        for row in profile_configs([good, bad], backend, seed=3):
            rows.append(row)
    assert all(r["key"] == good.key for r in rows)


@pytest.mark.gpu
def test_cuda_rows_are_valid():
    from fleetprune.profiler import cuda_device

    configs = [
        LayerConfig("conv", 64, 64, kh=3, kw=3, ph=1, pw=1, in_h=32, in_w=32, batch=8, dtype="fp16",
                    memory_format="nhwc"),
        LayerConfig("linear", 512, 1000, batch=8, act="none"),
    ]
    backend = TorchTimingBackend(cuda_device(0), TimingProtocol.quick())
    rows = list(profile_configs(configs, backend))
    assert sorted(r["key"] for r in rows) == sorted(c.key for c in configs)
    for row in rows:
        assert row["device_key"].startswith("cuda-")
        assert 0 < row["lat_ms_p10"] <= row["lat_ms_median"] <= row["lat_ms_p90"]
        assert row["n_samples"] >= TimingProtocol.quick().repeats
