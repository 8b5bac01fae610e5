"""Where latency tables live: a Hive-partitioned Parquet dataset under a local or remote root.

Layout: ``ROOT/device_key=<KEY>/part-<utc-stamp>-<uuid>.parquet``. Every write adds one whole part
file (written under a ``.``-prefixed temporary name, then moved into place), so a killed writer
leaves at most a hidden temporary file that readers, like pyarrow's own datasets, ignore.
Re-profiling appends; readers keep the newest row per key (latest ``measured_at``, then the later
part file, then the later row within a file). Other tools read the device folders as ordinary
Hive-partitioned Parquet (``pyarrow.dataset.dataset(ROOT, partitioning="hive")``).
End-to-end validation rows, which are not layer measurements, go to ``ROOT/validation.parquet/``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import posixpath
import re
import shlex
import uuid
from dataclasses import dataclass, field
import threading
from typing import Any, Iterable, Mapping
from urllib.parse import unquote

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system: profiles run without the lock
    fcntl = None  # type: ignore[assignment]

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fleetprune.errors import TableError
from fleetprune.tables.config import CONFIG_COLUMNS, LayerConfig
from fleetprune.tables.schema import (
    COLUMNS,
    ROW_SCHEMA,
    SCHEMA_VERSION,
    check_device_key,
    latency_defects,
    read_provenance,
    rows_to_table,
    with_provenance,
)
from fleetprune.tables.table import LatencyTable

log = logging.getLogger(__name__)

PARTITION = "device_key="
# End-to-end validation rows live beside the device folders (written by `fleetprune validate`).
VALIDATION = "validation.parquet"
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Filesystems (by pyarrow type name) whose files die with the process: a table there is lost work.
_EPHEMERAL = ("mock",)
# The advisory lock of one device's profile: ROOT/.profile-<KEY>.lock (readers skip dot files).
LOCK_PREFIX = ".profile-"
# How many example keys a defect's detail names.
_EXAMPLES = 5


@dataclass(frozen=True)
class Defect:
    """One problem ``TableStore.validate`` found.

    ``kind`` is one of ``corrupt``, ``newer_schema``, ``duplicate_key``, ``bad_latency``,
    ``bad_percentiles``, ``bad_config``, ``key_mismatch``, ``device_mismatch``.
    """

    device_key: str
    file: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.device_key}: {self.file}: {self.kind}: {self.detail}"


@dataclass(frozen=True)
class DeviceSummary:
    """What ``TableStore.devices`` tells about one device.

    ``rows`` counts distinct usable configurations (what ``read`` would return); ``provenance`` is
    the newest readable part file's; ``bad_files`` lists part files that could not be read.
    """

    device_key: str
    rows: int
    provenance: dict[str, Any]
    files: int = 0
    last_measured: _dt.datetime | None = None
    bad_files: tuple[str, ...] = field(default=())


@dataclass
class _Part:
    path: str
    table: pa.Table
    provenance: dict[str, Any]
    mistyped: tuple[str, ...] = ()  # columns stored in a type that only converts to ours


class _BadPart(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class DeviceLock:
    """An advisory lock held on one device's table while it is profiled; :meth:`release` frees it.

    Reentrant within a process (a count per lock file), so one process never waits for itself;
    a no-op lock (nothing held) where the root cannot be locked.
    """

    _held: dict[str, list[int]] = {}  # lock path -> [fd, holders in this process]
    _guard = threading.Lock()

    def __init__(self, path: str | None = None) -> None:
        self.path = path

    @property
    def held(self) -> bool:
        """Whether this object holds a real lock (False for roots that cannot be locked)."""
        return self.path is not None

    def release(self) -> None:
        """Free the lock (idempotent); the file stays, so no waiter ever locks a deleted file."""
        path, self.path = self.path, None
        if path is None:
            return
        with DeviceLock._guard:
            entry = DeviceLock._held.get(path)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del DeviceLock._held[path]
        try:
            fcntl.flock(entry[0], fcntl.LOCK_UN)
        finally:
            os.close(entry[0])

    def __enter__(self) -> "DeviceLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class TableStore:
    """Latency tables of every device under one root folder or filesystem URI.

    Args:
        root: a local folder (created on first write) or a URI pyarrow understands
            (``file:///...``, ``s3://...``, ``gs://...``, ``hdfs://...``). ``mock:///`` is refused:
            that in-memory filesystem vanishes with the process, and every row with it.
        filesystem: an already opened pyarrow filesystem; ``root`` is then a path inside it. Lets
            tests share one in-memory ``_MockFileSystem`` between stores.

    Raises:
        TableError: the root cannot be opened, is a file, not a folder, or is an in-memory URI.
    """

    def __init__(self, root: str | os.PathLike[str], *, filesystem: pafs.FileSystem | None = None) -> None:
        self.root = os.fspath(root)
        self._fs, self._base = _open_root(self.root, filesystem)

    def __repr__(self) -> str:
        return f"TableStore({self.root!r})"

    def exists(self) -> bool:
        """Whether the root folder exists yet (it is created by the first write)."""
        try:
            return self._fs.get_file_info(self._base).type == pafs.FileType.Directory
        except (OSError, pa.ArrowException) as exc:
            raise TableError(f"cannot open the table root {self.root}: {exc}") from exc

    # ---- writing ---------------------------------------------------------------------------

    def write(self, device_key: str, rows: list[dict[str, Any]], provenance: dict[str, Any]) -> str:
        """Append ``rows`` measured on ``device_key`` as one new part file and return its path.

        The file appears whole or not at all. ``provenance`` (see ``tables.schema``) is stored in
        the file's schema metadata with our schema version; an empty ``rows`` list writes a file
        that only carries provenance (e.g. a newly fitted ``correction``).

        Raises:
            TableError: a bad device key, rows of another device or not fitting the schema, or
                the filesystem refused the write.
        """
        check_device_key(device_key)
        prov = dict(provenance)
        if prov.get("device_key") not in (None, device_key):
            raise TableError(
                f"provenance is for device {prov['device_key']!r} but the rows are written for {device_key!r}"
            )
        prov["device_key"] = device_key
        others = sorted({str(r.get("device_key")) for r in rows} - {device_key})
        if others:
            raise TableError(f"rows for devices {others} cannot be written into the table of {device_key!r}")
        return self._write_table(device_key, rows_to_table(rows, prov))

    def merge_from(self, other: "TableStore | str") -> int:
        """Copy every row of ``other`` that this root lacks, as new part files; return rows copied.

        Rows already here with the same key and ``measured_at`` are skipped, so merging twice
        copies nothing the second time. Each source file's provenance travels with its rows.
        The whole source is read before anything is written: a corrupt or newer source file
        aborts the merge with nothing changed.

        Raises:
            TableError: a source or destination file is unreadable or of a newer schema.
        """
        src = other if isinstance(other, TableStore) else TableStore(other)
        plan = [
            (check_device_key(key), src._scan(key, dirpath, strict=True)[0])
            for key, dirpath in src._device_dirs().items()
        ]
        own_dirs = self._device_dirs()
        copied = 0
        for device_key, parts in plan:
            have: set[tuple[str, int]] = set()
            have_prov: set[str] = set()
            if device_key in own_dirs:
                for part in self._scan(device_key, own_dirs[device_key], strict=True)[0]:
                    have.update(_identities(part.table))
                    have_prov.add(_canonical(part.provenance))
            for part in parts:
                ids = _identities(part.table)
                keep = [i for i, ident in enumerate(ids) if ident not in have]
                # A row-less part only carries provenance (a correction): copy it once.
                if not keep and (part.table.num_rows or _canonical(part.provenance) in have_prov):
                    continue
                have_prov.add(_canonical(part.provenance))
                table = part.table.take(pa.array(keep, pa.int64())) if len(keep) < len(ids) else part.table
                table = _set_device(table, device_key)
                prov = dict(part.provenance, device_key=device_key, merged_from=src.root)
                self._write_table(device_key, with_provenance(table, prov))
                have.update(ids[i] for i in keep)
                copied += len(keep)
        log.info("merged %d rows from %s into %s", copied, src.root, self.root)
        return copied

    def set_correction(
        self, device_key: str, correction: dict[str, Any], provenance: dict[str, Any] | None = None
    ) -> str:
        """Record a fitted end-to-end calibration ``measured ~ a * predicted + b`` for a device.

        Appends a row-less part file whose provenance is ``provenance`` (default: the device's
        current one) with ``correction`` set, so ``read(device_key).correction`` returns it and
        no measurement is touched. Returns the part file's path.

        Raises:
            TableError: ``correction`` lacks finite numbers ``a`` and ``b``.
        """
        try:
            a, b = float(correction["a"]), float(correction["b"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TableError(f"a correction needs numbers 'a' and 'b', got {correction!r}") from exc
        if not (np.isfinite(a) and np.isfinite(b)):
            raise TableError(f"a correction needs finite 'a' and 'b', got a={a}, b={b}")
        if provenance is None:
            provenance = self.read(device_key).provenance
        prov = {k: v for k, v in provenance.items() if k != "merged_from"}
        prov["correction"] = dict(correction, a=a, b=b)
        return self.write(device_key, [], prov)

    def append_validation(self, rows: list[dict[str, Any]], provenance: dict[str, Any] | None = None) -> str:
        """Append end-to-end validation rows (see docs/internals.md) to ``ROOT/validation.parquet``.

        ``validation.parquet`` is a folder of part files, each written atomically like table parts,
        so runs append without rewriting; ``pandas.read_parquet`` reads the folder as one table.
        A single file left there by an older writer is moved into the folder first. Returns the
        new part's path, or "" when ``rows`` is empty.

        Raises:
            TableError: the rows do not form a table, or the filesystem refused the write.
        """
        if not rows:
            return ""
        try:
            table = pa.Table.from_pylist(list(rows))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise TableError(f"validation rows do not form a table: {exc}") from exc
        table = with_provenance(table, dict(provenance or {}))
        folder = posixpath.join(self._base, VALIDATION)
        try:
            if self._fs.get_file_info(folder).type == pafs.FileType.File:
                hidden = posixpath.join(self._base, f".{VALIDATION}.{uuid.uuid4().hex[:12]}.tmp")
                self._fs.move(folder, hidden)
                self._fs.create_dir(folder, recursive=True)
                self._fs.move(hidden, posixpath.join(folder, "part-00000000T000000000000Z-first.parquet"))
        except (OSError, pa.ArrowException) as exc:
            raise TableError(f"cannot turn {self._display(folder)} into a folder of parts: {exc}") from exc
        final = self._write_atomic(folder, table)
        log.info("appended %d validation rows to %s", table.num_rows, self._display(final))
        return self._display(final)

    def lock_device(self, device_key: str) -> DeviceLock:
        """Take the advisory lock of ``device_key``'s profile under this root, waiting for another
        process that holds it (logged: "waiting for another profile of KEY in ROOT (pid N)").

        Two profiles of one device on one root then never measure a configuration twice: the second
        reads what the first wrote once it may go on. Only local roots are locked (``fcntl.flock`` on
        ``ROOT/.profile-<KEY>.lock``); other filesystems, and roots this process cannot write, get a
        no-op lock (logged). Release it with ``release()`` or a ``with`` block.
        """
        check_device_key(device_key)
        if fcntl is None or not isinstance(self._fs, pafs.LocalFileSystem):
            log.info("no lock for the profile of %s: %s is not a local folder (two profiles of one device "
                     "at once would both measure)", device_key, self.root)
            return DeviceLock()
        path = posixpath.join(self._base, f"{LOCK_PREFIX}{device_key}.lock")
        with DeviceLock._guard:
            entry = DeviceLock._held.get(path)
            if entry is not None:
                entry[1] += 1
                return DeviceLock(path)
        try:
            os.makedirs(self._base, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            log.info("no lock for the profile of %s in %s (%s)", device_key, self.root, exc.strerror or exc)
            return DeviceLock()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                log.warning("waiting for another profile of %s in %s (pid %s); then only what it has not "
                            "measured is measured", device_key, self.root, holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
                log.warning("the other profile of %s in %s is done; measuring what is still missing",
                            device_key, self.root)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        with DeviceLock._guard:
            DeviceLock._held[path] = [fd, 1]
        return DeviceLock(path)

    # ---- reading ---------------------------------------------------------------------------

    def read(self, device_key: str) -> LatencyTable:
        """The latency table of ``device_key``: the newest row per key, rows with an unusable latency
        (NaN, infinite, negative) left out with a warning.

        Raises:
            TableError: an unknown device (the message lists the known ones), a corrupt part file
                of this device (named, with what to do), or a file of a newer schema version.
        """
        dirs = self._device_dirs()
        parts = self._scan(device_key, dirs[device_key], strict=True)[0] if device_key in dirs else []
        if not parts:
            known = ", ".join(sorted(k for k, d in dirs.items() if self._part_files(d))) or "none"
            raise TableError(
                f"no latency table for device {device_key!r} under {self.root} (known devices: {known}); "
                f"check the device key or measure it: fleetprune profile MODEL --tables "
                f"{shlex.quote(self.root)} --devices {device_key}"
            )
        for part in parts:
            if part.mistyped:  # the values convert, so the rows are kept; validate flags the file
                log.warning("table file %s has mistyped columns (%s); its rows are read by conversion "
                            "(`fleetprune tables validate` lists such files)", self._display(part.path),
                            "; ".join(part.mistyped))
        frame, provenance = _assemble(device_key, parts, warn=True)
        return LatencyTable(device_key, provenance, frame, root=self.root)

    def measured_keys(self, device_key: str, statistic: str | None = None) -> set[str]:
        """Keys with a usable measurement for ``device_key``; empty for a device not yet measured.

        The profiler resumes from this, so rows ``read`` would leave out are measured again. With
        ``statistic`` (``min`` or ``median``), only keys whose newest row holds that statistic count:
        a profile with the minimum re-measures rows an older protocol recorded as medians, so one
        table never mixes the two.
        """
        dirs = self._device_dirs()
        if device_key not in dirs:
            return set()
        parts = self._scan(device_key, dirs[device_key], strict=True)[0]
        if not parts:
            return set()
        frame, _ = _assemble(device_key, parts, warn=False)
        if statistic is not None:
            frame = frame[frame["statistic"] == statistic]
        return set(frame["key"].tolist())

    def devices(self) -> list[DeviceSummary]:
        """A summary of every device with at least one part file, sorted by key.

        Unreadable part files are listed in ``bad_files`` (and logged) instead of raising.
        """
        out = []
        for device_key, dirpath in sorted(self._device_dirs().items()):
            parts, defects = self._scan(device_key, dirpath, strict=False)
            if not parts and not defects:
                continue
            for d in defects:
                log.warning("unreadable table file %s (%s): %s", d.file, d.kind, d.detail)
            frame, provenance = _assemble(device_key, parts, warn=False)
            last = frame["measured_at"].max() if len(frame) else None
            out.append(
                DeviceSummary(
                    device_key=device_key,
                    rows=len(frame),
                    provenance=provenance,
                    files=len(parts) + len(defects),
                    last_measured=None if last is None or pd.isna(last) else last.to_pydatetime(),
                    bad_files=tuple(d.file for d in defects),
                )
            )
        return out

    def validate(self) -> list[Defect]:
        """Every defect of every part file under the root; empty when the tables are sound.

        A key repeated *within* one part file is a defect (one profiling pass measures a key once);
        a key repeated *across* part files is the normal append case and is not.
        """
        defects: list[Defect] = []
        for device_key, dirpath in sorted(self._device_dirs().items()):
            parts, bad = self._scan(device_key, dirpath, strict=False)
            defects.extend(bad)
            for part in parts:
                shown = self._display(part.path)
                if part.mistyped:
                    detail = (f"mistyped columns: {'; '.join(part.mistyped)} (its values convert, so reads keep "
                              "the rows; re-profile the device or rewrite the file with the right types)")
                    defects.append(Defect(device_key, shown, "corrupt", detail))
                owner = part.provenance.get("device_key")
                if owner not in (None, device_key):
                    detail = f"its provenance is for device {owner!r} but it lies under {PARTITION}{device_key}"
                    defects.append(Defect(device_key, shown, "device_mismatch", detail))
                defects.extend(_row_defects(device_key, shown, part.table))
        return defects

    # ---- internals -------------------------------------------------------------------------

    def _display(self, path: str) -> str:
        """A path a user can act on: the OS path for local files, else a URI."""
        if isinstance(self._fs, pafs.LocalFileSystem):
            return path
        return f"{self._fs.type_name}://{path.lstrip('/')}" if self._fs.type_name != "mock" else f"mock:///{path}"

    def _device_dirs(self) -> dict[str, str]:
        """Device key -> folder path, for every ``device_key=`` folder under the root."""
        infos = self._list(self._base)
        out = {}
        for info in infos:
            name = info.base_name
            if info.type == pafs.FileType.Directory and name.startswith(PARTITION):
                out[unquote(name[len(PARTITION) :])] = info.path
        return out

    def _part_files(self, dirpath: str) -> list[str]:
        """Visible ``*.parquet`` files of one device folder in write order (their names start with
        a UTC stamp). Dot and underscore files are in-flight or foreign, as in pyarrow datasets."""
        files = [
            info.path
            for info in self._list(dirpath)
            if info.type == pafs.FileType.File
            and not info.base_name.startswith((".", "_"))
            and info.base_name.endswith(".parquet")
        ]
        return sorted(files, key=posixpath.basename)

    def _list(self, path: str) -> list[pafs.FileInfo]:
        try:
            return self._fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
        except (OSError, pa.ArrowException) as exc:
            raise TableError(f"cannot list the table root {self.root}: {exc}") from exc

    def _scan(self, device_key: str, dirpath: str, *, strict: bool) -> tuple[list[_Part], list[Defect]]:
        """Load every part file of a device. ``strict`` raises on the first bad file; otherwise bad
        files come back as defects."""
        parts, defects = [], []
        for path in self._part_files(dirpath):
            try:
                parts.append(self._load(path, device_key))
            except _BadPart as bad:
                if strict:
                    raise self._bad_part_error(device_key, path, bad) from None
                defects.append(Defect(device_key, self._display(path), bad.kind, bad.detail))
        return parts, defects

    def _load(self, path: str, device_key: str) -> _Part:
        try:
            with self._fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                provenance = read_provenance(pf.schema_arrow)
                if provenance is None:
                    raise _BadPart("corrupt", "no 'fleetprune' schema metadata: not a fleetprune table file")
                version = provenance.get("schema_version")
                if not isinstance(version, int):
                    raise _BadPart("corrupt", f"schema_version {version!r} in its metadata is not an integer")
                if version > SCHEMA_VERSION:
                    raise _BadPart(
                        "newer_schema",
                        f"written with table schema version {version}; "
                        f"this fleetprune reads up to {SCHEMA_VERSION}",
                    )
                table = pf.read()
        except _BadPart:
            raise
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise _BadPart("corrupt", f"unreadable Parquet ({exc})") from None
        if "device_key" not in table.column_names:
            table = table.append_column("device_key", pa.array([device_key] * table.num_rows, pa.string()))
        if version < 2 and "lat_ms_median" in table.column_names:
            # Version 1 rows: the median was the latency; the minimum was not kept.
            table = table.append_column("lat_ms", table.column("lat_ms_median"))
            table = table.append_column("lat_ms_min", pa.nulls(table.num_rows, pa.float64()))
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise _BadPart("corrupt", f"lacks the columns {missing}")
        table = table.select(list(COLUMNS))
        mistyped = tuple(
            f"{f.name} is {table.schema.field(f.name).type}, not {f.type}"
            for f in ROW_SCHEMA if not _compatible(table.schema.field(f.name).type, f.type)
        )
        try:
            table = table.cast(ROW_SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise _BadPart("corrupt", f"columns of the wrong type ({exc})") from None
        return _Part(path, table, provenance, mistyped)

    def _bad_part_error(self, device_key: str, path: str, bad: _BadPart) -> TableError:
        shown = self._display(path)
        if bad.kind == "newer_schema":
            return TableError(
                f"{shown} was written by a newer fleetprune ({bad.detail}); "
                "upgrade fleetprune (pip install -U fleetprune) to read it"
            )
        return TableError(
            f"cannot read latency table file {shown}: {bad.detail}. Delete that file (its rows cannot be "
            f"recovered) and re-profile device {device_key} to measure them again: fleetprune profile MODEL "
            f"--tables {shlex.quote(self.root)} --devices {device_key} (MODEL = the model you are pruning)"
        )

    def _write_table(self, device_key: str, table: pa.Table) -> str:
        # Hive style: the device key lives in the folder name (and the provenance), not in a
        # column, so pyarrow datasets and pandas read a device folder (or the root) as is.
        dirpath = posixpath.join(self._base, PARTITION + device_key)
        final = self._write_atomic(dirpath, table.drop_columns(["device_key"]))
        log.info("wrote %d rows for %s to %s", table.num_rows, device_key, self._display(final))
        return self._display(final)

    def _write_atomic(self, dirpath: str, table: pa.Table) -> str:
        """Write ``table`` as a new part file in ``dirpath``: whole, or not at all."""
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"part-{stamp}-{uuid.uuid4().hex[:12]}.parquet"
        final = posixpath.join(dirpath, name)
        tmp = posixpath.join(dirpath, f".{name}.tmp")
        try:
            self._fs.create_dir(dirpath, recursive=True)
            with self._fs.open_output_stream(tmp) as out:
                pq.write_table(table, out, compression="zstd")
            local = isinstance(self._fs, pafs.LocalFileSystem)
            if local:  # a rename is only durable once the data and the folder entry are on disk
                _fsync(tmp)
            self._fs.move(tmp, final)
            if local:
                _fsync(dirpath)
        except BaseException as exc:
            try:
                self._fs.delete_file(tmp)
            except Exception:  # noqa: BLE001 - the temp may never have been created
                pass
            if isinstance(exc, (OSError, pa.ArrowException)):
                raise TableError(f"cannot write to the table root {self.root}: {exc}") from exc
            raise
        return final


def _open_root(root: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and base path of ``root``, checked to be a folder or not yet existing."""
    if not root:
        raise TableError("the table root is empty: pass a folder or a filesystem URI")
    if filesystem is not None:
        fs, base = filesystem, root
    elif _URI_RE.match(root):
        try:
            fs, base = pafs.FileSystem.from_uri(root)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise TableError(
                f"cannot open the table root {root}: {exc}. Pass a local folder or a URI pyarrow "
                "understands (file:///abs/path, s3://bucket/path, gs://..., hdfs://...)"
            ) from exc
        if fs.type_name in _EPHEMERAL:
            raise TableError(
                f"the table root {root} is an in-memory filesystem that vanishes when this process ends, "
                "taking every row with it; pass a local folder or a lasting URI (file:///abs/path, "
                "s3://bucket/path, gs://..., hdfs://...)"
            )
    else:
        fs, base = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))
    base = base.rstrip("/") or base
    try:
        # A missing root is fine (the first write creates it) unless something on its path is a file.
        probe, info = base, fs.get_file_info(base)
        while info.type == pafs.FileType.NotFound:
            parent = posixpath.dirname(probe)
            if parent in ("", probe):
                break
            probe, info = parent, fs.get_file_info(parent)
    except (OSError, pa.ArrowException) as exc:
        # Local stat reports ENOTDIR when a parent is a file.
        raise TableError(f"cannot open the table root {root}: {exc}; pass a folder") from exc
    if info.type == pafs.FileType.File:
        what = "is a file" if probe == base else f"lies under the file {probe}"
        raise TableError(
            f"the table root {root} {what}, not a folder: pass the folder that holds the "
            "device_key=... folders (it is created on the first write)"
        )
    return fs, base


