"""The service's work queue of one device (table key), shared by every job: each configuration once.

A configuration enters the queue when the first job needs it and is not yet in the table; later
jobs that need it only register as waiting for it. Chunks are cut with the fleet's own
:func:`~fleetprune.cluster.work.make_chunks` and tallied by its :class:`~fleetprune.cluster.work.Ledger`
(retries of a chunk whose replica died included). No Ray here.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Iterable

from fleetprune.cluster.summary import DeviceRun
from fleetprune.cluster.work import Chunk, ChunkResult, Ledger, chunk_size_for, make_chunks
from fleetprune.tables.config import LayerConfig

log = logging.getLogger(__name__)


class DeviceQueue:
    """Pending configurations of one table key, who waits for each, and the chunks in flight.

    Args:
        device_key: the table key rows are written to.
        device_type: the fleet's name for the type.
        kind: ``cpu`` or ``cuda``.
        workers: replicas measuring this type (sizes the chunks).
        chunk_size: fixed configurations per chunk (default: the fleet's automatic size).
    """

    def __init__(self, device_key: str, device_type: str, kind: str, *, workers: int = 1, chunk_size: int | None = None):
        self.ledger = Ledger(DeviceRun(device_key=device_key, device_type=device_type, kind=kind), [])
        self.workers = max(1, workers)
        self.chunk_size = chunk_size
        self.queued: dict[str, LayerConfig] = {}  # not yet in the table: pending or in flight
        self.waiters: dict[str, set[str]] = {}
        self._next_index = 0

    @property
    def device_key(self) -> str:
        return self.ledger.run.device_key

    def __len__(self) -> int:
        return len(self.queued)

    def add(self, job_id: str, configs: Iterable[LayerConfig], measured: set[str], *, seed: int = 0) -> int:
        """Register ``job_id`` as waiting for every configuration of ``configs`` not in ``measured``.

        Returns:
            How many configurations were new to the queue (the others were already queued by
            another job, or are in the table).
        """
        new: dict[str, LayerConfig] = {}
        for c in configs:
            if c.key in measured:
                continue
            self.waiters.setdefault(c.key, set()).add(job_id)
            if c.key not in self.queued and c.key not in new:
                new[c.key] = c
        if new:
            self.queued.update(new)
            size = chunk_size_for(len(new), self.workers, self.chunk_size)
            chunks = make_chunks(list(new.values()), size, seed=seed + self._next_index)
            for chunk in chunks:
                chunk.index = self._next_index
                self._next_index += 1
            self.ledger.pending.extend(chunks)
            self.ledger.run.total += len(new)
        return len(new)

    def take(self) -> Chunk | None:
        """The next chunk, without configurations no job waits for any more (cancelled)."""
        while self.ledger.pending:
            chunk = self.ledger.take()
            assert chunk is not None
            live = tuple(c for c in chunk.configs if c.key in self.queued)
            if live:
                return chunk if len(live) == len(chunk.configs) else _with(chunk, live)
            self.ledger.in_flight -= 1
        return None

    def returned(self, chunk: Chunk, result: ChunkResult) -> tuple[dict[str, set[str]], dict[str, dict[str, str]]]:
        """A chunk whose rows were written: ``({job: keys now done}, {job: {key: failure reason}})``."""
        self.ledger.returned(chunk, result)
        done: dict[str, set[str]] = {}
        failed: dict[str, dict[str, str]] = {}
        for row in result.rows:
            for job in self._release(row["key"]):
                done.setdefault(job, set()).add(row["key"])
        for key, reason in result.failures:
            for job in self._release(key):
                failed.setdefault(job, {})[key] = reason
        return done, failed

    def lost(self, chunk: Chunk, reason: str, max_retries: int) -> dict[str, dict[str, str]]:
        """A chunk whose replica died: queued again first, or failed after ``max_retries``; returns failures per job."""
        self.ledger.lost(chunk, reason, max_retries)
        failed: dict[str, dict[str, str]] = {}
        if chunk.attempts > max_retries:
            why = f"{reason}; gave up after {chunk.attempts} attempts"
            for c in chunk.configs:
                for job in self._release(c.key):
                    failed.setdefault(job, {})[c.key] = why
        return failed

    def cancel(self, job_id: str) -> int:
        """Stop waiting for ``job_id``; drop what no other job waits for; return how many were dropped."""
        dropped = 0
        for key in [k for k, jobs in self.waiters.items() if job_id in jobs]:
            jobs = self.waiters[key]
            jobs.discard(job_id)
            if not jobs:
                del self.waiters[key]
                if self.queued.pop(key, None) is not None:
                    dropped += 1
        self.ledger.run.total -= dropped
        return dropped

    def _release(self, key: str) -> set[str]:
        self.queued.pop(key, None)
        return self.waiters.pop(key, set())


def _with(chunk: Chunk, configs: tuple[LayerConfig, ...]) -> Chunk:
    return replace(chunk, configs=configs)


__all__ = ["DeviceQueue"]
