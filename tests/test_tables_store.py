"""TableStore: round trip, append with newest-wins, atomic writes, merge, validate, bad roots."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from fleetprune.errors import TableError
from fleetprune.tables import SCHEMA_VERSION, LayerConfig, TableStore, make_row
from fleetprune.tables.schema import METADATA_KEY, rows_to_table

DEV = "cpu-test-t2"
PROV = {"device_name": "Test CPU", "torch": "2.14.1", "threads": 2, "timing_protocol": {"repeats": 5}}
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def cfg(cin: int = 16, cout: int = 16, **kw) -> LayerConfig:
    return LayerConfig("conv", cin, cout, 3, 3, 1, 1, 1, 1, 1, 1, 8, 8, **kw)


def rows_for(device: str, configs, *, scale: float = 1.0, at: dt.datetime = T0) -> list[dict]:
    out = []
    for c in configs:
        m = c.cin * c.cout * 1e-3 * scale
        out.append(make_row(c, device, m, 0.9 * m, 1.1 * m, 7, measured_at=at, minimum=0.85 * m))
    return out


def grid(n: int = 4) -> list[LayerConfig]:
    return [cfg(16 * i, 16 * j) for i in range(1, n + 1) for j in range(1, n + 1)]


def part_files(root: Path, device: str = DEV) -> list[Path]:
    return sorted((root / f"device_key={device}").glob("part-*.parquet"))


def test_round_trip_keeps_every_column_and_the_provenance(tmp_path):
    store = TableStore(tmp_path)
    configs = grid(3) + [
        LayerConfig("linear", 64, 10, act="none"),
        LayerConfig("dwconv", 32, 32, 3, 3, groups=32, in_h=8, in_w=8),
    ]
    rows = rows_for(DEV, configs)
    rows[0]["noisy"] = True
    path = store.write(DEV, rows, PROV)

    assert Path(path).parent.name == f"device_key={DEV}" and Path(path).name.startswith("part-")
    table = store.read(DEV)
    assert len(table) == len(configs)
    assert table.provenance["device_name"] == "Test CPU"
    assert table.provenance["timing_protocol"] == {"repeats": 5}
    assert table.provenance["schema_version"] == SCHEMA_VERSION
    assert table.provenance["device_key"] == DEV
    back = table.frame.set_index("key")
    for row in rows:
        got = back.loc[row["key"]]
        for col, value in row.items():
            if col == "key":
                continue
            if col == "measured_at":
                assert got[col].to_pydatetime() == value
            else:
                assert got[col] == value, col
    assert sorted(table.configs()) == sorted(configs)
    assert store.measured_keys(DEV) == {c.key for c in configs}
    # The root is an ordinary Hive dataset for other tools; they skip our temp files the same way.
    assert ds.dataset(str(tmp_path), partitioning="hive").to_table().num_rows == len(configs)
    assert set(pd.read_parquet(tmp_path)["device_key"].astype(str)) == {DEV}


def test_file_uri_root_is_the_same_table_as_the_local_path(tmp_path):
    TableStore(f"file://{tmp_path}").write(DEV, rows_for(DEV, grid(2)), PROV)
    assert len(TableStore(str(tmp_path)).read(DEV)) == 4
    assert TableStore(f"file://{tmp_path}").measured_keys(DEV) == {c.key for c in grid(2)}


def test_mock_filesystem_round_trip_and_merge(tmp_path):
    local = TableStore(tmp_path)
    local.write(DEV, rows_for(DEV, grid(2)), PROV)
    mockfs, _ = pafs.FileSystem.from_uri("mock:///")
    remote = TableStore("tables", filesystem=mockfs)
    assert remote.merge_from(local) == 4
    assert TableStore("tables", filesystem=mockfs).read(DEV).lookup(cfg(32, 32)) == pytest.approx(32 * 32e-3)


def test_reprofiling_appends_and_the_newest_row_wins(tmp_path):
    store = TableStore(tmp_path)
    first, second = grid(2), [cfg(32, 32), cfg(64, 64)]
    store.write(DEV, rows_for(DEV, first, scale=1.0, at=T0), PROV)
    store.write(DEV, rows_for(DEV, second, scale=2.0, at=T0 + dt.timedelta(hours=1)), PROV)
    # A later file with an *older* measurement (e.g. merged in from a stale root) must not win.
    store.write(DEV, rows_for(DEV, [cfg(16, 16)], scale=5.0, at=T0 - dt.timedelta(hours=1)), PROV)

    assert len(part_files(tmp_path)) == 3
    table = store.read(DEV)
    assert len(table) == 5
    assert table.lookup(cfg(32, 32)) == pytest.approx(2 * 32 * 32e-3)
    assert table.lookup(cfg(64, 64)) == pytest.approx(2 * 64 * 64e-3)
    assert table.lookup(cfg(16, 16)) == pytest.approx(16 * 16e-3)
    assert table.lookup(cfg(16, 32)) == pytest.approx(16 * 32e-3)
    assert store.validate() == []  # the same key in two files is the normal append case


def test_equal_measured_at_breaks_ties_by_file_then_row_order(tmp_path):
    store = TableStore(tmp_path)
    store.write(DEV, rows_for(DEV, [cfg()], scale=1.0), PROV)
    store.write(DEV, rows_for(DEV, [cfg()], scale=3.0), PROV)
    assert store.read(DEV).lookup(cfg()) == pytest.approx(3 * 16 * 16e-3)
    store.write(DEV, rows_for(DEV, [cfg()], scale=4.0) + rows_for(DEV, [cfg()], scale=6.0), PROV)
    assert store.read(DEV).lookup(cfg()) == pytest.approx(6 * 16 * 16e-3)


def test_provenance_is_the_newest_files_and_a_correction_survives_reprofiling(tmp_path):
    store = TableStore(tmp_path)
    store.write(DEV, rows_for(DEV, grid(2)), dict(PROV, torch="2.13.0"))
    assert store.read(DEV).correction is None
    store.write(DEV, [], dict(PROV, correction={"a": 1.2, "b": 0.3, "r2": 0.99}))
    store.write(DEV, rows_for(DEV, [cfg()], at=T0 + dt.timedelta(days=1)), dict(PROV, torch="2.14.1"))
    table = store.read(DEV)
    assert table.provenance["torch"] == "2.14.1"
    assert table.correction == (1.2, 0.3)
    [summary] = store.devices()
    assert summary.provenance["correction"]["a"] == 1.2


def test_set_correction_adds_a_calibration_without_touching_measurements(tmp_path):
    store = TableStore(tmp_path)
    store.write(DEV, rows_for(DEV, grid(2)), PROV)
    store.set_correction(DEV, {"a": 1.25, "b": 0.5, "n": 6})
    table = store.read(DEV)
    assert table.correction == (1.25, 0.5) and table.provenance["correction"]["n"] == 6
    assert table.provenance["device_name"] == "Test CPU" and len(table) == 4
    with pytest.raises(TableError, match="'a' and 'b'"):
        store.set_correction(DEV, {"a": 1.0})
    with pytest.raises(TableError, match="finite"):
        store.set_correction(DEV, {"a": math.inf, "b": 0.0})
    assert store.read(DEV).correction == (1.25, 0.5)


def test_validation_rows_append_beside_the_device_tables(tmp_path):
    store = TableStore(tmp_path)
    store.write(DEV, rows_for(DEV, grid(1)), PROV)
    legacy = pd.DataFrame({"device_key": [DEV], "predicted_ms": [1.0], "measured_ms": [1.1], "run_id": ["r0"]})
    legacy.to_parquet(tmp_path / "validation.parquet")  # a single file, as an older writer left it
    row = {"device_key": DEV, "predicted_ms": 2.0, "measured_ms": 2.2, "run_id": "r1", "measured_at": T0}
    store.append_validation([row, dict(row, predicted_ms=3.0)], provenance=PROV)
    path = store.append_validation([dict(row, run_id="r2")], provenance=PROV)
    assert store.append_validation([]) == ""

    assert Path(path).parent == tmp_path / "validation.parquet"
    assert json.loads(pq.read_schema(path).metadata[METADATA_KEY])["device_name"] == "Test CPU"
    back = pd.read_parquet(tmp_path / "validation.parquet")
    assert sorted(back["run_id"]) == ["r0", "r1", "r1", "r2"]
    assert [s.device_key for s in store.devices()] == [DEV] and store.validate() == []


def test_write_refuses_rows_it_cannot_store_without_touching_the_root(tmp_path):
    store = TableStore(tmp_path)
    with pytest.raises(TableError, match="cannot be written"):
        store.write(DEV, rows_for("cuda-other", grid(1)), PROV)
    with pytest.raises(TableError, match="invalid device key"):
        store.write("CPU X/../y", rows_for("CPU X/../y", grid(1)), PROV)
    bad = rows_for(DEV, grid(1))
    del bad[0]["lat_ms_p90"]
    with pytest.raises(TableError, match="lat_ms_p90"):
        store.write(DEV, bad, PROV)
    assert list(tmp_path.iterdir()) == [] or not any(tmp_path.rglob("*.parquet*"))


_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from fleetprune.tables import LayerConfig, TableStore, make_row
    root, n = sys.argv[1], int(sys.argv[2])
    base = LayerConfig("conv", 1, 1, 3, 3, 1, 1, 1, 1, 1, 1, 8, 8)
    template = make_row(base, "cpu-kill", 1.0, 0.9, 1.1, 5)
    rows = [dict(template, cin=i, cout=i, key=base.with_channels(i, i).key) for i in range(1, n + 1)]
    store = TableStore(root)
    while True:
        store.write("cpu-kill", rows, {"device_name": "killed writer"})
    """
)


