"""What a profiling run reports: per device type what was measured, skipped, noisy or failed.

The library returns a :class:`RunSummary`; the CLI prints :meth:`RunSummary.format`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Failure:
    """Configurations that were not measured, and why.

    Attributes:
        keys: the configuration keys.
        reason: what went wrong (a profiler error, an actor that died too often, no actor left).
    """

    keys: tuple[str, ...]
    reason: str


@dataclass
class ActorRecord:
    """One measuring process and what it did.

    Attributes:
        node_id: the node it ran on (Ray node id, or ``"local"``).
        pid: its process id (None if it never started).
        chunks: chunks it returned.
        rows: rows it measured.
        state: ``running``, ``finished``, ``died``, ``failed to start`` or ``not needed``.
        error: why it died or failed to start.
    """

    node_id: str
    pid: int | None = None
    chunks: int = 0
    rows: int = 0
    state: str = "starting"
    error: str | None = None


@dataclass
class DeviceRun:
    """The outcome for one device type (one table key).

    Attributes:
        device_key: the table key the rows went to.
        device_type: the fleet's name for the type (Ray accelerator type or CPU key).
        kind: ``'cpu'`` or ``'cuda'``.
        label: human-readable device name.
        total: configurations asked for.
        skipped: configurations the table already held.
        measured: configurations measured and written by this run.
        noisy: measured rows flagged noisy.
        failures: what could not be measured.
        seconds: wall time from the first chunk handed out to the last one written.
        retried_chunks: chunks handed to another actor after theirs died.
        actors: the measuring processes of this type.
    """

    device_key: str
    device_type: str
    kind: str
    label: str = ""
    total: int = 0
    skipped: int = 0
    measured: int = 0
    noisy: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    retried_chunks: int = 0
    actors: list[ActorRecord] = field(default_factory=list)

    @property
    def failed(self) -> int:
        """Configurations not measured because of a failure."""
        return sum(len(f.keys) for f in self.failures)

    @property
    def done(self) -> int:
        """Configurations dealt with: already in the table, measured now, or failed."""
        return self.skipped + self.measured + self.failed


@dataclass
class RunSummary:
    """Everything a profiling run did, per device type.

    Attributes:
        tables: the table root written to.
        address: where it ran: a Ray address, ``local`` (embedded Ray) or ``none`` (in-process).
        devices: one entry per device type (table key).
        seconds: wall time of the whole run, start-up included.
        startup_s: seconds until the first measuring process was ready (Ray, discovery, actors).
    """

    tables: str
    address: str
    devices: list[DeviceRun] = field(default_factory=list)
    seconds: float = 0.0
    startup_s: float = 0.0

    @property
    def measured(self) -> int:
        """Configurations measured by this run, all devices together."""
        return sum(d.measured for d in self.devices)

    @property
    def failed(self) -> int:
        """Configurations that failed, all devices together."""
        return sum(d.failed for d in self.devices)

    @property
    def ok(self) -> bool:
        """True when every asked configuration is now in the tables."""
        return self.failed == 0

    def device(self, key_or_type: str) -> DeviceRun:
        """The entry of a table key or device type name.

        Raises:
            KeyError: no such entry.
        """
        for d in self.devices:
            if key_or_type in (d.device_key, d.device_type):
                return d
        raise KeyError(key_or_type)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the summary."""
        out = asdict(self)
        for d, src in zip(out["devices"], self.devices):
            d["failed"] = src.failed
        return out

    def format(self) -> str:
        """A small text table, one line per device type, then the failures."""
        header = ("device type", "table key", "configs", "measured", "skipped", "noisy", "failed", "time")
        rows = [
            (d.device_type, d.device_key, str(d.total), str(d.measured), str(d.skipped), str(d.noisy),
             str(d.failed), f"{d.seconds:.1f} s")
            for d in self.devices
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
        lines.append(
            f"{self.measured} configurations measured into {self.tables} in {self.seconds:.1f} s "
            f"(start-up {self.startup_s:.1f} s)"
        )
        for d in self.devices:
            for f in d.failures:
                shown = ", ".join(f.keys[:3]) + (f" and {len(f.keys) - 3} more" if len(f.keys) > 3 else "")
                lines.append(f"failed on {d.device_type}: {len(f.keys)} configuration(s) ({shown}): {f.reason}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ProgressEvent:
    """Sent after each chunk written (and once when a device type starts).

    Attributes:
        device_key: table key.
        device_type: the fleet's name for the type.
        done: configurations dealt with so far (already in the table, measured, failed).
        total: configurations asked for.
        node_id: node of the actor whose chunk was just written (None for the start event).
        pid: process id of that actor.
    """

    device_key: str
    device_type: str
    done: int
    total: int
    node_id: str | None = None
    pid: int | None = None


ProgressCallback = Callable[[ProgressEvent], None]
