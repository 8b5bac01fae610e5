"""Readers of the folders a report is made from: a variants folder or a table root.

A variant folder is read through its owner, :mod:`fleetprune.pruner.variant` (``widths.json``,
``report.json``, with the keys docs/internals.md lists); a table root through ``TableStore`` and
``validation.parquet``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fleetprune.errors import FleetpruneError, ReportError
from fleetprune.pruner.variant import read_report, read_widths
from fleetprune.tables import TableStore

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
VARIANT_FILES = ("widths.json", "report.json")
VALIDATION = "validation.parquet"
PARTITION_PREFIX = "device_key="


@dataclass
class Step:
    """One pruning step of a variant's schedule (latencies in ms; None where not recorded)."""

    step: int
    target_ms: float | None
    predicted_ms: float | None
    measured_ms: float | None = None


@dataclass
class Variant:
    """What the report needs from one device's variant folder."""

    device_key: str
    widths: dict[str, int]
    dense_widths: dict[str, int]
    budget_ms: float | None
    dense_ms: float | None
    predicted_ms: float | None
    measured_ms: float | None
    solver_time_s: float | None
    steps: list[Step]
    model: str | None = None
    dense_measured_ms: float | None = None
    fixed_source: str | None = None
    rounds: list[Step] = field(default_factory=list)
    verdict: str | None = None
    verify_note: str | None = None


@dataclass
class VariantsFolder:
    """A folder written by ``fleetprune prune --out DIR``."""

    root: Path
    variants: list[Variant]

    @property
    def groups(self) -> list[str]:
        """Every group name, in the order the variants list them."""
        return list(dict.fromkeys(g for v in self.variants for g in v.widths))

    @property
    def dense_widths(self) -> dict[str, int]:
        """The dense width of every group any variant records one for."""
        return {g: w for v in self.variants for g, w in v.dense_widths.items()}


@dataclass
class TableRoot:
    """A latency table root: one frame of newest rows per device, plus optional validation rows."""

    root: Path
    tables: dict[str, pd.DataFrame]
    provenance: dict[str, dict[str, Any]]
    validation: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def detect(root: Path) -> str:
    """Say what ``root`` holds: ``"variants"`` or ``"tables"``; anything else raises ReportError."""
    if not root.is_dir():
        raise ReportError(
            f"{root} is not a folder; pass a variants folder (from `fleetprune prune --out DIR`) "
            "or a latency table root"
        )
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise ReportError(
            f"{root} is empty; pass a variants folder (from `fleetprune prune --out DIR`) "
            "or a latency table root (from `fleetprune profile`)"
        )
    if (root / SUMMARY).is_file():
        return "variants"
    if any(p.is_dir() and p.name.startswith(PARTITION_PREFIX) for p in entries) or (root / VALIDATION).exists():
        return "tables"
    if any(p.is_dir() and any((p / f).is_file() for f in VARIANT_FILES) for p in entries):
        raise ReportError(
            f"{root} looks like a variants folder but has no {SUMMARY}; the prune run did not finish: "
            f"rerun `fleetprune prune --out {root}`"
        )
    raise ReportError(
        f"{root} is neither a variants folder (no {SUMMARY}) nor a latency table root (no "
        f"{PARTITION_PREFIX}<KEY> folders, no {VALIDATION}); pass the folder given to "
        "`fleetprune prune --out` or to `fleetprune profile`"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}; rerun `fleetprune prune` for this device") from exc


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _summary_devices(summary: Any, path: Path) -> list[str]:
    """The device keys ``summary.json`` lists (``{"devices": [{"device_key": ...}, ...]}``)."""
    devices = summary.get("devices") if isinstance(summary, dict) else None
    keys = [d.get("device_key") for d in devices if isinstance(d, dict)] if isinstance(devices, list) else []
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ReportError(f"{path} lists no devices; rerun `fleetprune prune`")
    return keys


def _plan_widths(plan: Any) -> dict[str, int]:
    """Dense widths from the plan stored in ``widths.json`` (``Plan.to_dict()``: its groups' name and width)."""
    groups = plan.get("groups") if isinstance(plan, dict) else None
    return {str(g["name"]): int(g["width"]) for g in groups or []
            if isinstance(g, dict) and g.get("name") is not None and g.get("width") is not None}


