"""What the api verbs work out the same way: a table's timing protocol, a model's input shape.

The (batch, dtype, memory format, round_to) setting is resolved in :mod:`fleetprune.pruner.setting`."""

from __future__ import annotations

import logging
from typing import Sequence

from fleetprune import models
from fleetprune.errors import FleetpruneError
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


def quick_protocol() -> TimingProtocol:
    """The profiler's short timing protocol (``--quick``: noisier, for tries and tests)."""
    return TimingProtocol.quick()