def test_a_writer_killed_mid_write_leaves_nothing_a_reader_sees(tmp_path):
    n = 10_000
    folder = tmp_path / "device_key=cpu-kill"
    for _attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path), str(n)])
        try:
            temp = None
            deadline = time.monotonic() + 60
            while temp is None and time.monotonic() < deadline:
                # Wait for one finished part, then catch the next write while its temp file is open.
                names = os.listdir(folder) if folder.exists() else []
                if any(x.startswith("part-") for x in names):
                    temp = next((x for x in names if x.startswith(".")), None)
                time.sleep(0.001)
            assert temp is not None, "the writer never got going"
            os.kill(proc.pid, signal.SIGSTOP)  # freeze it mid-write, then kill -9
            mid_write = (folder / temp).exists()
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        if mid_write:
            break
        for f in folder.iterdir():
            f.unlink()
    assert mid_write, "could not catch the writer mid-write in three tries"

    assert (folder / temp).exists()  # the half-written file is still there ...
    store = TableStore(tmp_path)
    visible = part_files(tmp_path, "cpu-kill")
    assert visible and all(pq.read_metadata(p).num_rows == n for p in visible)
    assert len(store.read("cpu-kill")) == n  # ... and no reader sees it
    assert store.validate() == []
    [summary] = store.devices()
    assert summary.files == len(visible) and summary.bad_files == ()
    assert len(pd.read_parquet(tmp_path)) == n * len(visible)


