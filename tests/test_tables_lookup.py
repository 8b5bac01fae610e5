"""LatencyTable lookups: exact hits, misses that say what to measure, the optional correction."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from fleetprune.errors import MissingConfigsError
from fleetprune.tables import LatencyTable, LayerConfig, TableStore, make_row

DEV = "cuda-test-gpu"


def cfg(cin: int, cout: int, **kw) -> LayerConfig:
    return LayerConfig("conv", cin, cout, 3, 3, 1, 1, 1, 1, 1, 1, 14, 14, **kw)


@pytest.fixture
def table(tmp_path) -> LatencyTable:
    store = TableStore(tmp_path)
    rows = [make_row(cfg(c, c), DEV, c / 100, c / 110, c / 90, 9) for c in range(16, 129, 16)]
    store.write(DEV, rows, {"device_name": "GPU"})
    return store.read(DEV)


def test_lookup_is_exact_on_the_key(table):
    assert table.lookup(cfg(32, 32)) == pytest.approx(0.32)
    assert cfg(32, 32) in table and cfg(32, 32).key in table
    # Any field that differs is a different configuration, never a near neighbour.
    for change in ({"batch": 2}, {"dtype": "fp16"}, {"memory_format": "nhwc"}, {"act": "none"}, {"in_h": 15}):
        other = dataclasses.replace(cfg(32, 32), **change)
        assert other not in table
        with pytest.raises(MissingConfigsError):
            table.lookup(other)
    assert table.lookup_key(cfg(48, 48).key) == pytest.approx(0.48)


def test_lookup_many_returns_values_in_order(table):
    values = table.lookup_many([cfg(128, 128), cfg(16, 16), cfg(128, 128)])
    assert isinstance(values, np.ndarray) and values.dtype == np.float64
    np.testing.assert_allclose(values, [1.28, 0.16, 1.28])
    assert table.lookup_many([]).shape == (0,)


def test_a_miss_names_every_missing_config_and_the_commands_that_measure_them(table, tmp_path):
    wanted = [cfg(16, 16)] + [cfg(c, 8) for c in range(1, 15)] + [cfg(1, 8)] + [cfg(3, 3, batch=8, dtype="fp16")]
    with pytest.raises(MissingConfigsError) as err:
        table.lookup_many(wanted)
    missing = [cfg(c, 8) for c in range(1, 15)] + [cfg(3, 3, batch=8, dtype="fp16")]
    assert err.value.missing == [c.key for c in missing]  # deduplicated, hits left out
    message = str(err.value)
    assert "lacks 15 layer configurations" in message
    assert all(c.key in message for c in missing[:10]) and missing[10].key not in message
    assert "and 5 more" in message
    assert "the model you are pruning" in message
    root = str(tmp_path)
    command = f"fleetprune profile MODEL --tables {root} --devices {DEV} --batch 1 --dtype fp32 --memory-format nchw"
    assert command in message
    assert f"--devices {DEV} --batch 8 --dtype fp16 --memory-format nchw" in message
    assert table.missing(wanted) == missing


def test_single_lookup_miss_is_a_missing_configs_error(table):
    with pytest.raises(MissingConfigsError) as err:
        table.lookup(cfg(17, 17))
    assert err.value.missing == [cfg(17, 17).key]
    assert "lacks 1 layer configuration:" in str(err.value)


def test_correction_comes_from_provenance():
    frame = pd.DataFrame({"key": ["a"], "lat_ms": [1.0]})
    assert LatencyTable(DEV, {}, frame).correction is None
    assert LatencyTable(DEV, {"correction": [1.5, 0.25]}, frame).correction == (1.5, 0.25)
    assert LatencyTable(DEV, {"correction": {"a": 2, "b": -1, "mape": 0.03}}, frame).correction == (2.0, -1.0)
    assert LatencyTable(DEV, {"correction": "junk"}, frame).correction is None


def test_lookups_are_fast_enough_for_a_pruner(table):
    import time

    configs = [cfg(c, c) for c in range(16, 129, 16)] * 2500  # 20,000 lookups
    start = time.process_time()
    for c in configs:
        table.lookup(c)
    table.lookup_many(configs)
    # CPU time, so a loaded machine does not fail it: about 2 µs each is expected.
    assert time.process_time() - start < 1.0
