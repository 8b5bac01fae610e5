"""fleetprune.cluster: the fleet's device types, pinned profiling actors, rows streamed into the tables.

The only package that imports Ray, and only in ``connect`` (when asked to), ``discover``,
``actors``, ``run`` and ``verify``; ``devices``, ``spec``, ``work``, ``summary`` and ``local`` (the
``--ray-address none`` path) never do. Names are exported lazily so that importing this package
imports neither Ray nor torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Connection": "connect",
    "connect": "connect",
    "discover": "discover",
    "profile_fleet": "run",
    "profile_local": "local",
    "local_fleet": "local",
    "BackendSpec": "spec",
    "DeviceType": "devices",
    "Fleet": "devices",
    "NodeInfo": "devices",
    "select_types": "devices",
    "ActorRecord": "summary",
    "DeviceRun": "summary",
    "Failure": "summary",
    "ProgressEvent": "summary",
    "RunSummary": "summary",
    "FleetMeasurer": "verify",
    "Wanted": "verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"fleetprune.cluster.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fleetprune.cluster' has no attribute {name!r}")
