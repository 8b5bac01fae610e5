"""fleetprune.tables: layer configurations, latency rows, and the Parquet tables that hold them.

This package imports nothing else of fleetprune (only ``fleetprune.errors``), so every other part
may build on it.
"""

from fleetprune.tables.config import LayerConfig
from fleetprune.tables.schema import ROW_SCHEMA, SCHEMA_VERSION, make_row
from fleetprune.tables.store import Defect, DeviceSummary, TableStore
from fleetprune.tables.table import LatencyTable

__all__ = [
    "Defect",
    "DeviceSummary",
    "LatencyTable",
    "LayerConfig",
    "ROW_SCHEMA",
    "SCHEMA_VERSION",
    "TableStore",
    "make_row",
]