def test_merge_copies_missing_rows_keeps_newest_and_is_idempotent(tmp_path):
    a, b = TableStore(tmp_path / "a"), TableStore(f"file://{tmp_path / 'b'}")
    a.write(DEV, rows_for(DEV, grid(2), at=T0), PROV)
    b.write(DEV, rows_for(DEV, [cfg(16, 16), cfg(48, 48)], scale=2.0, at=T0 + dt.timedelta(hours=1)), PROV)
    b.write("cuda-h100", rows_for("cuda-h100", grid(2), scale=0.1), dict(PROV, device_name="H100", cuda="12.8"))
    b.write("cuda-h100", [], dict(PROV, device_name="H100", cuda="12.8", correction=[1.3, 0.1]))
    before_b = sorted(p.name for p in (tmp_path / "b").rglob("*"))

    assert a.merge_from(str(tmp_path / "b")) == 6
    files_after_first = sorted((tmp_path / "a").rglob("part-*.parquet"))
    assert a.merge_from(b) == 0
    assert sorted((tmp_path / "a").rglob("part-*.parquet")) == files_after_first  # nothing written twice
    assert sorted(p.name for p in (tmp_path / "b").rglob("*")) == before_b  # source untouched
    assert [s.device_key for s in a.devices()] == ["cpu-test-t2", "cuda-h100"]
    mine = a.read(DEV)
    assert len(mine) == 5
    assert mine.lookup(cfg(16, 16)) == pytest.approx(2 * 16 * 16e-3)  # newer measurement from b wins
    assert mine.lookup(cfg(16, 32)) == pytest.approx(16 * 32e-3)
    h100 = a.read("cuda-h100")
    assert h100.provenance["cuda"] == "12.8" and h100.provenance["merged_from"] == str(tmp_path / "b")
    assert h100.correction == (1.3, 0.1)
    assert a.validate() == []


def test_merge_from_a_corrupt_source_writes_nothing(tmp_path):
    src, dst = TableStore(tmp_path / "src"), TableStore(tmp_path / "dst")
    src.write(DEV, rows_for(DEV, grid(2)), PROV)
    src.write("cpu-other", rows_for("cpu-other", grid(2)), PROV)
    (tmp_path / "src" / f"device_key={DEV}" / "part-zz-bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(TableError, match="part-zz-bad.parquet"):
        dst.merge_from(src)
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").rglob("*.parquet"))


def _write_raw(folder: Path, name: str, table: pa.Table) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / name)
    return folder / name


