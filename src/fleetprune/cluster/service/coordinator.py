"""The service's coordinator: jobs, one shared queue per device, dispatch to the warm replicas, the journal.

It runs as a single Serve replica (its state is the queue), on Serve's event loop: every replica
call is an awaited handle call, every chunk is written as one atomic part file as soon as it comes
back (in a worker thread), and a chunk whose replica died goes back to the front of its device's
queue for whichever replica of the type is free next. Answers are plain dicts; a user error comes
back as ``{"error": {...}}`` (a Ray-wrapped exception would lose its fields on the way).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from fleetprune.cluster.devices import DeviceType, Fleet, select_types
from fleetprune.cluster.service.jobs import DeviceProgress, Job, Journal, new_job_id, now_iso
from fleetprune.cluster.service.queue import DeviceQueue
from fleetprune.cluster.service.requests import (
    JobSpec, NotFoundError, QueueFullError, RequestError, http_status, job_from_dict,
)
from fleetprune.cluster.spec import BackendSpec
from fleetprune.errors import DeviceError, FleetpruneError
from fleetprune.tables.config import LayerConfig
from fleetprune.tables.store import TableStore

log = logging.getLogger(__name__)

Planner = Callable[[dict, str], Sequence[LayerConfig]]
"""``plan(job dict, kind) -> configurations`` of a model-based job on a device of ``kind`` (injected by the api)."""

RECOVER_POLL_S = 1.0
RECOVER_LIMIT_S = 600.0


@dataclass
class Slot:
    """One profiling replica (its own Serve deployment, pinned to one node) as the coordinator sees it."""

    name: str
    handle: Any
    device_type: DeviceType
    node_id: str
    state: str = "starting"  # starting | idle | busy | recovering | broken
    key: str | None = None
    pid: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    chunks: int = 0
    rows: int = 0
    restarts: int = 0
    ran_on: str | None = None  # the node the replica itself reports (must be node_id)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "device_type": self.device_type.name, "device_key": self.key,
                "node_id": self.node_id, "pid": self.pid, "state": self.state, "chunks": self.chunks,
                "rows": self.rows, "restarts": self.restarts, "error": self.error, "ran_on": self.ran_on}


def _answer(fn):  # noqa: ANN001, ANN202 - decorator
    """Turn a user error of an async method into ``{"error": {kind, status, message, retry_after_s}}``."""
    async def wrapper(self, *args, **kwargs):  # noqa: ANN001, ANN202
        try:
            return await fn(self, *args, **kwargs)
        except FleetpruneError as exc:
            return {"error": {"kind": type(exc).__name__, "status": http_status(exc), "message": str(exc),
                              "retry_after_s": getattr(exc, "retry_after_s", None)}}
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class Coordinator:
    """Jobs, queues and replicas of one service.

    Args:
        root: the table root (the journal lives in ``ROOT/_service/``).
        fleet: the device types found when the service started.
        spec: how the replicas time (real or fake).
        replicas: ``[{"name", "handle", "type": DeviceType, "node_id"}]``, one per profiling replica.
        planner: the injected model planner.
        queue_limit: most configurations waiting across all devices before a job is refused (429).
        max_retries: how often a chunk whose replica died is handed out again.
        chunk_size: configurations per chunk (default: the fleet's automatic size).
        seed: shuffles the measuring order.
    """

    def __init__(self, root: str, fleet: Fleet, spec: BackendSpec, replicas: list[dict[str, Any]],
                 planner: Planner | None = None, *, queue_limit: int = 100_000, max_retries: int = 2,
                 chunk_size: int | None = None, seed: int = 0):
        self.store = TableStore(root)
        self.journal = Journal(root)
        self.fleet, self.spec, self.planner = fleet, spec, planner
        self.queue_limit, self.max_retries, self.chunk_size, self.seed = queue_limit, max_retries, chunk_size, seed
        self.slots = [Slot(r["name"], r["handle"], r["type"], r["node_id"]) for r in replicas]
        self.queues: dict[str, DeviceQueue] = {}
        self.jobs: dict[str, Job] = {}
        self.urgent: dict[str, deque] = {}
        self.versions: dict[str, int] = {}
        self.boot = uuid.uuid4().hex[:8]
        self.started_at = time.monotonic()
        self.measured = 0
        self.stopping = False
        self._start: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- start-up ------------------------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        """Wait for every replica's device, then resume the journal's unfinished jobs (idempotent)."""
        if self._start is None:
            self._start = asyncio.ensure_future(self._boot())
        await asyncio.shield(self._start)
        return {"boot": self.boot, "replicas": [s.to_dict() for s in self.slots]}

    async def _boot(self) -> None:
        infos = await asyncio.gather(*(self._info(s) for s in self.slots))
        for slot, info in zip(self.slots, infos):
            self._take_info(slot, info)
        resume, history = self.journal.replay()
        for job_id, data in history.items():
            job = Job(job_id, job_from_dict(data["job"]), submitted_at=data.get("submitted_at") or now_iso(),
                      state=data.get("state", "done"), message=data.get("message", ""), finished_at=data.get("at"))
            job.final_counts = data.get("status")
            self.jobs[job_id] = job
        for job_id, data, at in resume:
            try:
                await self._admit(Job(job_id, job_from_dict(data), submitted_at=at), limit=False, record=False)
                log.info("resumed job %s from the journal", job_id)
            except FleetpruneError as exc:
                job = Job(job_id, job_from_dict(data), submitted_at=at)
                job.finish("failed", f"could not resume after a restart: {exc}")
                self.jobs[job_id] = job
                self._record_end(job)
        self._pump()

    async def _info(self, slot: Slot) -> dict[str, Any]:
        try:
            return await slot.handle.info.remote()
        except Exception as exc:  # noqa: BLE001 - reported per replica
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _take_info(self, slot: Slot, info: dict[str, Any]) -> None:
        slot.pid, slot.ran_on = info.get("pid"), info.get("node_id")
        slot.error = info.get("error")
        if slot.error:
            slot.state = "broken"
            return
        slot.key, slot.provenance, slot.state = info["device_key"], info.get("provenance") or {}, "idle"
        self._queue(slot.key, slot.device_type)

    def _queue(self, key: str, device_type: DeviceType) -> DeviceQueue:
        if key not in self.queues:
            workers = sum(1 for s in self.slots if s.device_type.name == device_type.name)
            self.queues[key] = DeviceQueue(key, device_type.name, device_type.kind, workers=workers,
                                           chunk_size=self.chunk_size)
        return self.queues[key]

    def _key_of(self, device_type: DeviceType) -> str:
        keys = [s.key for s in self.slots if s.device_type.name == device_type.name and s.key]
        if not keys:
            errors = sorted({s.error for s in self.slots if s.device_type.name == device_type.name and s.error})
            raise DeviceError(f"no replica of {device_type.name} can measure ({'; '.join(errors) or 'none started'}); "
                              "check the node with `fleetprune fleet` and restart the service")
        return keys[0]

    # ---- jobs ----------------------------------------------------------------------------------

    @_answer
    async def submit(self, spec: JobSpec) -> dict[str, Any]:
        """Admit a job (``{"id", "state", ...}``); a full queue is refused with a retry hint."""
        await self.start()
        job = Job(new_job_id(), spec)
        await self._admit(job, limit=True, record=True)
        return job.status()

    async def _admit(self, job: Job, *, limit: bool, record: bool) -> None:
        spec = job.spec
        threads = {t.threads for t in self.fleet.types if t.kind == "cpu"}
        if spec.threads is not None and threads and threads != {spec.threads}:
            raise RequestError(f"this service measures CPUs with {sorted(threads)} thread(s), not {spec.threads}; "
                               "leave 'threads' out or start the service with --threads")
        extra = {t.name: self.spec.fake_key(t.name) for t in self.fleet.types} if self.spec.is_fake else None
        chosen = select_types(self.fleet, spec.devices, extra_keys=extra)
        wanted: list[tuple[str, DeviceType, list[LayerConfig]]] = []
        for device_type in chosen:
            configs = list(spec.configs) if spec.configs else await self._plan(spec, device_type.kind)
            wanted.append((self._key_of(device_type), device_type, configs))
        measured = {key: await asyncio.to_thread(self.store.measured_keys, key, self.spec.statistic)
                    for key, _, _ in wanted}
        if limit:
            queued = sum(len(q) for q in self.queues.values())
            new = sum(len({c.key for c in cs} - measured[k] - set(self.queues[k].queued)) for k, _, cs in wanted)
            if new > self.queue_limit:
                raise RequestError(f"this job alone adds {new} configurations to the queue, more than its limit of "
                                   f"{self.queue_limit}; split it (fewer devices or models) or start the service "
                                   "with a larger --queue-limit")
            if new and queued + new > self.queue_limit:
                raise QueueFullError(
                    f"the service's queue is full ({queued} configurations waiting, this job adds {new}, the limit is "
                    f"{self.queue_limit}); retry after the hinted seconds", self._retry_after(queued))
        self.jobs[job.id] = job
        if record:
            self.journal.append({"op": "submit", "id": job.id, "at": job.submitted_at, "job": spec.to_dict()})
        for key, device_type, configs in wanted:
            needed = {c.key for c in configs}
            job.devices[key] = DeviceProgress(key, device_type.name, needed, done=needed & measured[key])
            self.queues[key].add(job.id, configs, measured[key], seed=self.seed)
        log.info("job %s: %s", job.id, spec.describe())
        if job.check_complete():
            self._record_end(job)
        self._pump()

    async def _plan(self, spec: JobSpec, kind: str) -> list[LayerConfig]:
        if self.planner is None:
            raise RequestError("this service cannot plan models; send explicit 'configs'")
        return list(await asyncio.to_thread(self.planner, spec.to_dict(), kind))

    def _retry_after(self, queued: int) -> int:
        elapsed = time.monotonic() - self.started_at
        rate = self.measured / elapsed if self.measured and elapsed > 0 else 0.0
        return int(min(600, max(1, queued / rate if rate else 30)))

    @_answer
    async def status(self, job_id: str) -> dict[str, Any]:
        """One job's status."""
        await self.start()
        return self._job(job_id).status()

    @_answer
    async def list_jobs(self) -> dict[str, Any]:
        """Every job the service knows (newest last)."""
        await self.start()
        return {"jobs": [j.status() for j in self.jobs.values()]}

    @_answer
    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: nothing more is measured for it alone; rows already written stay."""
        await self.start()
        job = self._job(job_id)
        if not job.final:
            for key in job.devices:
                self.queues[key].cancel(job.id)
            job.finish("cancelled", "cancelled; what was measured is kept")
            self.journal.append({"op": "cancel", "id": job.id, "at": now_iso()})
            self._record_end(job)
        return job.status()

    def _job(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise NotFoundError(f"no job {job_id!r} on this service; list them with GET /v1/jobs")
        return self.jobs[job_id]

    def _record_end(self, job: Job) -> None:
        self.journal.append({"op": "end", "id": job.id, "at": job.finished_at, "state": job.state,
                             "message": job.message, "status": {"devices": job.status()["devices"]}})

    # ---- dispatch ------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Give every idle replica its next piece of work: a network to measure first, else a chunk."""
        if self.stopping:  # shutting down: what is in flight finishes and is written, nothing new starts
            return
        for slot in self.slots:
            if slot.state != "idle":
                continue
            waiting = self.urgent.get(slot.device_type.name)
            if waiting:
                self._spawn(self._run_network(slot, *waiting.popleft()))
                continue
            queue = self.queues.get(slot.key or "")
            chunk = queue.take() if queue is not None else None
            if chunk is not None:
                for c in chunk.configs:
                    for job_id in queue.waiters.get(c.key, ()):
                        self.jobs[job_id].mark_running()
                self._spawn(self._run_chunk(slot, queue, chunk))

    def _spawn(self, coro) -> None:  # noqa: ANN001
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_chunk(self, slot: Slot, queue: DeviceQueue, chunk) -> None:  # noqa: ANN001
        slot.state = "busy"
        try:
            result = await slot.handle.measure.remote(chunk, self.seed)
        except Exception as exc:  # noqa: BLE001 - a dead replica, or one that cannot measure
            reason = f"replica {slot.name} (pid {slot.pid}) failed: {_first_line(exc)}"
            log.warning("%s: %s; chunk %d goes back to the queue", queue.device_key, reason, chunk.index)
            self._apply(queue, {}, queue.lost(chunk, reason, self.max_retries))
            slot.state = "recovering"
            self._spawn(self._recover(slot))
            self._pump()
            return
        slot.state = "idle"
        self._pump()  # the next chunk first, so the replica does not wait for our write
        if result.rows:
            await asyncio.to_thread(self.store.write, queue.device_key, result.rows, slot.provenance)
            self.versions[queue.device_key] = self.versions.get(queue.device_key, 0) + 1
        slot.chunks += 1
        slot.rows += len(result.rows)
        self.measured += len(result.rows)
        self._apply(queue, *queue.returned(chunk, result))
        self._pump()

    def _apply(self, queue: DeviceQueue, done: dict[str, set[str]], failed: dict[str, dict[str, str]]) -> None:
        for job_id in set(done) | set(failed):
            job = self.jobs.get(job_id)
            progress = job.devices.get(queue.device_key) if job else None
            if progress is None:
                continue
            new = done.get(job_id, set()) - progress.done
            progress.done |= new
            progress.measured_here += len(new)
            progress.failed.update(failed.get(job_id, {}))
            if job.check_complete():
                self._record_end(job)

    async def _recover(self, slot: Slot) -> None:
        """Wait for Serve to replace a dead replica, then hand it work again."""
        deadline = time.monotonic() + RECOVER_LIMIT_S
        while time.monotonic() < deadline and not self.stopping:
            await asyncio.sleep(RECOVER_POLL_S)
            info = await self._info(slot)
            if not info.get("error") and info.get("device_key"):
                slot.restarts += 1
                self._take_info(slot, info)
                self._pump()
                return
        slot.state, slot.error = "broken", f"not replaced within {RECOVER_LIMIT_S:g} s"

    # ---- networks, devices, versions -----------------------------------------------------------

    @_answer
    async def measure_network(self, request: dict[str, Any]) -> dict[str, Any]:
        """Measure a whole network on a replica of the requested type (ahead of queued chunks)."""
        await self.start()
        extra = {t.name: self.spec.fake_key(t.name) for t in self.fleet.types} if self.spec.is_fake else None
        chosen = select_types(self.fleet, request["device"], extra_keys=extra)
        if len(chosen) != 1:
            raise RequestError(f"'device' must name one device type, not {len(chosen)}: {request['device']!r}")
        self._key_of(chosen[0])
        future = asyncio.get_running_loop().create_future()
        self.urgent.setdefault(chosen[0].name, deque()).append((request, future))
        self._pump()
        return await future

    async def _run_network(self, slot: Slot, request: dict[str, Any], future: asyncio.Future) -> None:
        slot.state = "busy"
        try:
            result = await slot.handle.measure_network.remote(request)
        except FleetpruneError as exc:
            future.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - the cause, when it is a user error, else the failure
            cause = getattr(exc, "cause", None)
            future.set_exception(cause if isinstance(cause, FleetpruneError)
                                 else RequestError(f"measuring on {slot.name} failed: {_first_line(exc)}"))
        else:
            future.set_result(result)
        slot.state = "idle"
        self._pump()

    @_answer
    async def devices(self) -> dict[str, Any]:
        """The fleet: device types, their nodes and replicas, queue lengths and table summaries."""
        await self.start()
        summaries = {d.device_key: d for d in await asyncio.to_thread(self.store.devices)}
        types = []
        for t in self.fleet.types:
            slots = [s for s in self.slots if s.device_type.name == t.name]
            key = next((s.key for s in slots if s.key), self.spec.table_key(t.name, t.key))
            summary = summaries.get(key or "")
            types.append({
                "name": t.name, "kind": t.kind, "label": t.label, "device_key": key, "threads": t.threads,
                "nodes": [{"node_id": n.node_id, "address": n.address, "cpus": n.cpus, "gpus": n.gpus} for n in t.nodes],
                "replicas": [s.to_dict() for s in slots], "queued": len(self.queues[key]) if key in self.queues else 0,
                "retried_chunks": self.queues[key].ledger.run.retried_chunks if key in self.queues else 0,
                "table": None if summary is None else {"rows": summary.rows, "files": summary.files,
                                                       "last_measured": str(summary.last_measured or "")},
            })
        return {"tables": self.store.root, "backend": self.spec.describe(), "types": types,
                "unusable": [{"node_id": n.node_id, "reason": why} for n, why in self.fleet.unusable],
                "tables_only": sorted(set(summaries) - {t["device_key"] for t in types})}

    async def table_versions(self) -> dict[str, Any]:
        """Per table key a counter bumped on every write (readers cache tables by it), and the aliases."""
        aliases = {}
        for s in self.slots:
            if s.key:
                aliases[s.device_type.name.lower()] = s.key
                aliases[s.key.lower()] = s.key
        return {"boot": self.boot, "versions": dict(self.versions), "aliases": aliases}

    async def stop(self) -> dict[str, Any]:
        """Stop handing out work and ask the process that runs the service to shut it down."""
        self.stopping = True
        return {"stopping": True}

    async def is_stopping(self) -> bool:
        return self.stopping


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


__all__ = ["Coordinator", "Planner", "Slot"]
