"""How ``prune`` works on several devices at once: their remote measurements overlap, their work here does not."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from fleetprune.pruner.calibrate import Measure, Network, Timing

_WORK = threading.Lock()
"""Held by a device's thread while it works on this machine (solving, pruning, tracing, writing);
released only while it waits for a remote measurement. torch.fx patches ``nn.Module.__call__`` for
the whole process while it traces, so two threads must never run model code at once: the devices
overlap where it pays, in their measurements on other machines."""
_turn = threading.local()


def waiting(measure: Measure) -> Measure:
    """``measure`` that lets the other devices' threads work while it waits for the remote device."""
    def wrapped(networks: Sequence[Network]) -> Timing:
        if not getattr(_turn, "held", False):
            return measure(networks)
        _WORK.release()
        try:
            return measure(networks)
        finally:
            _WORK.acquire()

    return wrapped


def in_turn(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def run(t: Any) -> Any:
        with _WORK:
            _turn.held = True
            try:
                return fn(t)
            finally:
                _turn.held = False

    return run


def for_each_device(targets: Sequence[Any], fn: Callable[[Any], Any], remote: set[str]) -> dict[str, Any]:
    """``fn`` of every target: those measured on the cluster in threads, their measurements side by side
    (their work here one at a time, see ``_WORK``), then this machine's one after another (nothing else
    runs here while it times). The first error is raised after all ran."""
    out: dict[str, Any] = {}
    errors: list[BaseException] = []
    side = [t for t in targets if t.device_key in remote]
    with ThreadPoolExecutor(max_workers=max(1, len(side))) as pool:
        futures = {t.device_key: pool.submit(in_turn(fn), t) for t in side}
        for key, fut in futures.items():
            try:
                out[key] = fut.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, once every device ran
                errors.append(exc)
    for t in targets:
        if t.device_key not in remote and not errors:
            out[t.device_key] = fn(t)
    if errors:
        raise errors[0]
    return out