def _compatible(stored: pa.DataType, wanted: pa.DataType) -> bool:
    """Whether a column stored as ``stored`` is a faithful form of ``wanted`` (another width, unit or
    encoding of the same kind), as opposed to values of another kind that merely convert (latencies
    stored as strings)."""
    if stored == wanted or pa.types.is_null(stored):
        return True
    if pa.types.is_dictionary(stored):
        return _compatible(stored.value_type, wanted)
    if pa.types.is_string(wanted):
        return pa.types.is_string(stored) or pa.types.is_large_string(stored)
    if pa.types.is_integer(wanted):
        return pa.types.is_integer(stored)
    if pa.types.is_floating(wanted):
        return pa.types.is_floating(stored) or pa.types.is_integer(stored)
    if pa.types.is_timestamp(wanted):
        return pa.types.is_timestamp(stored)
    return False


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _identities(table: pa.Table) -> list[tuple[str, int]]:
    """(key, measured_at in µs) per row: what makes a row the same measurement in two roots."""
    stamps = table.column("measured_at").cast(pa.int64()).to_pylist()
    return list(zip(table.column("key").to_pylist(), stamps))


def _canonical(provenance: dict[str, Any]) -> str:
    """Provenance as comparable text, ignoring where a merge copied it from."""
    return json.dumps({k: v for k, v in provenance.items() if k != "merged_from"}, sort_keys=True, default=str)


