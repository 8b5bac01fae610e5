"""The ``tables`` verbs for Python users: list, show, check, merge and compare latency tables.

Each returns data (the CLI formats it); a missing root or unknown device raises ``TableError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fleetprune.errors import TableError
from fleetprune.tables.config import OPS  # noqa: F401 - re-exported: what `tables show --op` accepts

if TYPE_CHECKING:  # pandas and pyarrow load with the store, not with `fleetprune --help`
    import pandas as pd

    from fleetprune.tables import LatencyTable, TableStore
    from fleetprune.tables.store import Defect, DeviceSummary

# Row order of show and diff: by layer signature, then by channels numerically.
CONFIG_ORDER = [
    "op", "batch", "dtype", "memory_format", "kh", "kw", "sh", "sw", "in_h", "in_w", "groups", "cin", "cout", "act"
]


@dataclass
class TableCheck:
    """What :func:`check_tables` found: every defect, and the devices with their usable rows."""

    defects: list["Defect"]
    devices: list["DeviceSummary"]


@dataclass
class ShownRows:
    """The rows of one device that :func:`show_table` selected, in configuration order."""

    table: "LatencyTable"
    frame: "pd.DataFrame"


@dataclass
class TableDiff:
    """Two devices on their common configurations (``frame`` in configuration order, with
    ``ms_a``, ``ms_b`` and ``ratio`` = b / a aligned to it), and the counts found on one side only."""

    frame: "pd.DataFrame"
    ms_a: np.ndarray
    ms_b: np.ndarray
    ratio: np.ndarray
    only_a: int
    only_b: int


def open_tables(root: str, *, must_exist: bool = True) -> "TableStore":
    """The table store at ``root`` (a folder or filesystem URI).

    Raises:
        TableError: an unusable root, or (``must_exist``) no root there yet.
    """
    from fleetprune.tables import TableStore

    store = TableStore(root)
    if must_exist and not store.exists():
        raise TableError(f"there is no table root at {root}: pass --tables ROOT (a folder or URI holding tables)")
    return store


def list_tables(root: str) -> list["DeviceSummary"]:
    """A summary of every device table under ``root`` (rows, files, provenance, unreadable files)."""
    return open_tables(root).devices()


def show_table(root: str, device: str, *, op: str | None = None, batch: int | None = None,
               dtype: str | None = None, memory_format: str | None = None) -> ShownRows:
    """The rows of ``device`` matching the given fields, sorted by configuration."""
    table = open_tables(root).read(device)
    frame = table.frame
    filters = {"op": op, "batch": batch, "dtype": dtype, "memory_format": memory_format}
    for col, value in filters.items():
        if value is not None:
            frame = frame[frame[col] == value]
    return ShownRows(table, frame.sort_values(CONFIG_ORDER, kind="stable"))


def check_tables(root: str) -> TableCheck:
    """Every defect of every part file under ``root``, and the device summaries."""
    store = open_tables(root)
    defects = store.validate()
    return TableCheck(defects, [] if defects else store.devices())


def merge_tables(dest: str, source: str) -> int:
    """Copy the rows ``dest`` lacks from ``source`` (another root); return how many were copied."""
    src = open_tables(source)
    return open_tables(dest, must_exist=False).merge_from(src)


def diff_tables(root: str, device_a: str, device_b: str) -> TableDiff:
    """Latencies of two devices on the configurations both measured, with their ratio b / a."""
    store = open_tables(root)
    a, b = store.read(device_a), store.read(device_b)
    fa = a.frame.set_index("key")
    fb = b.frame.set_index("key")
    common = fa.index.intersection(fb.index)
    joined = fa.loc[common].sort_values(CONFIG_ORDER, kind="stable")
    ms_a = joined["lat_ms"].to_numpy(float)
    ms_b = fb.loc[joined.index, "lat_ms"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = ms_b / ms_a
    return TableDiff(joined, ms_a, ms_b, ratio, len(fa.index.difference(fb.index)), len(fb.index.difference(fa.index)))


__all__ = ["CONFIG_ORDER", "ShownRows", "TableCheck", "TableDiff", "check_tables", "diff_tables", "list_tables",
           "merge_tables", "open_tables", "show_table"]
