"""Profile jobs of the service: their state and per-device progress, and the journal that outlives a restart.

A job is done when every configuration it needs is in the table of each of its devices, whoever
measured it; so its progress can always be rebuilt from the journal (what was asked) and the tables
(what is there). No Ray here.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fleetprune.cluster.service.requests import FINAL_STATES, JobSpec

log = logging.getLogger(__name__)

JOURNAL_DIR = "_service"  # a leading underscore: table readers skip it
JOURNAL_FILE = "jobs.jsonl"


def now_iso() -> str:
    """The current UTC time as ISO 8601 text."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def new_job_id() -> str:
    """A short unique job id."""
    return uuid.uuid4().hex[:12]


@dataclass
class DeviceProgress:
    """What one job needs on one device and how far it got.

    Attributes:
        device_key: the table key.
        device_type: the fleet's name for the type.
        needed: every configuration key the job needs there.
        done: the keys now in the table (measured by anyone, before or during the job).
        failed: key -> why it could not be measured.
        measured_here: keys that became done while the job ran (for its rate).
    """

    device_key: str
    device_type: str
    needed: set[str]
    done: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    measured_here: int = 0

    @property
    def finished(self) -> bool:
        return len(self.done) + len(self.failed) >= len(self.needed)

    def status(self, elapsed_s: float) -> dict[str, Any]:
        rate = self.measured_here / elapsed_s if elapsed_s > 0 and self.measured_here else 0.0
        left = len(self.needed) - len(self.done) - len(self.failed)
        return {
            "device_key": self.device_key, "device_type": self.device_type, "done": len(self.done),
            "total": len(self.needed), "failed": len(self.failed), "rate_per_s": round(rate, 3),
            "eta_s": round(left / rate, 1) if rate > 0 and left > 0 else (0.0 if left == 0 else None),
            "failures": sorted({reason for reason in self.failed.values()})[:5],
        }


@dataclass
class Job:
    """One profile job: its spec, state and per-device progress (states only move forward)."""

    id: str
    spec: JobSpec
    submitted_at: str = field(default_factory=now_iso)
    state: str = "queued"
    devices: dict[str, DeviceProgress] = field(default_factory=dict)
    message: str = ""
    finished_at: str | None = None
    started: float | None = None
    final_counts: dict[str, Any] | None = None  # from the journal, for jobs that ended before a restart

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def mark_running(self) -> None:
        if self.state == "queued":
            self.state = "running"
            self.started = time.monotonic()

    def finish(self, state: str, message: str = "") -> None:
        """Move to a final state once; later calls are ignored."""
        if not self.final:
            self.state, self.message, self.finished_at = state, message, now_iso()

    def check_complete(self) -> bool:
        """End the job (done, or failed when a configuration could not be measured) once every device is finished."""
        if self.final or not self.devices or not all(d.finished for d in self.devices.values()):
            return False
        failed = sum(len(d.failed) for d in self.devices.values())
        if failed:
            self.finish("failed", f"{failed} configuration(s) could not be measured; submit the job again to retry them")
        else:
            self.finish("done")
        return True

    def status(self) -> dict[str, Any]:
        """The job as the API shows it."""
        elapsed = time.monotonic() - self.started if self.started else 0.0
        devices = [d.status(elapsed) for d in self.devices.values()]
        if not devices and self.final_counts:
            devices = self.final_counts.get("devices", [])
        return {
            "id": self.id, "state": self.state, "job": self.spec.to_dict() | {"configs": len(self.spec.configs)},
            "description": self.spec.describe(), "submitted_at": self.submitted_at, "finished_at": self.finished_at,
            "message": self.message, "devices": devices,
            "done": sum(d["done"] for d in devices), "total": sum(d["total"] for d in devices),
            "failed": sum(d["failed"] for d in devices),
        }


class Journal:
    """An append-only JSON-lines file of job events under ``ROOT/_service/jobs.jsonl``.

    Records: ``{"op": "submit", "id", "at", "job": JobSpec.to_dict()}``, ``{"op": "cancel", "id", "at"}``,
    ``{"op": "end", "id", "at", "state", "message", "status"}``. A local file takes each record with
    one ``O_APPEND`` write and an fsync, so a record is whole or absent; on another filesystem the
    file is rewritten to a temporary name and moved. A torn last line is skipped when read.
    """

    def __init__(self, root: str):
        self.root = root
        if "://" in root and not root.startswith("file://"):
            import pyarrow.fs as pafs

            self._fs, base = pafs.FileSystem.from_uri(root)
            self._remote: str | None = f"{base.rstrip('/')}/{JOURNAL_DIR}/{JOURNAL_FILE}"
            self.path = f"{root.rstrip('/')}/{JOURNAL_DIR}/{JOURNAL_FILE}"
        else:
            local = root[len("file://"):] if root.startswith("file://") else root
            self._remote = None
            self.path = os.path.join(local, JOURNAL_DIR, JOURNAL_FILE)

    def append(self, record: dict[str, Any]) -> None:
        """Add one record durably."""
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        if self._remote is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        old = self._read_bytes()
        tmp = f"{self._remote}.{uuid.uuid4().hex}.tmp"
        self._fs.create_dir(self._remote.rsplit("/", 1)[0], recursive=True)
        with self._fs.open_output_stream(tmp) as out:
            out.write(old + line)
        self._fs.move(tmp, self._remote)

    def _read_bytes(self) -> bytes:
        if self._remote is None:
            try:
                with open(self.path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return b""
        try:
            with self._fs.open_input_stream(self._remote) as f:
                return f.read()
        except (FileNotFoundError, OSError):
            return b""

    def records(self) -> list[dict[str, Any]]:
        """Every whole record, oldest first."""
        out = []
        for n, line in enumerate(self._read_bytes().decode(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is torn or corrupt; skipped", self.path, n)
        return out

    def replay(self) -> tuple[list[tuple[str, dict[str, Any], str]], dict[str, dict[str, Any]]]:
        """Jobs to resume ``[(id, job dict, submitted_at)]`` in submission order, and ended jobs ``{id: end record}``."""
        submitted: dict[str, tuple[dict[str, Any], str]] = {}
        ended: dict[str, dict[str, Any]] = {}
        for rec in self.records():
            op, job_id = rec.get("op"), rec.get("id")
            if op == "submit" and isinstance(rec.get("job"), dict):
                submitted[job_id] = (rec["job"], rec.get("at", ""))
            elif op == "cancel":
                ended[job_id] = {"state": "cancelled", "at": rec.get("at"), "message": "cancelled", **ended.get(job_id, {})}
            elif op == "end":
                ended[job_id] = rec
        resume = [(i, job, at) for i, (job, at) in submitted.items() if i not in ended]
        history = {i: {**ended[i], "job": submitted[i][0], "submitted_at": submitted[i][1]}
                   for i in ended if i in submitted}
        return resume, history


__all__ = ["DeviceProgress", "Job", "JOURNAL_DIR", "JOURNAL_FILE", "Journal", "new_job_id", "now_iso"]
