"""A table root's report goes where Parquet readers do not look (issue 12, item 5)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds

from fleetprune.cli import main
from fleetprune.report import write_report
from fleetprune.tables import TableStore

from report_fixtures import TABLE_DEVICES, make_tables, make_variants


def test_a_table_root_stays_readable_after_its_report(tmp_path: Path, capsys) -> None:
    root = make_tables(tmp_path / "tables", validation=False)
    rows = len(pd.read_parquet(root))
    assert main(["report", str(root)]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page == root / "_report" / "report.html" and page.is_file()
    assert list((root / "_report").glob("report_*.png"))
    assert not (root / "report.html").exists() and not list(root.glob("report_*.png"))
    assert len(pd.read_parquet(root)) == rows  # the whole root, as other tools read it
    assert ds.dataset(str(root), partitioning="hive").count_rows() == rows
    store = TableStore(str(root))
    assert [d.device_key for d in store.devices()] == sorted(TABLE_DEVICES)
    assert store.validate() == []


def test_a_report_left_in_the_root_by_an_older_version_is_moved(tmp_path: Path) -> None:
    root = make_tables(tmp_path / "tables", validation=False)
    page = write_report(root)
    for f in page.parent.iterdir():  # where an older fleetprune put them
        f.rename(root / f.name)
    keep = root / "_notes.txt"  # not ours: left alone
    keep.write_text("mine")
    write_report(root)
    assert not (root / "report.html").exists() and not list(root.glob("report_*.png"))
    assert keep.read_text() == "mine"
    pd.read_parquet(root, columns=["key"])


def test_a_variants_report_stays_in_the_variants_folder(tmp_path: Path) -> None:
    root = make_variants(tmp_path / "variants")
    assert write_report(root) == root / "report.html"
    assert not (root / "_report").exists()
