"""HTML reports of pruned variants and latency tables: ``report.html`` plus ``report_*.png``.

A variants folder's report goes into the folder itself; a table root's goes into ``ROOT/_report/``,
a name Parquet readers skip, so ``pandas.read_parquet(ROOT)`` and other tools still read the root.
The page links its figures by relative file name and carries no script or external asset, so the
folder can be copied anywhere and opened offline.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

from fleetprune.errors import ReportError
from fleetprune.report.build import Report, tables_report, variants_report
from fleetprune.report.html import render
from fleetprune.report.load import detect, load_tables, load_variants

__all__ = ["REPORT_NAME", "TABLES_REPORT_DIR", "write_report", "write_tables_report", "write_variants_report"]

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
# Where a table root's report goes: readers of Hive-partitioned Parquet skip names starting with "_".
TABLES_REPORT_DIR = "_report"


def write_report(path: str | os.PathLike, *, layer: str | None = None, devices: list[str] | None = None) -> Path:
    """Write the report of a variants folder or a table root, whichever ``path`` is.

    Args:
        path: a folder written by ``fleetprune prune --out`` or a latency table root.
        layer: table roots only: the configuration family of the staircase (a key, or
            comma-separated ``field=value`` filters and key fragments).
        devices: only these devices (in this order; the first is the reference of latency ratios).

    Returns:
        The path of ``report.html``: in the variants folder, or in ``ROOT/_report/`` of a table root.

    Raises:
        ReportError: the folder is empty, incomplete, or neither kind.
    """
    root = Path(path)
    if detect(root) == "variants":
        if layer:
            log.warning("--layer applies to table roots only; %s is a variants folder", root)
        return _publish(root, variants_report(load_variants(root, devices)))
    return _publish_tables(root, tables_report(load_tables(root, devices), layer=layer))


def write_variants_report(folder: str | os.PathLike, *, devices: list[str] | None = None) -> Path:
    """Write ``FOLDER/report.html`` for a variants folder (what ``fleetprune prune`` calls when done)."""
    root = Path(folder)
    if detect(root) != "variants":
        raise ReportError(
            f"{root} is not a variants folder (no summary.json); pass the folder given to `fleetprune prune --out`"
        )
    return _publish(root, variants_report(load_variants(root, devices)))


def write_tables_report(root: str | os.PathLike, *, layer: str | None = None, devices: list[str] | None = None) -> Path:
    """Write ``ROOT/_report/report.html`` for a latency table root."""
    root = Path(root)
    if detect(root) != "tables":
        raise ReportError(f"{root} is not a latency table root (no device_key=<KEY> folders)")
    return _publish_tables(root, tables_report(load_tables(root, devices), layer=layer))


def _publish_tables(root: Path, report: Report) -> Path:
    """Write a table root's report into ``ROOT/_report/``; drop the one an older fleetprune wrote into
    ``ROOT`` itself (a report.html there makes ``pandas.read_parquet(ROOT)`` fail)."""
    folder = root / TABLES_REPORT_DIR
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create {folder} for the report: {exc}; check the table root is writable") from exc
    page = _publish(folder, report)
    _drop_old_root_report(root)
    return page


def _drop_old_root_report(root: Path) -> None:
    """Remove ``ROOT/report.html`` and the figures it links, if it is a fleetprune tables report."""
    old = root / REPORT_NAME
    try:
        text = old.read_text(encoding="utf-8", errors="replace") if old.is_file() else ""
    except OSError:
        return
    if "fleetprune report: latency tables" not in text:
        return
    for name in set(re.findall(r'src="(report_[A-Za-z0-9._-]+\.png)"', text)):
        (root / name).unlink(missing_ok=True)
    old.unlink(missing_ok=True)
    log.info("removed the report an older fleetprune wrote into %s (it is now in %s)", root,
             root / TABLES_REPORT_DIR)


def _publish(root: Path, report: Report) -> Path:
    """Write every figure and then the page, each to a hidden temp name first, then rename.

    The page is renamed last, so a report.html on disk always links figures that exist; a failure
    leaves the previous report untouched and no temp file behind.
    """
    token = uuid.uuid4().hex[:8]
    staged: list[tuple[Path, Path]] = []
    try:
        for plot in report.plots:
            tmp = root / f".{plot.filename}.{token}.tmp"
            staged.append((tmp, root / plot.filename))
            plot.save(tmp)
        page = root / REPORT_NAME
        tmp = root / f".{REPORT_NAME}.{token}.tmp"
        staged.append((tmp, page))
        tmp.write_text(render(report.title, report.subtitle, report.sections), encoding="utf-8")
    except BaseException as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ReportError(f"cannot write the report into {root}: {exc}; check the folder is writable") from exc
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    log.info("wrote %s with %d figures", page, len(report.plots))
    return page