def test_validate_reports_each_defect_and_read_skips_unusable_medians(tmp_path, caplog):
    store = TableStore(tmp_path)
    clean = store.write(DEV, rows_for(DEV, grid(2)), PROV)
    dup = store.write(DEV, rows_for(DEV, [cfg(16, 16), cfg(16, 16), cfg(32, 16)]), PROV)
    nan, neg, order = (make_row(cfg(96, 96), DEV, math.nan, 1, 2, 5), make_row(cfg(112, 112), DEV, 1.0, -0.5, 2, 5),
                       make_row(cfg(128, 128), DEV, 1.0, 1.5, 2.0, 5))
    mismatch = dict(make_row(cfg(144, 144), DEV, 1.0, 0.9, 1.1, 5), key="conv|made-up")
    numbers = store.write(DEV, [nan, neg, order, mismatch], PROV)
    newer = rows_to_table(rows_for(DEV, [cfg(160, 160)]), PROV)
    meta = json.loads(newer.schema.metadata[METADATA_KEY])
    newer = newer.replace_schema_metadata({METADATA_KEY: json.dumps(dict(meta, schema_version=SCHEMA_VERSION + 1))})
    folder = tmp_path / f"device_key={DEV}"
    newer_path = _write_raw(folder, "part-zz-newer.parquet", newer.drop_columns(["device_key"]))
    corrupt_path = folder / "part-zzz-corrupt.parquet"
    corrupt_path.write_bytes(b"this is not parquet")
    foreign = _write_raw(tmp_path / "device_key=cpu-foreign", "part-x.parquet", pa.table({"a": [1]}))

    found = {(Path(d.file).name, d.kind) for d in store.validate()}
    assert found == {
        (Path(dup).name, "duplicate_key"),
        (Path(numbers).name, "bad_latency"),  # NaN median and negative p10, one defect per kind and file
        (Path(numbers).name, "bad_percentiles"),
        (Path(numbers).name, "key_mismatch"),
        (newer_path.name, "newer_schema"),
        (corrupt_path.name, "corrupt"),
        (foreign.name, "corrupt"),
    }
    assert Path(clean).name not in {f for f, _ in found}
    detail = {d.kind: d.detail for d in store.validate() if Path(d.file).name == Path(numbers).name}
    assert "2 rows" in detail["bad_latency"] and cfg(96, 96).key in detail["bad_latency"]
    assert cfg(16, 16).key in next(d.detail for d in store.validate() if d.kind == "duplicate_key")

    corrupt_path.unlink()
    newer_path.unlink()
    with caplog.at_level("WARNING", logger="fleetprune.tables"):
        table = store.read(DEV)
    assert cfg(96, 96) not in table and cfg(112, 112) in table  # NaN median is unusable; a bad p10 is not
    assert cfg(96, 96).key not in store.measured_keys(DEV)  # so the profiler measures it again
    assert "1 rows with a NaN" in caplog.text


def test_a_corrupt_file_is_named_and_other_devices_still_read(tmp_path):
    store = TableStore(tmp_path)
    store.write(DEV, rows_for(DEV, grid(2)), PROV)
    store.write("cpu-healthy", rows_for("cpu-healthy", grid(2)), PROV)
    bad = tmp_path / f"device_key={DEV}" / "part-99999999T999999999999Z-broken.parquet"
    bad.write_bytes(b"PAR1\x00\x01garbage")

    assert len(store.read("cpu-healthy")) == 4
    with pytest.raises(TableError) as err:
        store.read(DEV)
    message = str(err.value)
    assert str(bad) in message and "Delete that file" in message and f"--devices {DEV}" in message
    with pytest.raises(TableError, match="broken"):
        store.measured_keys(DEV)
    summaries = {s.device_key: s for s in store.devices()}
    assert summaries[DEV].bad_files == (str(bad),) and summaries[DEV].rows == 4
    assert summaries["cpu-healthy"].bad_files == ()
    assert [(d.file, d.kind) for d in store.validate()] == [(str(bad), "corrupt")]


def test_a_newer_schema_version_asks_to_upgrade(tmp_path):
    table = rows_to_table(rows_for(DEV, grid(1)), PROV).drop_columns(["device_key"])
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps({"schema_version": SCHEMA_VERSION + 1})})
    path = _write_raw(tmp_path / f"device_key={DEV}", "part-1.parquet", table)
    with pytest.raises(TableError, match="upgrade fleetprune") as err:
        TableStore(tmp_path).read(DEV)
    assert str(path) in str(err.value) and f"version {SCHEMA_VERSION + 1}" in str(err.value)


