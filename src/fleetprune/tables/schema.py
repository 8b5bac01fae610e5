"""What one table row holds, as an Arrow schema, and how provenance rides in the file metadata.

A row is a :class:`LayerConfig` (its columns plus ``key``), the device key, the latency
statistics and when it was measured. ``lat_ms`` is the row's latency, the figure lookups use: the
statistic the timing protocol names (``min`` by default, see ``profiler.timing``); ``lat_ms_min``,
``lat_ms_median`` and the percentiles stand beside it. Version 1 files had no ``lat_ms`` and
``lat_ms_min``; they read as ``lat_ms = lat_ms_median`` and an unknown minimum. Version 3 adds rows
of the op kinds of ``tables.config.OP_KINDS`` in the same columns; version 1 and 2 files read as
they are (a table without any such row prices networks from convs and linears, as before).

Everything that is the same for a whole part file (device name and fingerprint, library versions,
threads, timing protocol, schema version, an optional calibration) is one JSON dict stored in the
Parquet schema metadata under ``fleetprune``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from typing import Any, Mapping

import pyarrow as pa

from fleetprune.errors import TableError
from fleetprune.tables.config import CONFIG_COLUMNS, LayerConfig

# Bump when a column is added, removed or changes meaning; readers refuse newer versions.
# 3: rows of the op kinds beside conv/dwconv/linear (residual add, pools, activations, squeeze-excitation,
# concat, standalone batch norm; same columns), and the timing protocol's ``cache`` mode.
SCHEMA_VERSION = 3

# The schema-metadata key that holds the provenance JSON.
METADATA_KEY = b"fleetprune"

# Device keys become folder names (``device_key=<KEY>``), so keep them to URL-safe slugs.
DEVICE_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

_STR_CONFIG = ("op", "dtype", "memory_format", "act")

ROW_SCHEMA = pa.schema(
    [pa.field(name, pa.string() if name in _STR_CONFIG else pa.int64()) for name in CONFIG_COLUMNS]
    + [
        pa.field("key", pa.string()),
        pa.field("device_key", pa.string()),
        pa.field("lat_ms", pa.float64()),
        pa.field("lat_ms_min", pa.float64()),
        pa.field("lat_ms_median", pa.float64()),
        pa.field("lat_ms_p10", pa.float64()),
        pa.field("lat_ms_p90", pa.float64()),
        pa.field("n_samples", pa.int64()),
        pa.field("noisy", pa.bool_()),
        pa.field("measured_at", pa.timestamp("us", tz="UTC")),
    ]
)

COLUMNS: tuple[str, ...] = tuple(ROW_SCHEMA.names)

# Provenance fields a writer is expected to fill (missing ones are stored as null, not refused:
# a CPU has no CUDA version, a fake backend no driver).
PROVENANCE_FIELDS = (
    "device_key",
    "device_name",
    "fingerprint",
    "torch",
    "cuda",
    "cudnn",
    "driver",
    "threads",
    "timing_protocol",
    "schema_version",
)


def check_device_key(device_key: str) -> str:
    """Return ``device_key`` if it is a valid slug, else raise :class:`TableError`."""
    if not isinstance(device_key, str) or not DEVICE_KEY_RE.match(device_key):
        raise TableError(
            f"invalid device key {device_key!r}: use lower-case letters, digits, '.', '_' and '-' "
            "(e.g. cpu-amd-epyc-7b13-t2)"
        )
    return device_key


def make_row(
    config: LayerConfig,
    device_key: str,
    median: float,
    p10: float,
    p90: float,
    n: int,
    noisy: bool = False,
    measured_at: _dt.datetime | None = None,
    minimum: float | None = None,
    latency: float | None = None,
) -> dict[str, Any]:
    """One table row for ``config`` measured on ``device_key``.

    Latencies are milliseconds. ``latency`` is the figure lookups use (default: the median; the
    profiler passes its protocol's statistic); ``minimum`` the fastest timed sample (None: unknown).
    ``measured_at`` defaults to now; a naive datetime is taken as UTC.
    The numbers are stored as given (``validate`` flags NaN, negative or unordered percentiles) so a
    writer never silently drops a measurement.
    """
    if measured_at is None:
        measured_at = _dt.datetime.now(_dt.timezone.utc)
    elif measured_at.tzinfo is None:
        measured_at = measured_at.replace(tzinfo=_dt.timezone.utc)
    row = config.to_row()
    row.update(
        device_key=device_key,
        lat_ms=float(median if latency is None else latency),
        lat_ms_min=None if minimum is None else float(minimum),
        lat_ms_median=float(median),
        lat_ms_p10=float(p10),
        lat_ms_p90=float(p90),
        n_samples=int(n),
        noisy=bool(noisy),
        measured_at=measured_at,
    )
    return row


def rows_to_table(rows: list[Mapping[str, Any]], provenance: Mapping[str, Any]) -> pa.Table:
    """Rows (dicts with every column of :data:`ROW_SCHEMA`) as an Arrow table carrying ``provenance``.

    Raises:
        TableError: a row lacks a column or holds a value of the wrong type.
    """
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise TableError(f"table rows lack the columns {missing}; build rows with fleetprune.tables.make_row")
    try:
        # Column by column: several times faster than Table.from_pylist on many small dicts.
        arrays = [pa.array([r[f.name] for r in rows], type=f.type) for f in ROW_SCHEMA]
        table = pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)
    except KeyError as exc:
        raise TableError(f"a table row lacks the column {exc.args[0]!r}; build rows with make_row") from exc
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise TableError(f"table rows do not fit the table schema: {exc}") from exc
    return with_provenance(table, provenance)


def with_provenance(table: pa.Table, provenance: Mapping[str, Any]) -> pa.Table:
    """``table`` with ``provenance`` as JSON in its schema metadata (and our schema version)."""
    prov = {f: None for f in PROVENANCE_FIELDS}
    prov.update(provenance)
    prov["schema_version"] = SCHEMA_VERSION
    try:
        blob = json.dumps(prov, sort_keys=True, default=str, allow_nan=False)
    except ValueError as exc:
        raise TableError(f"provenance must be JSON without NaN: {exc}") from exc
    return table.replace_schema_metadata({METADATA_KEY: blob.encode()})


def read_provenance(schema: pa.Schema) -> dict[str, Any] | None:
    """The provenance dict stored in ``schema``'s metadata, or None if there is none.

    Raises:
        ValueError: the metadata is there but is not a JSON object.
    """
    meta = schema.metadata or {}
    blob = meta.get(METADATA_KEY)
    if blob is None:
        return None
    prov = json.loads(blob)
    if not isinstance(prov, dict):
        raise ValueError("the 'fleetprune' schema metadata is not a JSON object")
    return prov


def latency_defects(
    median: float, p10: float, p90: float, latency: float | None = None, minimum: float | None = None
) -> list[tuple[str, str]]:
    """The (kind, detail) defects of one row's latency numbers; empty when the row is sound.

    ``latency`` None means "the median" (a version 1 row); ``minimum`` None means unknown.
    """
    out: list[tuple[str, str]] = []
    values = {"latency": median if latency is None else latency, "median": median, "p10": p10, "p90": p90}
    if minimum is not None:
        values["min"] = minimum
    bad = {k: v for k, v in values.items() if v is None or not math.isfinite(v) or v < 0}
    if bad:
        out.append(("bad_latency", ", ".join(f"{k}={v}" for k, v in bad.items())))
    elif not (p10 <= median <= p90) or (minimum is not None and minimum > p10):
        shown = f"p10={p10:.6g} median={median:.6g} p90={p90:.6g}"
        if minimum is not None:
            shown = f"min={minimum:.6g} " + shown
        out.append(("bad_percentiles", shown))
    return out
