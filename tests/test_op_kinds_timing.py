"""The cold timing mode (issue 13): a layer timed in rotation over copies that exceed the last-level cache,
the mode recorded in the table's timing protocol and read back. No assertion on this machine's timings."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fleetprune.profiler import TimingProtocol, TorchTimingBackend, cpu_device, provenance
from fleetprune.profiler import backends
from fleetprune.profiler.timing import COLD_MAX_COPIES, Measurement, cold_copies, last_level_cache_bytes
from fleetprune.tables import LayerConfig, TableStore, make_row

COLD = dataclasses.replace(TimingProtocol.quick(), cache="cold")


def test_the_cache_mode_round_trips_and_old_protocols_were_warm():
    assert TimingProtocol().cache == "warm"  # the default stays until the figures decide
    assert TimingProtocol.from_dict(COLD.to_dict()) == COLD
    assert TimingProtocol.from_dict({"statistic": "min", "repeats": 5}).cache == "warm"
    with pytest.raises(ValueError, match="cache must be one of"):
        TimingProtocol(cache="lukewarm")


def test_copies_exceed_the_cache_within_limits():
    mib = 1 << 20
    assert cold_copies(1 * mib, 32 * mib) == 64
    assert cold_copies(100 * mib, 32 * mib) == 1  # one copy already spills the cache
    assert cold_copies(1024, 32 * mib) == COLD_MAX_COPIES
    assert cold_copies(64 * mib, 256 * mib, max_bytes=256 * mib) == 4
    assert cold_copies(1 * mib, 32 * mib, max_bytes=8 * mib) == 8
    assert last_level_cache_bytes() > 0


def test_cold_mode_rotates_through_copies(monkeypatch):
    seen: list[tuple[int, int]] = []
    captured = {}

    def fake_time(fn, device, protocol, *, flush=False):
        captured["flush"] = flush
        for _ in range(6):
            fn()
        return Measurement(1.0, 1.0, 1.0, 5)

    def hook(module, args):
        if isinstance(module, torch.nn.Conv2d):
            seen.append((id(module), args[0].data_ptr()))

    monkeypatch.setattr(backends, "time_callable", fake_time)
    monkeypatch.setattr(backends, "cold_copies", lambda footprint, cache: 3)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        config = LayerConfig("conv", 8, 8, 3, 3, 1, 1, 1, 1, in_h=8, in_w=8)
        TorchTimingBackend(cpu_device(1), COLD).measure(config)
        modules, inputs = [m for m, _ in seen[-6:]], [p for _, p in seen[-6:]]  # before: build_layer's smoke call
        assert len(set(modules)) == 3 and len(set(inputs)) == 3
        assert modules[:3] == modules[3:] and captured["flush"] is True
        seen.clear()
        TorchTimingBackend(cpu_device(1), TimingProtocol.quick()).measure(config)
        assert len({m for m, _ in seen[-6:]}) == 1 and captured["flush"] is False
    finally:
        handle.remove()


@pytest.mark.parametrize("config", [
    LayerConfig("add", 16, 16, in_h=8, in_w=8, act="relu", memory_format="nhwc"),
    LayerConfig("concat", 24, 24, groups=3, in_h=8, in_w=8, act="none"),
])
def test_cold_mode_times_op_rows_and_records_its_mode(tmp_path, config):
    device = cpu_device(1)
    m = TorchTimingBackend(device, COLD).measure(config)
    assert m.min_ms > 0 and m.n >= COLD.repeats
    store = TableStore(tmp_path)
    store.write(device.key, [make_row(config, device.key, m.median_ms, m.p10_ms, m.p90_ms, m.n, minimum=m.min_ms,
                                      latency=m.min_ms)], provenance(device, COLD))
    prov = store.read(device.key).provenance
    assert prov["timing_protocol"]["cache"] == "cold"
    assert TimingProtocol.from_dict(prov["timing_protocol"]) == COLD
