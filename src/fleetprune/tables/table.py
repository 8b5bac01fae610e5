"""One device's latency table in memory: exact, fast lookups of a layer configuration's latency."""

from __future__ import annotations

import logging
import math
import shlex
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd

from fleetprune.errors import MissingConfigsError
from fleetprune.tables.config import LAYER_OPS, LayerConfig

log = logging.getLogger(__name__)

# How many missing keys a MissingConfigsError spells out before "and N more".
MAX_LISTED = 10


class LatencyTable:
    """The measured layer latencies of one device, keyed by :attr:`LayerConfig.key`.

    Built by :meth:`TableStore.read`, which has already kept only the newest row per key. Lookups
    go through a plain dict from key to latency (the ``lat_ms`` column) so a pruner can call them many thousands of times.

    Attributes:
        device_key: the device the rows were measured on.
        provenance: the newest part file's provenance (see ``tables.schema``).
        frame: one row per key, the columns of ``ROW_SCHEMA``.
        root: the table root the rows came from, used to word the profile command on a miss.
    """

    def __init__(
        self,
        device_key: str,
        provenance: Mapping[str, Any] | None,
        frame: pd.DataFrame,
        *,
        root: str | None = None,
    ) -> None:
        self.device_key = device_key
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.frame = frame.reset_index(drop=True)
        self.root = root
        # dict(zip(...)) keeps the last of duplicate keys, matching the store's newest-wins order.
        self._latency: dict[str, float] = dict(
            zip(self.frame["key"].tolist(), self.frame["lat_ms"].astype(float).tolist())
        )
        ops = self.frame["op"].astype(str).unique().tolist() if "op" in self.frame.columns else []
        self._op_kinds = frozenset(o for o in ops if o not in LAYER_OPS)

    def __len__(self) -> int:
        return len(self._latency)

    def __contains__(self, item: object) -> bool:
        key = item.key if isinstance(item, LayerConfig) else item
        return key in self._latency

    def __iter__(self) -> Iterator[str]:
        return iter(self._latency)

    def __repr__(self) -> str:
        return f"LatencyTable({self.device_key!r}, {len(self)} configurations)"

    def keys(self) -> list[str]:
        """Every configuration key the table holds."""
        return list(self._latency)

    def configs(self) -> list[LayerConfig]:
        """Every configuration the table holds, rebuilt from the rows."""
        return [LayerConfig.from_row(r) for r in self.frame.to_dict("records")]

    @property
    def correction(self) -> tuple[float, float] | None:
        """The fitted end-to-end calibration ``measured ~ a * predicted + b``, or None.

        Read from ``provenance["correction"]``, either ``[a, b]`` or ``{"a": .., "b": .., ...}``
        (extra fit statistics such as ``r2`` and ``mape`` may ride along). It applies to a whole
        network's summed prediction, so lookups never apply it.
        """
        raw = self.provenance.get("correction")
        if raw is None:
            return None
        try:
            a, b = (raw["a"], raw["b"]) if isinstance(raw, Mapping) else raw
            a, b = float(a), float(b)
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring malformed correction %r in the provenance of %s", raw, self.device_key)
            return None
        if not (math.isfinite(a) and math.isfinite(b)):
            return None
        return (a, b)

    @property
    def op_kinds(self) -> frozenset[str]:
        """The kinds of non-layer ops (residual add, pools, ...) the table holds rows of."""
        return self._op_kinds

    @property
    def covers_ops(self) -> bool:
        """Whether the table prices ops besides convs and linears (schema 3 rows of any op kind).

        A table without any (schema 1 and 2, or profiled before fleetprune priced them) prices a
        network from its convs and linears alone, as it always did: :meth:`missing` then leaves the
        other kinds out and the latency model says so.
        """
        return bool(self._op_kinds)

    def lookup(self, config: LayerConfig) -> float:
        """Median latency in ms of exactly ``config``.

        Raises:
            MissingConfigsError: the table has no row for ``config``.
        """
        try:
            return self._latency[config.key]
        except KeyError:
            raise self._missing_error([config]) from None

    def lookup_key(self, key: str) -> float:
        """Median latency in ms of the configuration with this key (for callers that cache keys)."""
        try:
            return self._latency[key]
        except KeyError:
            raise MissingConfigsError(
                f"device {self.device_key} has no measurement for {key}", [key]
            ) from None

    def lookup_many(self, configs: Iterable[LayerConfig]) -> np.ndarray:
        """Median latencies in ms of ``configs``, in order, as a float64 array.

        Raises:
            MissingConfigsError: naming every configuration the table lacks (not just the first).
        """
        configs = list(configs)
        get = self._latency.get
        values = [get(c.key) for c in configs]
        if None in values:
            raise self._missing_error([c for c, v in zip(configs, values) if v is None])
        return np.asarray(values, dtype=np.float64)

    def missing(self, configs: Iterable[LayerConfig], *, ops: bool | None = None) -> list[LayerConfig]:
        """The configurations of ``configs`` the table lacks, deduplicated, in first-seen order.

        ``ops`` says whether rows of the non-layer kinds count: None (default) counts them only when
        the table :attr:`covers_ops`, so a schema 2 table still serves the networks it served.
        """
        ops = self.covers_ops if ops is None else ops
        seen: set[str] = set()
        out = []
        for c in configs:
            if not ops and not c.is_layer:
                continue
            k = c.key
            if k not in self._latency and k not in seen:
                seen.add(k)
                out.append(c)
        return out

    def _missing_error(self, configs: list[LayerConfig]) -> MissingConfigsError:
        return MissingConfigsError(
            missing_message(self.device_key, configs, self.root), [c.key for c in unique(configs)]
        )


def unique(configs: Iterable[LayerConfig]) -> list[LayerConfig]:
    """``configs`` without repeats, in first-seen order."""
    return list(dict.fromkeys(configs))


def missing_message(device_key: str, configs: list[LayerConfig], root: str | None = None) -> str:
    """The message of a miss: which configurations, and the command(s) that measure them.

    One ``fleetprune profile`` line per (batch, dtype, memory format) among the missing, since the
    profiler takes one of each per run.
    """
    configs = unique(configs)
    n = len(configs)
    lines = [f"the latency table of device {device_key} lacks {n} layer configuration{'s' if n != 1 else ''}:"]
    lines += [f"  {c.key}" for c in configs[:MAX_LISTED]]
    if n > MAX_LISTED:
        lines.append(f"  and {n - MAX_LISTED} more")
    runs = sorted({(c.batch, c.dtype, c.memory_format) for c in configs})
    lines.append("measure them with (MODEL = the model you are pruning):")
    root_arg = shlex.quote(root) if root else "ROOT"
    for batch, dtype, fmt in runs:
        lines.append(
            f"  fleetprune profile MODEL --tables {root_arg} --devices {device_key}"
            f" --batch {batch} --dtype {dtype} --memory-format {fmt}"
        )
    return "\n".join(lines)