def test_unknown_device_lists_the_known_ones(tmp_path):
    store = TableStore(tmp_path)
    assert store.devices() == [] and store.measured_keys(DEV) == set()
    store.write(DEV, rows_for(DEV, grid(1)), PROV)
    with pytest.raises(TableError, match=f"known devices: {DEV}"):
        store.read("cuda-missing")


@pytest.mark.parametrize(
    "make_root, message",
    [
        (lambda p: "nosuchscheme://bucket/tables", "Unrecognized filesystem"),
        (lambda p: str(p / "afile"), "is a file, not a folder"),
        (lambda p: str(p / "afile" / "below"), "lies under the file"),
        (lambda p: "file://relative/path", "cannot open the table root"),
    ],
)
def test_a_root_that_cannot_be_opened_says_so(tmp_path, make_root, message):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TableError, match=message):
        TableStore(make_root(tmp_path))


def test_keys_are_equal_across_processes():
    configs = grid(3) + [LayerConfig("dwconv", 32, 32, 3, 3, 2, 2, 1, 1, groups=32, in_h=17, in_w=9, dtype="fp16"),
                         LayerConfig("linear", 512, 1000, batch=8, memory_format="nhwc", act="none")]
    code = textwrap.dedent(
        """
        import json, sys
        from fleetprune.tables import LayerConfig
        print(json.dumps([LayerConfig(**d).key for d in json.loads(sys.stdin.read())]))
        """
    )
    fields = [{f: getattr(c, f) for f in c.__dataclass_fields__} for c in configs]
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(fields), capture_output=True, text=True,
                         env=env, check=True)
    assert json.loads(out.stdout) == [c.key for c in configs]
    assert len(set(json.loads(out.stdout))) == len(configs)


def test_a_version_1_file_reads_with_its_median_as_the_latency(tmp_path):
    """Tables written before the minimum was kept (schema 1) stay readable: their median is the latency."""
    rows = rows_for(DEV, grid(2))
    v2 = rows_to_table(rows, PROV).drop_columns(["device_key", "lat_ms", "lat_ms_min"])
    meta = json.loads(v2.schema.metadata[METADATA_KEY])
    v1 = v2.replace_schema_metadata({METADATA_KEY: json.dumps(dict(meta, schema_version=1))})
    _write_raw(tmp_path / f"device_key={DEV}", "part-00000000T000000000000Z-v1.parquet", v1)
    store = TableStore(tmp_path)
    assert store.validate() == []
    table = store.read(DEV)
    for row in rows:
        assert table.lookup_key(row["key"]) == row["lat_ms_median"]
    assert table.frame["lat_ms_min"].isna().all()
    # a newer row (schema 2) for one key wins and brings its own latency, the minimum
    newer = make_row(cfg(16, 16), DEV, 9.0, 8.0, 10.0, 5, minimum=7.5, latency=7.5, measured_at=T0 + dt.timedelta(1))
    store.write(DEV, [newer], PROV)
    assert TableStore(tmp_path).read(DEV).lookup(cfg(16, 16)) == 7.5


def test_a_minimum_above_the_10th_percentile_is_a_defect(tmp_path):
    store = TableStore(tmp_path)
    path = store.write(DEV, [make_row(cfg(16, 16), DEV, 1.0, 0.9, 1.1, 5, minimum=0.95, latency=0.95)], PROV)
    defects = [(Path(d.file).name, d.kind) for d in store.validate()]
    assert defects == [(Path(path).name, "bad_percentiles")]
    assert "min=0.95" in store.validate()[0].detail


def test_rows_of_another_statistic_are_flagged_and_profiled_again(tmp_path, caplog):
    """A table profiled with medians (an older protocol) and then with minima: read warns, and the
    profiler's resume set under the minimum leaves the median rows out, so they are measured again."""
    store = TableStore(tmp_path)
    old, new = grid(2), [cfg(80, 80)]
    store.write(DEV, rows_for(DEV, old), dict(PROV, timing_protocol={"repeats": 5}))  # no statistic: median
    store.write(DEV, [make_row(new[0], DEV, 2.0, 1.9, 2.1, 5, minimum=1.8, latency=1.8)],
                dict(PROV, timing_protocol={"repeats": 5, "statistic": "min"}))
    with caplog.at_level("WARNING", logger="fleetprune.tables"):
        table = store.read(DEV)
    assert "mixes latencies timed with different statistics (4 rows the median, 1 rows the min)" in caplog.text
    assert dict(zip(table.frame["key"], table.frame["statistic"]))[new[0].key] == "min"
    assert store.measured_keys(DEV) == {c.key for c in old + new}
    assert store.measured_keys(DEV, "min") == {new[0].key}
    assert store.measured_keys(DEV, "median") == {c.key for c in old}