def _set_device(table: pa.Table, device_key: str) -> pa.Table:
    idx = table.schema.get_field_index("device_key")
    return table.set_column(idx, table.schema.field(idx), pa.array([device_key] * table.num_rows, pa.string()))


def _assemble(device_key: str, parts: list[_Part], *, warn: bool) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per key (newest wins) from a device's parts in write order, and the table's provenance.

    Provenance is the newest part's; a ``correction`` is inherited from the newest part that has
    one, so re-profiling after a calibration does not hide the fit.
    """
    tables = [p.table for p in parts]
    table = pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()
    frame = table.to_pandas()
    frame["device_key"] = device_key
    frame["statistic"] = np.repeat([part_statistic(p.provenance) for p in parts],
                                   [t.num_rows for t in tables]) if tables else []
    frame["_file"] = np.repeat(np.arange(len(tables)), [t.num_rows for t in tables]) if tables else []
    frame["_row"] = np.arange(len(frame))
    latency = frame["lat_ms"].to_numpy(dtype=float, na_value=np.nan)
    usable = np.isfinite(latency) & (latency >= 0)
    if not usable.all() and warn:
        log.warning(
            "device %s: ignoring %d rows with a NaN, infinite or negative latency; they count as not "
            "measured (run `fleetprune tables validate` to see them)",
            device_key,
            int((~usable).sum()),
        )
    frame = frame[usable]
    # Stable sort: measured_at first, then write order of files and rows as the tiebreak.
    frame = frame.sort_values(["measured_at", "_file", "_row"], kind="stable")
    frame = frame.drop_duplicates("key", keep="last").sort_values("key", kind="stable")
    frame = frame.drop(columns=["_file", "_row"]).reset_index(drop=True)
    if warn and frame["statistic"].nunique() > 1:
        counts = ", ".join(f"{n} rows the {stat}" for stat, n in frame["statistic"].value_counts().items())
        log.warning(
            "device %s mixes latencies timed with different statistics (%s): predictions compare unlike "
            "figures; profile the model again with the current protocol (it re-measures the other rows)",
            device_key, counts,
        )
    provenance: dict[str, Any] = dict(parts[-1].provenance) if parts else {}
    if provenance.get("correction") is None:
        for p in reversed(parts):
            if p.provenance.get("correction") is not None:
                provenance["correction"] = p.provenance["correction"]
                break
    return frame, provenance


def part_statistic(provenance: Mapping[str, Any]) -> str:
    """Which statistic a part's ``lat_ms`` holds: its timing protocol's ``statistic``; ``median`` for
    a part whose protocol names none (schema 1, or rows made with ``make_row``'s default)."""
    protocol = provenance.get("timing_protocol")
    statistic = protocol.get("statistic") if isinstance(protocol, Mapping) else None
    return statistic if statistic in ("min", "median") else "median"


def _examples(items: list[str], total: int) -> str:
    shown = ", ".join(items[:_EXAMPLES])
    return shown + (f", and {total - _EXAMPLES} more" if total > _EXAMPLES else "")


def _row_defects(device_key: str, shown: str, table: pa.Table) -> Iterable[Defect]:
    """The row-level defects of one readable part file, one Defect per kind."""
    keys = table.column("key").to_pylist()
    counts = pd.Series(keys, dtype=object).value_counts()
    dups = counts[counts > 1]
    if len(dups):
        listed = [f"{k} (x{n})" for k, n in dups.items()]
        detail = f"{len(dups)} keys repeated in one file: {_examples(listed, len(listed))}"
        yield Defect(device_key, shown, "duplicate_key", detail)
    found: dict[str, list[str]] = {}
    names = ("lat_ms_median", "lat_ms_p10", "lat_ms_p90", "lat_ms", "lat_ms_min", "device_key")
    cols = {c: table.column(c).to_pylist() for c in names}
    records = table.select(list(CONFIG_COLUMNS)).to_pylist()
    for i, key in enumerate(keys):
        numbers = [cols[c][i] for c in names[:-1]]
        for kind, detail in latency_defects(*numbers):
            found.setdefault(kind, []).append(f"{key} ({detail})")
        try:
            real = LayerConfig.from_row(records[i]).key
        except (TypeError, ValueError, KeyError) as exc:
            found.setdefault("bad_config", []).append(f"{key} ({exc})")
        else:
            if real != key:
                found.setdefault("key_mismatch", []).append(f"{key} (columns say {real})")
        if cols["device_key"][i] != device_key:
            found.setdefault("device_mismatch", []).append(f"{key} (device_key column {cols['device_key'][i]!r})")
    for kind, items in found.items():
        yield Defect(device_key, shown, kind, f"{len(items)} rows: {_examples(items, len(items))}")

