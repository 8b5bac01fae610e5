"""The one family of errors a user can hit.

Every message says what went wrong *and what to do next*; the CLI prints the message (no
traceback) and exits non-zero. This module imports nothing of ours so every part may use it.
"""

from __future__ import annotations


class FleetpruneError(Exception):
    """Base of every user-facing error. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class TableError(FleetpruneError):
    """A latency table root, file or row is unreadable, corrupt or of an unknown schema."""


class MissingConfigsError(TableError):
    """A lookup asked for layer configurations the table does not hold.

    Attributes:
        missing: the configuration keys that were not found.
    """

    def __init__(self, message: str, missing: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])


class DeviceError(FleetpruneError):
    """An unknown device, an unreachable cluster, or a cluster with no usable device."""


class ProfileError(FleetpruneError):
    """The profiler cannot build or time a layer configuration."""


class ModelError(FleetpruneError):
    """An unknown model name, a layer the pruner cannot handle, or weights that do not fit."""


class BudgetError(FleetpruneError):
    """A latency budget that cannot be met or is malformed."""


class DataError(FleetpruneError):
    """A dataset file that is absent or malformed."""


class ReportError(FleetpruneError):
    """A folder that is neither a variants folder nor a table root, or is incomplete."""


class DeviceLostError(DeviceError):
    """A device that was measuring went away (its node died, its actor crashed) mid-way.

    Callers fall back to what they can do without it (the pruner: the table's prediction only).
    """
