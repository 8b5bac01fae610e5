"""A column stored in a wrong but convertible type is flagged by `tables validate` (issue 12, item 5)."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fleetprune.cli import main
from fleetprune.tables import LayerConfig, TableStore, make_row
from fleetprune.tables.schema import rows_to_table

DEV = "cpu-test-t2"
PROV = {"device_name": "Test CPU", "torch": "2.14.1", "threads": 2, "timing_protocol": {"statistic": "min"}}
WHEN = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def _table(n: int = 3) -> pa.Table:
    ms = [0.1 * (i + 1) for i in range(n)]
    rows = [make_row(LayerConfig("conv", 8, 8 * (i + 1), kh=1, kw=1, in_h=4, in_w=4), DEV, m, 0.9 * m, 1.2 * m, 10,
                     measured_at=WHEN) for i, m in enumerate(ms)]
    return rows_to_table(rows, PROV).drop_columns(["device_key"])


def _write(root, table: pa.Table) -> str:
    folder = root / f"device_key={DEV}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part-20250101T000000000000Z-x.parquet"
    pq.write_table(table, path)
    return str(path)


def _retype(table: pa.Table, name: str, new: pa.DataType) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, pa.field(name, new), table.column(i).cast(new))


@pytest.mark.parametrize("column,stored", [("lat_ms", pa.string()), ("cout", pa.string()),
                                           ("noisy", pa.int64()), ("n_samples", pa.float64())])
def test_a_convertible_column_of_the_wrong_kind_is_a_corrupt_defect(tmp_path, capsys, column, stored):
    path = _write(tmp_path, _retype(_table(), column, stored))
    store = TableStore(str(tmp_path))
    [defect] = store.validate()
    assert (defect.file, defect.kind) == (path, "corrupt")
    assert f"mistyped columns: {column} is {stored}" in defect.detail
    assert main(["tables", "validate", "--tables", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "corrupt: mistyped columns" in out and "1 defect(s) in 1 file(s)" in out
    assert len(store.read(DEV)) == 3  # the rows are not thrown away: they still read, by conversion


def test_other_widths_and_units_of_the_same_kind_are_sound(tmp_path):
    table = _retype(_table(), "lat_ms", pa.float32())
    table = _retype(table, "cin", pa.int32())
    table = _retype(table, "measured_at", pa.timestamp("ns", tz="UTC"))
    table = _retype(table, "key", pa.large_string())
    _write(tmp_path, table)
    assert TableStore(str(tmp_path)).validate() == []
