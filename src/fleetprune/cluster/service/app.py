"""Starting and stopping the service on the connected Ray cluster with Ray Serve.

The application is one Serve deployment per profiling replica (each pinned to its node as the
fleet pins its actors, :func:`~fleetprune.cluster.service.replica.replica_options`), one
coordinator and one HTTP ingress. The HTTP proxy runs on the head node only and listens on
loopback unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from fleetprune.cluster.devices import Fleet, select_types
from fleetprune.cluster.discover import discover
from fleetprune.cluster.service.coordinator import Coordinator, Planner
from fleetprune.cluster.service.jobs import JOURNAL_DIR, now_iso
from fleetprune.cluster.service.replica import NetworkBuilder, ProfilerReplica, replica_options
from fleetprune.cluster.spec import BackendSpec
from fleetprune.errors import DeviceError

log = logging.getLogger(__name__)

APP_NAME = "fleetprune"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
QUEUE_LIMIT = 100_000
STATE_FILE = "service.json"


@dataclass(frozen=True)
class ServiceInfo:
    """A running service: where it answers and what it serves.

    Attributes:
        url: the base URL (``http://HOST:PORT``).
        tables: the table root.
        pid: the process that started it (and shuts it down).
        replicas: profiling replicas started.
        started_at: when it came up (UTC, ISO 8601).
        startup_s: seconds from the call to a ready service.
    """

    url: str
    tables: str
    pid: int
    replicas: int
    started_at: str
    startup_s: float


def start_service(
    root: str,
    *,
    token_sha256: str | None,
    devices: str = "all",
    threads: int | None = None,
    backend: BackendSpec | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    planner: Planner | None = None,
    predictor: Callable[[Any, dict], dict] | None = None,
    build_network: NetworkBuilder | None = None,
    queue_limit: int = QUEUE_LIMIT,
    max_retries: int = 2,
    chunk_size: int | None = None,
    seed: int = 0,
    fleet: Fleet | None = None,
    ready_timeout_s: float = 300.0,
) -> ServiceInfo:
    """Deploy the service on the connected cluster and wait until every replica reports its device.

    Args:
        root: the table root it measures into and reads from (its journal is ``ROOT/_service/``).
        token_sha256: digest of the bearer token writes need (:func:`ingress.token_digest`).
        devices: device types to serve (``all``, names, table keys, ``cpu``/``gpu``).
        threads: threads per CPU node (default: all of a node's CPUs).
        backend: how to time (default: the real backend with the default protocol).
        host, port: where the HTTP proxy listens (loopback by default).
        planner, predictor, build_network: the api's injected functions (models and the pruner).
        queue_limit: configurations waiting across devices before a job is refused with 429.
        max_retries: how often the chunk of a dead replica is handed to another.
        chunk_size: configurations per chunk (default: automatic).
        seed: shuffles the measuring order.
        fleet: an already discovered fleet.
        ready_timeout_s: how long to wait for the replicas.

    Raises:
        DeviceError: no usable device, an unknown device type, Serve would not start, or no
            replica could measure.
    """
    from ray import serve

    from fleetprune.cluster.service.ingress import Ingress
    from fleetprune.profiler.device import slugify

    started = time.perf_counter()
    spec = backend or BackendSpec.torch()
    fleet = fleet or discover(threads=threads, probe_gpus=not spec.is_fake)
    extra = {t.name: spec.fake_key(t.name) for t in fleet.types} if spec.is_fake else None
    fleet = Fleet(tuple(select_types(fleet, devices, extra_keys=extra)), fleet.unusable, fleet.address)
    try:
        serve.start(http_options={"host": host, "port": int(port)}, proxy_location="HeadOnly")
    except Exception as exc:  # noqa: BLE001 - Serve's own start-up errors, one piece of advice
        raise DeviceError(f"could not start Ray Serve on {host}:{port} ({type(exc).__name__}: {exc}); "
                          "choose another --port or stop the other service") from exc
    replicas = []
    for t in fleet.types:
        for node in t.nodes:
            for i in range(node.gpus if t.kind == "cuda" else 1):
                name = f"profiler-{slugify(t.name)}-{node.short_id}-{i}"
                bound = serve.deployment(ProfilerReplica).options(
                    name=name, num_replicas=1, max_ongoing_requests=1, ray_actor_options=replica_options(t, node),
                ).bind(spec, t, build_network)
                replicas.append({"name": name, "handle": bound, "type": t, "node_id": node.node_id})
    coordinator = serve.deployment(Coordinator).options(
        name="coordinator", num_replicas=1, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0},
    ).bind(root, fleet, spec, replicas, planner, queue_limit=queue_limit, max_retries=max_retries,
           chunk_size=chunk_size, seed=seed)
    ingress = serve.deployment(Ingress).options(
        name="ingress", num_replicas=1, max_ongoing_requests=1_000, ray_actor_options={"num_cpus": 0},
    ).bind(coordinator, root, token_sha256, predictor)
    log.info("deploying %d profiling replicas on %s", len(replicas), ", ".join(fleet.names()))
    try:
        serve.run(ingress, name=APP_NAME, route_prefix="/")
        answer = coordinator_handle().start.remote().result(timeout_s=ready_timeout_s)
    except Exception as exc:  # noqa: BLE001 - the deployment did not come up
        stop_service()
        raise DeviceError(f"the service did not start ({type(exc).__name__}: {_last_line(exc)}); check "
                          "`fleetprune fleet` and the Ray logs") from exc
    broken = [r for r in answer["replicas"] if r["state"] == "broken"]
    if len(broken) == len(answer["replicas"]):
        stop_service()
        raise DeviceError("no profiling replica can measure: " + "; ".join(f"{r['name']}: {r['error']}" for r in broken)
                          + "; time with the backend their hardware supports")
    info = ServiceInfo(url=f"http://{host if ':' not in host else f'[{host}]'}:{port}", tables=root, pid=os.getpid(),
                       replicas=len(replicas), started_at=now_iso(), startup_s=time.perf_counter() - started)
    _write_state(root, info)
    log.info("service ready at %s after %.1f s", info.url, info.startup_s)
    return info


def coordinator_handle() -> Any:
    """The coordinator of the running service (from a driver connected to its cluster)."""
    from ray import serve

    return serve.get_deployment_handle("coordinator", app_name=APP_NAME)


def wait_until_stopped(poll_s: float = 1.0, should_stop: Callable[[], bool] | None = None) -> None:
    """Block until someone asks the service to stop (``POST /v1/shutdown``) or ``should_stop()`` says so."""
    handle = coordinator_handle()
    while not (should_stop and should_stop()):
        if handle.is_stopping.remote().result(timeout_s=60):
            return
        time.sleep(poll_s)


def stop_service(root: str | None = None) -> None:
    """Stop handing out work, then shut Serve down (replicas drain: chunks in flight are written first)."""
    from ray import serve

    try:
        coordinator_handle().stop.remote().result(timeout_s=30)
    except Exception as exc:  # noqa: BLE001 - not deployed, or already gone
        log.debug("coordinator stop: %s", exc)
    try:
        serve.shutdown()
    except Exception as exc:  # noqa: BLE001 - already gone
        log.warning("serve shutdown: %s", exc)
    if root is not None:
        path = _state_path(root)
        if path and os.path.exists(path):
            os.remove(path)


def _state_path(root: str) -> str | None:
    if "://" in root and not root.startswith("file://"):
        return None
    local = root[len("file://"):] if root.startswith("file://") else root
    return os.path.join(local, JOURNAL_DIR, STATE_FILE)


def _write_state(root: str, info: ServiceInfo) -> None:
    """``ROOT/_service/service.json``: where the service answers, so ``serve --stop --tables ROOT`` finds it."""
    path = _state_path(root)
    if path is None:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(info), f)
    os.replace(tmp, path)


def read_state(root: str) -> dict[str, Any] | None:
    """The state file a running service left in ``root``, if any."""
    path = _state_path(root)
    try:
        with open(path or "", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


__all__ = ["APP_NAME", "DEFAULT_HOST", "DEFAULT_PORT", "ServiceInfo", "coordinator_handle", "read_state",
           "start_service", "stop_service", "wait_until_stopped"]
