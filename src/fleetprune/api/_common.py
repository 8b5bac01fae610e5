"""What the api verbs work out the same way: a table's timing protocol, a model's input shape."""

from __future__ import annotations

import logging
from typing import Sequence

from fleetprune import models
from fleetprune.errors import FleetpruneError, TableError
from fleetprune.profiler import TimingProtocol
from fleetprune.tables import LatencyTable

log = logging.getLogger(__name__)


def table_protocol(table: LatencyTable) -> TimingProtocol:
    """The timing protocol ``table`` was profiled with, so end-to-end checks time networks the same
    way and report the same statistic; the default protocol when the table recorded none."""
    raw = table.provenance.get("timing_protocol")
    protocol = TimingProtocol.from_dict(raw)
    if protocol is None:
        if raw is not None:
            log.warning("ignoring the unreadable timing protocol %r of table %s", raw, table.device_key)
        return TimingProtocol()
    return protocol


def sample_shape(model_name: str, input_size: Sequence[int] | int | None) -> tuple[int, ...]:
    """One sample's (C, H, W): the model's default, or its channels at ``input_size`` (H or (H, W)).

    Raises:
        ModelError: an unknown model name.
        FleetpruneError: a size that is not one or two positive integers.
    """
    shape = tuple(models.input_shape(model_name))
    if input_size is None:
        return shape
    size = (int(input_size),) * 2 if isinstance(input_size, int) else tuple(int(s) for s in input_size)
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise FleetpruneError(f"--input-size must be H or HxW with positive sizes, got {input_size}")
    return (shape[0], *size)


def settings_of(table: LatencyTable) -> list[tuple[int, str, str]]:
    """The (batch, dtype, memory format) combinations ``table`` has rows for, sorted."""
    frame = table.frame
    if not len(frame):
        return []
    combos = frame[["batch", "dtype", "memory_format"]].drop_duplicates()
    return sorted((int(b), str(d), str(f)) for b, d, f in combos.itertuples(index=False))


def resolve_setting(
    table: LatencyTable, model_name: str, root: str, batch: int | None, dtype: str | None, memory_format: str | None
) -> tuple[int, str, str]:
    """The (batch, dtype, memory format) to prune or validate for: as asked, or the table's only one.

    Raises:
        TableError: the table has no rows for what was asked (the message gives the profile command),
            or several settings fit.
    """
    have = settings_of(table)
    listed = ", ".join(f"batch {b} {d} {f}" for b, d, f in have) or "no rows"
    fits = [s for s in have if (batch is None or s[0] == batch) and (dtype is None or s[1] == dtype)
            and (memory_format is None or s[2] == memory_format)]
    if not fits:
        asked = " ".join(
            x for x in (f"batch {batch}" if batch is not None else "", dtype or "", memory_format or "") if x
        )
        raise TableError(
            f"the latency table of device {table.device_key} has no rows for {asked} (it has: {listed}); "
            f"ask for what it has (--batch/--dtype/--memory-format) or measure it: fleetprune profile "
            f"{model_name} --tables {root} --devices {table.device_key}"
            + (f" --batch {batch}" if batch is not None else "")
            + (f" --dtype {dtype}" if dtype else "")
            + (f" --memory-format {memory_format}" if memory_format else "")
        )
    if len(fits) > 1:
        options = ", ".join(f"batch {b} {d} {f}" for b, d, f in fits)
        raise TableError(
            f"the latency table of device {table.device_key} holds several settings ({options}); "
            "say which with --batch, --dtype and --memory-format"
        )
    return fits[0]