def _steps(rows: Any) -> list[Step]:
    """``report.json``'s ``steps``, or its closed-loop ``verification.rounds`` (numbered from 1)."""
    return [Step(step=int(r.get("step") or i), target_ms=_float(r.get("target_ms")),
                 predicted_ms=_float(r.get("predicted_ms")), measured_ms=_float(r.get("measured_ms")))
            for i, r in enumerate(rows or [], start=1) if isinstance(r, dict)]


def load_variants(root: Path, devices: list[str] | None = None) -> VariantsFolder:
    """Read a variants folder (through :mod:`fleetprune.pruner.variant`, the folder's owner); a device
    listed in ``summary.json`` without its files raises ReportError."""
    keys = _summary_devices(_read_json(root / SUMMARY), root / SUMMARY)
    keys = _select(keys, devices, root)
    variants = []
    for key in keys:
        folder = root / key
        missing = [f for f in VARIANT_FILES if not (folder / f).is_file()]
        if missing:
            raise ReportError(
                f"variant of device {key!r} is incomplete: {', '.join(str(folder / f) for f in missing)} "
                f"missing; rerun `fleetprune prune` for that device or drop it with --devices"
            )
        widths_doc, report = read_widths(folder), read_report(folder)
        verification = report.get("verification") or {}
        variants.append(
            Variant(
                device_key=key,
                widths={g: int(w) for g, w in (widths_doc.get("widths") or report.get("widths") or {}).items()},
                dense_widths={g: int(w) for g, w in (report.get("dense_widths") or {}).items()}
                or _plan_widths(widths_doc.get("plan")),
                budget_ms=_float(report.get("budget_ms")),
                dense_ms=_float(report.get("dense_ms")),
                predicted_ms=_float(report.get("predicted_ms")),
                measured_ms=_float(report.get("measured_ms")),
                solver_time_s=_float(report.get("solver_time_s")),
                steps=_steps(report.get("steps")),
                model=widths_doc.get("model"),
                dense_measured_ms=_float(report.get("dense_measured_ms")),
                fixed_source=report.get("fixed_source"),
                rounds=_steps(verification.get("rounds")),
                verdict=verification.get("verdict"),
                verify_note=verification.get("note") or None,
            )
        )
    log.info("read %d variants from %s", len(variants), root)
    return VariantsFolder(root=root, variants=variants)


def _select(known: list[str], wanted: list[str] | None, root: Path) -> list[str]:
    if not wanted:
        return known
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ReportError(
            f"no device {', '.join(map(repr, unknown))} in {root}; known devices: {', '.join(known) or 'none'}"
        )
    return list(wanted)


def load_tables(root: Path, devices: list[str] | None = None) -> TableRoot:
    """Read every device's newest rows of a table root, and its validation rows if present."""
    try:
        store = TableStore(str(root))
        summaries = store.devices()
        keys = _select(sorted(s.device_key for s in summaries if s.rows), devices, root)
        read = {key: store.read(key) for key in keys}
    except ReportError:
        raise
    except FleetpruneError as exc:  # TableStore speaks TableError; the report verb speaks ReportError
        raise ReportError(f"cannot read the latency tables under {root}: {exc}") from exc
    notes = [
        f"device {s.device_key}: unreadable table files {', '.join(s.bad_files)}; "
        f"run `fleetprune tables validate --tables {root}` to see why"
        for s in summaries
        if s.bad_files
    ]
    for text in notes:
        log.warning("%s", text)
    return TableRoot(
        root=root,
        tables={key: t.frame for key, t in read.items()},
        provenance={key: dict(t.provenance or {}) for key, t in read.items()},
        validation=load_validation(root, keys if devices else None),
        notes=notes,
    )


def load_validation(root: Path, devices: list[str] | None = None) -> pd.DataFrame | None:
    """The rows of ``ROOT/validation.parquet`` (a file or a folder of parts), or None when absent."""
    path = root / VALIDATION
    if not path.exists():
        return None
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        raise ReportError(f"cannot read {path}: {exc}; rerun `fleetprune validate`") from exc
    needed = {"device_key", "predicted_ms", "measured_ms"}
    if not needed <= set(frame.columns):
        raise ReportError(
            f"{path} lacks columns {sorted(needed - set(frame.columns))}; rerun `fleetprune validate`"
        )
    if devices:
        frame = frame[frame["device_key"].isin(devices)]
    return frame.reset_index(drop=True)
