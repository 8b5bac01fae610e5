"""Op-kind rows in tables (issue 13): schema 2 tables still read and price as before (and say so), a
missing op row names the profile command, and profiling the new rows into an old table rewrites nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fleetprune.cli import main
from fleetprune.profiler import FakeTimingBackend, fake_device
from fleetprune.pruner import setting as settings
from fleetprune.pruner.calibrate import settle
from fleetprune.pruner.latency import LatencyModel
from fleetprune.tables import TableStore, make_row
from fleetprune.tables.schema import METADATA_KEY, rows_to_table

from test_op_kinds_plan import ResidualNet, SENet, plan_of

DEV = "fake-ops"
FAKE = FakeTimingBackend(fake_device(DEV, "fake ops"))
PROV = {"device_key": DEV, "device_name": "fake ops", "timing_protocol": {"statistic": "min"}}


def rows(configs) -> list[dict]:
    out = []
    for c in configs:
        ms = FAKE.latency_ms(c)
        out.append(make_row(c, DEV, ms, ms, ms * 1.01, 15, minimum=ms, latency=ms))
    return out


def write_version_2(root: Path, configs) -> Path:
    """A part file as fleetprune wrote it before op rows existed (schema version 2)."""
    table = rows_to_table(rows(configs), PROV).drop_columns(["device_key"])
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(dict(meta, schema_version=2))})
    folder = root / f"device_key={DEV}"
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000000T000000000000Z-v2.parquet")
    return folder / "part-00000000T000000000000Z-v2.parquet"


def layer_configs(plan):
    return sorted({c for layer in plan.layers for c in plan.layer_configs(layer)})


def test_a_schema_2_table_reads_and_prices_as_before_and_says_so(tmp_path):
    plan = plan_of(SENet())
    write_version_2(tmp_path, layer_configs(plan))
    table = TableStore(tmp_path).read(DEV)
    assert table.provenance["schema_version"] == 2 and not table.covers_ops and table.op_kinds == frozenset()
    assert table.missing(plan.configs()) == []  # what it served before, it still serves
    assert {c.op for c in table.missing(plan.configs(), ops=True)} == {"se", "adaptive_avgpool"}
    lm = LatencyModel(plan, table)
    assert not lm.ops_priced and [layer.name for layer in lm.layers] == [layer.name for layer in plan.layers]
    widths = {g.name: g.choices[0] for g in plan.prunable_groups()}
    assert lm.layer_sum(widths) == pytest.approx(
        sum(FAKE.latency_ms(plan.layer_config(layer, widths)) for layer in plan.layers))
    # it says so, naming the kinds and what to profile
    assert "no rows of adaptive_avgpool, se" in lm.ops_note
    assert f"fleetprune profile MODEL --tables {tmp_path} --devices {DEV}" in lm.ops_note
    st = settle(plan, table).to_dict()
    assert st["ops_priced"] is False and st["pricing_note"] == lm.ops_note


def test_a_missing_row_of_a_new_kind_names_the_profile_command(tmp_path):
    plan = plan_of(ResidualNet())
    [add] = [c for c in plan.configs() if c.op == "add" and c.cin == plan.group("stem.0").choices[0]]
    store = TableStore(tmp_path)
    store.write(DEV, rows([c for c in plan.configs() if c != add]), PROV)
    table = store.read(DEV)
    assert table.covers_ops and table.op_kinds == {"add", "adaptive_avgpool"}
    assert table.missing(plan.configs()) == [add]
    s = settings.Setting(1, "fp32", "nchw", 8, 32, (3, 16, 16), default_shape=(3, 32, 32))
    err = settings.missing_error(table, table.missing(plan.configs()), "residualnet", str(tmp_path), s)
    assert add.key in str(err) and err.missing == [add.key]
    assert (f"fleetprune profile residualnet --tables {tmp_path} --devices {DEV} --batch 1 --dtype fp32 "
            "--memory-format nchw --round-to 8 --input-size 16") in str(err)
    # pricing a network that needs the row names it too, never skips it
    lm = LatencyModel(plan, table)
    with pytest.raises(Exception, match="add\\|b1") as miss:
        lm.layer_sum({"stem.0": add.cin})
    assert "fleetprune profile" in str(miss.value)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_profiling_an_old_table_adds_the_op_rows_and_rewrites_nothing(tmp_path):
    """`fleetprune profile` measures the op rows the plan adds (same verb, same fleet code) into a root
    that holds a schema 2 part: that file stays byte for byte, its rows stand, only op rows are new."""
    fresh = tmp_path / "fresh"
    argv = ["profile", "resnet20", "--ray-address", "none", "--backend", "fake", "--threads", "1", "--batch", "2",
            "--round-to", "8", "--max-choices", "2"]
    assert main([*argv, "--tables", str(fresh)]) == 0
    [dev] = TableStore(str(fresh)).devices()
    full = TableStore(str(fresh)).read(dev.device_key)
    assert {"add", "maxpool", "adaptive_avgpool"} & set(full.op_kinds) == {"add", "adaptive_avgpool"}
    layers = full.frame[full.frame["op"].isin(["conv", "dwconv", "linear"])]

    old = tmp_path / "old"
    folder = old / f"device_key={dev.device_key}"
    folder.mkdir(parents=True)
    v2 = rows_to_table(layers.drop(columns=["statistic"]).to_dict("records"), dict(full.provenance))
    meta = json.loads(v2.schema.metadata[METADATA_KEY])
    v2 = v2.drop_columns(["device_key"]).replace_schema_metadata(
        {METADATA_KEY: json.dumps(dict(meta, schema_version=2))})
    path = folder / "part-00000000T000000000000Z-v2.parquet"
    pq.write_table(v2, path)
    before = _digest(path)
    assert TableStore(str(old)).read(dev.device_key).missing(full.configs()) == []  # priced as before

    assert main([*argv, "--tables", str(old)]) == 0
    assert _digest(path) == before
    parts = sorted(folder.glob("part-*.parquet"))
    assert len(parts) >= 2 and path in parts
    added = [r for p in parts if p != path for r in pq.read_table(p).to_pylist()]
    assert added and {r["op"] for r in added} <= {"add", "adaptive_avgpool", "maxpool", "act", "concat"}
    table = TableStore(str(old)).read(dev.device_key)
    assert table.covers_ops and set(table.keys()) == set(full.keys())
    kept = table.frame.set_index("key").loc[layers["key"], "measured_at"]
    assert (kept.values == layers.set_index("key")["measured_at"].values).all()


def test_a_table_with_other_op_kinds_says_what_to_profile_for_a_model_that_needs_more(tmp_path):
    """Rows of adds and pools (profiled for a ResNet) do not price a model with Hardswish and GELU rows:
    the miss names those rows and the one command that measures them, nothing is skipped."""
    from test_op_kinds_plan import ActNet

    store = TableStore(tmp_path)
    store.write(DEV, rows(plan_of(ResidualNet()).configs()), PROV)
    act = plan_of(ActNet())
    store.write(DEV, rows(layer_configs(act)), PROV)  # every conv and linear, no act rows
    table = store.read(DEV)
    missing = table.missing(act.configs())
    assert missing and {c.op for c in missing} == {"act"}
    assert {c.act for c in missing} == {"hardswish", "relu6", "silu", "gelu", "sigmoid"}
    s = settings.Setting(1, "fp32", "nchw", 8, 32, (3, 16, 16), default_shape=(3, 16, 16))
    err = settings.missing_error(table, missing, "actnet", str(tmp_path), s)
    assert f"fleetprune profile actnet --tables {tmp_path} --devices {DEV}" in str(err)
    assert all(c.key in str(err) or "more" in str(err) for c in missing[:10])
