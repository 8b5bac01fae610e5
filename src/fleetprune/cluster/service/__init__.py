"""fleetprune.cluster.service: the long-running profiling service on Ray Serve.

``requests``, ``jobs`` and ``queue`` are plain Python (request checks, jobs and their journal, the
shared per-device queue); ``replica``, ``coordinator``, ``ingress`` and ``app`` are the Serve
deployments and how they are started. Names are exported lazily, so importing this package
imports neither Ray nor torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServiceInfo": "app",
    "read_state": "app",
    "start_service": "app",
    "stop_service": "app",
    "wait_until_stopped": "app",
    "JobSpec": "requests",
    "QueueFullError": "requests",
    "RequestError": "requests",
    "parse_job": "requests",
    "Journal": "jobs",
    "DeviceQueue": "queue",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"fleetprune.cluster.service.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fleetprune.cluster.service' has no attribute {name!r}")
