"""Profiling a fleet: spread each device type's configurations over its actors, stream rows to the tables.

The driver holds one queue of chunks per device type (table key) and hands the next chunk to
whichever actor of that type returns one, so a type with two nodes finishes in about half the
time. Every returned chunk is written at once as one atomic part file, so a dead actor or driver
loses only the chunks in flight, and a rerun resumes from the table. The chunk of an actor that
died goes to another actor of its type (a bounded number of times); when no actor of a type is
left, its remaining chunks are reported as failed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from fleetprune.cluster.actors import ActorHandle, spawn
from fleetprune.cluster.devices import DeviceType, Fleet, select_types
from fleetprune.cluster.discover import discover
from fleetprune.cluster.spec import BackendSpec
from fleetprune.cluster.summary import ActorRecord, DeviceRun, Failure, ProgressCallback, RunSummary
from fleetprune.cluster.work import Chunk, ConfigSource, Ledger, open_ledger, refuse_fp16_on_cpu, todo_configs
from fleetprune.errors import DeviceError
from fleetprune.tables.config import LayerConfig
from fleetprune.tables.store import TableStore

log = logging.getLogger(__name__)

MAX_RETRIES = 2
STARTUP_TIMEOUT_S = 300.0
START_GRACE_S = 30.0
_POLL_S = 0.5


def as_source(configs: Sequence[LayerConfig] | ConfigSource) -> ConfigSource:
    """A fixed list of configurations as a :data:`ConfigSource` (the same for every device kind)."""
    if callable(configs):
        return configs
    fixed = list(configs)
    return lambda _kind: fixed


@dataclass
class _Live:
    """An actor during the run."""

    spawned: ActorHandle
    record: ActorRecord
    started_at: float
    state: str = "starting"  # starting | waiting (for its siblings) | idle | busy | dead
    ledger: Ledger | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def type_name(self) -> str:
        return self.spawned.device_type.name


def profile_fleet(
    configs: Sequence[LayerConfig] | ConfigSource,
    store: TableStore | str,
    *,
    devices: str | Sequence[str] | None = "all",
    threads: int | None = None,
    backend: BackendSpec | None = None,
    chunk_size: int | None = None,
    max_retries: int = MAX_RETRIES,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    start_grace_s: float = START_GRACE_S,
    fleet: Fleet | None = None,
    address: str | None = None,
) -> RunSummary:
    """Measure ``configs`` on every chosen device type of the connected Ray cluster into ``store``.

    Ray must be connected (:func:`fleetprune.cluster.connect`). Configurations the table of a
    device already holds are skipped; a type whose table is complete starts no actor, when its
    table key is known beforehand (CPU types, fake backends, probed GPU types).

    Args:
        configs: the configurations, or a function of the device kind (``cpu``/``cuda``) giving them.
        store: the table root.
        devices: ``all``, or type names / table keys / ``cpu`` / ``gpu`` (comma-separated or a list).
        threads: threads per CPU node (default: the node's CPU count).
        backend: what the actors time with (default: the real torch backend, default protocol).
        chunk_size: configurations per chunk (default: about 4 chunks per actor, at most 32).
        max_retries: how often a chunk whose actor died is handed to another actor.
        seed: shuffles the configurations (chunk ``i`` is measured with ``seed + i``).
        progress: called with a :class:`~fleetprune.cluster.summary.ProgressEvent` per chunk.
        startup_timeout_s: an actor not ready by then is given up.
        start_grace_s: a type's ready actors wait this long for its other actors before starting.
        fleet: an already discovered fleet (default: discover it now).
        address: how the summary and messages name the cluster (default: its GCS address).

    Returns:
        The summary; failures are in it, not raised.

    Raises:
        DeviceError: an unknown device type, no usable device, or no actor could start at all.
        ProfileError: fp16 asked of a CPU type (before any actor starts).
        TableError: the table root cannot be read or written.
    """
    import ray

    started = time.perf_counter()
    spec = backend or BackendSpec.torch()
    store = store if isinstance(store, TableStore) else TableStore(store)
    source = as_source(configs)
    if address is None:
        address = ray.get_runtime_context().gcs_address
    if fleet is None:
        fleet = discover(threads=threads, probe_gpus=not spec.is_fake, address=None if address == "local" else address)
    extra = {t.name: spec.fake_key(t.name) for t in fleet.types} if spec.is_fake else None
    chosen = select_types(fleet, devices, extra_keys=extra)
    refuse_fp16_on_cpu(chosen, source)
    run = _FleetRun(store, source, spec, chunk_size, max_retries, seed, progress, startup_timeout_s, start_grace_s)
    try:
        for device_type in chosen:
            run.plan(device_type)
        run.loop()
    finally:
        run.release()
    summary = RunSummary(
        tables=store.root,
        address=address,
        devices=run.results(chosen),
        seconds=time.perf_counter() - started,
        startup_s=(run.first_ready or time.perf_counter()) - started,
    )
    spawned = {l.type_name for l in run.lives}
    if spawned and spawned == {t.name for t in chosen} and not run.started_types:
        problems = "; ".join(
            f"{l.type_name} on node {l.spawned.node.short_id}: {l.record.error}" for l in run.lives if l.record.error
        )
        raise DeviceError(
            f"no usable device: no measuring actor could start ({problems}); check the nodes with "
            "`fleetprune fleet`, or time with the backend their hardware supports"
        )
    return summary


class _FleetRun:
    """The state of one run: ledgers per table key, live actors, refs in flight."""

    def __init__(self, store: TableStore, source: ConfigSource, spec: BackendSpec, chunk_size: int | None,
                 max_retries: int, seed: int, progress: ProgressCallback | None, startup_timeout_s: float,
                 start_grace_s: float):
        self.store = store
        self.source = source
        self.spec = spec
        self.chunk_size = chunk_size
        self.max_retries = max_retries
        self.seed = seed
        self.progress = progress
        self.startup_timeout_s = startup_timeout_s
        self.start_grace_s = start_grace_s
        self.ledgers: dict[str, Ledger] = {}
        self.type_of: dict[str, DeviceType] = {}
        self.lives: list[_Live] = []
        self.refs: dict[Any, tuple[_Live, Chunk | None]] = {}
        self.ready_types: set[str] = set()
        self.dead_types: dict[str, DeviceRun] = {}
        self.started_types: set[str] = set()
        self.type_ready_at: dict[str, float] = {}
        self.first_ready: float | None = None

    # ---- set-up ------------------------------------------------------------------------------

    def plan(self, device_type: DeviceType) -> None:
        """Open the ledger of a type whose table key is known; start its actors if work is left."""
        self.type_of[device_type.name] = device_type
        key = self.spec.table_key(device_type.name, device_type.key)
        if key is not None:
            ledger = self.open_ledger(key, device_type, device_type.kind, device_type.label, device_type.slots)
            if ledger.finished:
                log.info("%s: all %d configurations are already in the table", key, ledger.run.total)
                return
        now = time.perf_counter()
        for spawned in spawn(device_type, self.spec):
            live = _Live(spawned, ActorRecord(node_id=spawned.node.node_id), started_at=now)
            self.lives.append(live)
            self.refs[spawned.handle.start.remote()] = (live, None)

    def open_ledger(self, key: str, device_type: DeviceType, kind: str, label: str, workers: int) -> Ledger:
        """The ledger of table key ``key`` (created with the configurations still to measure)."""
        if key not in self.ledgers:
            self.ledgers[key] = open_ledger(
                self.store, list(self.source(kind)), key=key, device_type=device_type.name, kind=kind,
                label=label or device_type.label, workers=workers, chunk_size=self.chunk_size, seed=self.seed,
                progress=self.progress, statistic=self.spec.statistic,
            )
        return self.ledgers[key]

    # ---- the loop ----------------------------------------------------------------------------

    def loop(self) -> None:
        """Hand out chunks and write results until every ledger is finished."""
        import ray

        while True:
            self.open_barriers()
            if self.done():
                break
            if not self.refs:
                for ledger in self.ledgers.values():
                    ledger.fail_pending("no measuring actor is left")
                break
            ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=_POLL_S)
            for ref in ready:
                live, chunk = self.refs.pop(ref)
                if chunk is None:
                    self.on_started(live, ref)
                else:
                    self.on_chunk(live, chunk, ref)
            self.check_startup()

    def done(self) -> bool:
        if any(not ledger.finished for ledger in self.ledgers.values()):
            return False
        # A type none of whose actors has answered yet may still open a ledger.
        return not any(l.state == "starting" and l.type_name not in self.ready_types for l in self.lives)

    def on_started(self, live: _Live, ref: Any) -> None:
        import ray

        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self.gone(live, f"failed to start: {_first_line(exc)}", starting=True)
            return
        live.record.pid = info.get("pid")
        live.record.node_id = info.get("node_id") or live.record.node_id
        if info.get("error"):
            self.gone(live, info["error"], starting=True)
            return
        device = info["device"]
        self.ready_types.add(live.type_name)
        self.first_ready = self.first_ready or time.perf_counter()
        live.provenance = info["provenance"]
        self.drop_unserved(live.type_name, device.key)
        workers = sum(1 for l in self.lives if l.type_name == live.type_name)
        live.ledger = self.open_ledger(device.key, live.spawned.device_type, device.kind, device.name, workers)
        if live.ledger.provenance is None:
            live.ledger.provenance = live.provenance
        live.record.state = "running"
        self.started_types.add(live.type_name)
        log.debug("actor pid %s on node %s measures %s", live.record.pid, live.record.node_id[:8], device.key)
        self.type_ready_at.setdefault(live.type_name, time.perf_counter())
        live.state = "waiting"

    def drop_unserved(self, type_name: str, key: str) -> None:
        """Forget a ledger opened under a probed key that the type's actors do not measure as."""
        for other, ledger in list(self.ledgers.items()):
            served = any(l.ledger is ledger for l in self.lives)
            if ledger.run.device_type == type_name and other != key and not served and ledger.in_flight == 0:
                log.warning("%s: its actors measure as %s, not %s as probed; using %s", type_name, key, other, key)
                self.ledgers.pop(other).close()

    def open_barriers(self) -> None:
        """Start the ready actors of every type whose actors are all up (or whose start grace is over).

        Handing out work only then keeps the split fair: the first process to finish importing
        torch does not eat a short queue before its siblings are up.
        """
        now = time.perf_counter()
        for live in self.lives:
            if live.state != "waiting":
                continue
            name = live.type_name
            starting = any(l.type_name == name and l.state == "starting" for l in self.lives)
            if not starting or now - self.type_ready_at[name] >= self.start_grace_s:
                self.dispatch(live)

    def on_chunk(self, live: _Live, chunk: Chunk, ref: Any) -> None:
        import ray

        ledger = live.ledger
        assert ledger is not None
        try:
            result = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError,
                ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError) as exc:
            reason = f"actor on node {live.record.node_id[:8]} died: {_first_line(exc)}"
            log.warning("%s: %s; chunk %d goes back to the queue", ledger.run.device_key, reason, chunk.index)
            ledger.lost(chunk, reason, self.max_retries)
            self.gone(live, reason)
            self.wake(ledger)
            return
        except ray.exceptions.RayError as exc:
            reason = f"chunk failed on node {live.record.node_id[:8]}: {_first_line(exc)}"
            log.warning("%s: %s", ledger.run.device_key, reason)
            ledger.lost(chunk, reason, self.max_retries)
            self.dispatch(live)
            self.wake(ledger)
            return
        self.dispatch(live)  # the next chunk first, so the actor does not wait for our write
        if result.rows:
            self.store.write(ledger.run.device_key, result.rows, live.provenance or ledger.provenance or {})
        ledger.returned(chunk, result, live.record)

    def dispatch(self, live: _Live) -> None:
        """Give ``live`` its next chunk, or mark it idle."""
        chunk = live.ledger.take() if live.ledger is not None else None
        if chunk is None:
            live.state = "idle"
            return
        live.state = "busy"
        self.refs[live.spawned.handle.measure.remote(chunk, self.seed)] = (live, chunk)

    def wake(self, ledger: Ledger) -> None:
        """Hand requeued chunks to idle actors of ``ledger``."""
        for live in self.lives:
            if not ledger.pending:
                return
            if live.ledger is ledger and live.state == "idle":
                self.dispatch(live)

    def gone(self, live: _Live, reason: str, *, starting: bool = False) -> None:
        """An actor is dead or unusable: fail its type's remaining work if no actor of it is left."""
        import ray

        live.state = "dead"
        live.record.state = "failed to start" if starting else "died"
        live.record.error = reason
        try:
            ray.kill(live.spawned.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass
        name = live.type_name
        if any(l.type_name == name and l.state != "dead" for l in self.lives):
            return
        errors = sorted({l.record.error for l in self.lives if l.type_name == name and l.record.error})
        why = f"no actor of {name} is left ({'; '.join(errors)}); rerun to resume"
        ledgers = [lg for lg in self.ledgers.values() if lg.run.device_type == name]
        for lg in ledgers:
            lg.fail_pending(why)
        if not ledgers:
            self.ready_types.add(name)
            self.dead_types[name] = self._failed_type(self.type_of[name], why)

    def check_startup(self) -> None:
        """Give up actors that did not start within the start-up timeout."""
        now = time.perf_counter()
        for live in self.lives:
            if live.state == "starting" and now - live.started_at > self.startup_timeout_s:
                for ref, (l, _) in list(self.refs.items()):
                    if l is live:
                        del self.refs[ref]
                self.gone(live, f"did not start within {self.startup_timeout_s:g} s (node busy or gone?)", starting=True)

    def _failed_type(self, device_type: DeviceType, why: str) -> DeviceRun:
        configs = todo_configs(list(self.source(device_type.kind)), set())
        run = DeviceRun(device_key=self.spec.table_key(device_type.name, device_type.key) or "-",
                        device_type=device_type.name, kind=device_type.kind, label=device_type.label,
                        total=len(configs), failures=[Failure(tuple(c.key for c in configs), why)])
        return run

    # ---- the end -----------------------------------------------------------------------------

    def release(self) -> None:
        """Kill every actor of the run (they hold GPUs and cores) and free the tables' profile locks."""
        import ray

        for ledger in self.ledgers.values():
            ledger.close()
        for live in self.lives:
            if live.state != "dead":
                if live.record.state == "running":
                    live.record.state = "finished"
                elif live.record.state == "starting":
                    live.record.state = "not needed"
                try:
                    ray.kill(live.spawned.handle, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
                live.state = "dead"

    def results(self, chosen: list[DeviceType]) -> list[DeviceRun]:
        """Summary entries in fleet order, each with the records of its actors."""
        out = []
        for t in chosen:
            runs = [lg.run for lg in self.ledgers.values() if lg.run.device_type == t.name]
            if t.name in self.dead_types:
                runs.append(self.dead_types[t.name])
            for run in runs:
                mine = [l.record for l in self.lives if l.ledger is not None and l.ledger.run is run]
                # Actors that never started belong to no ledger: list them with the type's first.
                if run is runs[0]:
                    mine += [l.record for l in self.lives if l.type_name == t.name and l.ledger is None]
                run.actors = mine
            out.extend(runs)
        return out


def _first_line(exc: BaseException) -> str:
    """The informative line of a Ray error (its last non-empty line)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
