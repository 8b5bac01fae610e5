"""The ``serve`` verb and the calls that speak to a running service, for Python users and the CLI.

The service (``fleetprune.cluster.service``) knows no models and no pruner; the three functions
under "hooks" are what it is handed for that: planning a model's configurations, building a pruned
network from widths, and predicting a width plan's latency from a table. They are the only calls
here into ``pruner`` and ``models``, so a change there is re-pointed in one place.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from typing import Any, Callable, Mapping

from fleetprune.client import ServiceClient, ServiceError
from fleetprune.errors import FleetpruneError, ModelError

log = logging.getLogger(__name__)

# ---- hooks: the service's only way to models and the pruner (pickled by reference into Ray) ------------


def _default_dtype(kind: str) -> str:
    return "fp32" if kind == "cpu" else "fp16"  # as `fleetprune profile` defaults


def plan_job(job: Mapping[str, Any], kind: str) -> list:
    """Every configuration a model-based job needs on a device of ``kind`` (its plan's configurations)."""
    _, plan, _ = _dense(job["model"], job.get("num_classes"), _size(job.get("input_size")), job.get("batch") or 1,
                        job.get("dtype") or _default_dtype(kind), job.get("memory_format") or "nhwc",
                        job.get("round_to"), job.get("max_choices") or 32)
    return plan.configs()


@functools.lru_cache(maxsize=16)
def _dense(model: str, num_classes: int | None, input_size: tuple[int, int] | None, batch: int, dtype: str,
           memory_format: str, round_to: int | None, max_choices: int) -> tuple[Any, Any, tuple[int, ...]]:
    """A dense model, its plan and the full input shape (cached: callers copy the model before changing it)."""
    import torch

    from fleetprune import models
    from fleetprune.pruner.plan import build_plan

    channels, h, w = models.input_shape(model)
    shape = (batch, channels, *(input_size or (h, w)))
    net = models.create(model, **({} if num_classes is None else {"num_classes": num_classes})).eval()
    plan = build_plan(net, torch.randn(*shape), round_to=round_to or (16 if dtype == "fp32" else 8),
                      max_choices=max_choices, dtype=dtype, memory_format=memory_format)
    return net, plan, shape


def _check_widths(plan: Any, widths: Mapping[str, int]) -> None:
    unknown = sorted(set(widths) - {g.name for g in plan.groups})
    if unknown:
        names = ", ".join(g.name for g in plan.prunable_groups())
        raise ModelError(f"widths name unknown channel groups {unknown}; the model's prunable groups are: {names}")


def build_network(request: Mapping[str, Any], kind: str) -> tuple[Any, tuple[int, ...], str, str]:
    """``(module, input shape, dtype, memory format)`` of ``request['model']`` cut to ``request['widths']``."""
    import copy

    import torch

    from fleetprune.pruner.export import shrink_to_widths

    dtype = request.get("dtype") or _default_dtype(kind)
    fmt = request.get("memory_format") or "nhwc"
    net, plan, shape = _dense(request["model"], request.get("num_classes"), _size(request.get("input_size")),
                              request.get("batch") or 1, dtype, fmt, request.get("round_to"),
                              request.get("max_choices") or 32)
    net = copy.deepcopy(net)
    widths = dict(request.get("widths") or {})
    _check_widths(plan, widths)
    if widths:
        shrink_to_widths(net, plan, widths, torch.randn(*shape))
    return net.eval(), shape, dtype, fmt


def predict(table: Any, request: Mapping[str, Any]) -> dict[str, Any]:
    """Predicted latency (the table's layer sum, as ``prune`` uses for a remote device) of a width plan."""
    from fleetprune.pruner.latency import LatencyModel

    model = request["model"]
    batch, dtype, fmt = _table_setting(table, request)
    _, plan, _ = _dense(model, request.get("num_classes"), _size(request.get("input_size")), batch, dtype, fmt,
                        request.get("round_to"), request.get("max_choices") or 32)
    widths = dict(request.get("widths") or {})
    _check_widths(plan, widths)
    lm = LatencyModel(plan, table)
    return {"device_key": table.device_key, "model": model, "batch": batch, "dtype": dtype, "memory_format": fmt,
            "predicted_ms": lm.predict(widths), "dense_ms": lm.dense_ms(), "widths": lm.full_widths(widths),
            "source": "table rows only (layer sum)"}


def _table_setting(table: Any, request: Mapping[str, Any]) -> tuple[int, str, str]:
    """The (batch, dtype, memory format) asked for, among those the table holds; the only one if none is asked."""
    frame = table.frame
    have = sorted({(int(b), str(d), str(f)) for b, d, f in
                   frame[["batch", "dtype", "memory_format"]].drop_duplicates().itertuples(index=False)})
    asked = (request.get("batch"), request.get("dtype"), request.get("memory_format"))
    fits = [s for s in have if all(a is None or a == v for a, v in zip(asked, s))]
    listed = ", ".join(f"batch {b} {d} {f}" for b, d, f in have) or "no rows"
    if len(fits) != 1:
        from fleetprune.errors import TableError

        why = "has no rows for what was asked" if not fits else "holds several settings"
        raise TableError(f"the table of {table.device_key} {why} (it has: {listed}); say which with 'batch', "
                         f"'dtype' and 'memory_format', or profile the model at that setting first")
    return fits[0]


def _size(value: Any) -> tuple[int, int] | None:
    return None if value is None else (int(value[0]), int(value[-1]))


# ---- the verb --------------------------------------------------------------------------------------------


def resolve_token(token_file: str | None = None) -> str | None:
    """The bearer token: the file's first line if given, else ``$FLEETPRUNE_TOKEN`` (None if neither)."""
    from fleetprune.client import TOKEN_ENV

    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as exc:
            raise FleetpruneError(f"cannot read the token file {token_file}: {exc.strerror or exc}") from None
        if not token:
            raise FleetpruneError(f"the token file {token_file} is empty; put the token on its first line")
        return token
    return os.environ.get(TOKEN_ENV) or None


def serve(tables: str = "tables", *, token: str | None, ray_address: str = "local", host: str = "127.0.0.1",
          port: int = 8000, devices: str = "all", threads: int | None = None, backend: Any = None,
          queue_limit: int = 100_000, chunk_size: int | None = None, max_retries: int = 2,
          on_ready: Callable[[Any], None] | None = None, should_stop: Callable[[], bool] | None = None) -> Any:
    """Run the profiling service until ``POST /v1/shutdown``, ``should_stop()`` or Ctrl-C; then shut it down.

    Args:
        tables: the table root it measures into (its job journal is ``ROOT/_service/jobs.jsonl``).
        token: the bearer token writes need (None: the service takes no writes).
        ray_address: ``local`` (embedded Ray), ``auto`` or ``HOST:PORT``.
        host, port: where the HTTP API listens (loopback by default).
        devices, threads, backend, queue_limit, chunk_size, max_retries: see
            :func:`fleetprune.cluster.service.start_service`.
        on_ready: called with the :class:`~fleetprune.cluster.service.ServiceInfo` once it answers.
        should_stop: polled every second; True stops the service.

    Returns:
        The ServiceInfo of the service that ran.

    Raises:
        DeviceError: an unreachable cluster, no usable device, a port in use.
    """
    from fleetprune.cluster.connect import connect
    from fleetprune.cluster.service import start_service, stop_service, wait_until_stopped
    from fleetprune.cluster.service.ingress import token_digest
    from fleetprune.tables import TableStore

    if ray_address.strip().lower() == "none":
        raise FleetpruneError("the service runs on Ray: use --ray-address local, auto or HOST:PORT")
    TableStore(tables)  # a bad root fails before Ray starts
    with connect(ray_address) as conn:
        try:
            info = start_service(tables, token_sha256=token_digest(token) if token else None, devices=devices,
                                 threads=threads, backend=backend, host=host, port=port, planner=plan_job,
                                 predictor=predict, build_network=build_network, queue_limit=queue_limit,
                                 chunk_size=chunk_size, max_retries=max_retries)
            if on_ready is not None:
                on_ready(info)
            wait_until_stopped(should_stop=should_stop)
            log.info("service at %s on %s: stopping", info.url, conn.display)
        finally:
            stop_service(tables)
    return info


def stop(url: str | None = None, *, tables: str | None = None, token: str | None = None) -> str:
    """Ask a running service to shut down (found by ``url`` or by the state file in ``tables``); return its URL."""
    from fleetprune.cluster.service.app import read_state

    if url is None:
        state = read_state(tables or "tables")
        if state is None:
            raise FleetpruneError(f"no running service recorded in {tables or 'tables'}/_service/; pass its --url")
        url = state["url"]
    ServiceClient(url, token).shutdown()
    return url


# ---- the other verbs, through a service -------------------------------------------------------------------


def remote_profile(url: str, model: str, *, token: str | None = None, progress: Callable[[dict], None] | None = None,
                   poll_s: float = 1.0, **job: Any) -> dict[str, Any]:
    """Submit a profile job (``profile``'s options as keywords) and follow it to its end; the final status."""
    client = ServiceClient(url, token)
    body = {"model": model, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in job.items() if v is not None}}
    status = client.submit(body, retries=3)
    return client.follow(status["id"], progress, poll_s=poll_s)


def remote_measure(url: str, device_key: str, *, model: str, widths: Mapping[str, int], token: str | None = None,
                   **setting: Any) -> float:
    """Measured latency (ms, the table protocol's statistic) of ``model`` cut to ``widths`` on ``device_key``.

    What ``prune``'s verification calls for a device this machine is not: the service builds the
    network on a replica of that device type and times it there. ``setting``: batch, dtype,
    memory_format, input_size, num_classes, round_to, max_choices, quick, rounds.
    """
    answer = ServiceClient(url, token).measure(device_key, model, dict(widths), **setting)
    return float(answer["measured_ms"])


def remote_measure_side_by_side(url: str, device_key: str, *, model: str, widths: list[Mapping[str, int]],
                                token: str | None = None, **setting: Any) -> tuple[list[float], dict[str, Any]]:
    """Several width plans of ``model`` measured in the same interleaved rounds on a replica of ``device_key``
    (what a budget checked as a ratio needs); the latencies in order, and where they were taken."""
    first, *rest = [dict(w) for w in widths]
    answer = ServiceClient(url, token).measure(device_key, model, first, side_by_side=rest or None, **setting)
    where = {"device_key": answer["device_key"], "node_id": answer.get("node_id"), "pid": answer.get("pid"),
             "via": f"service {url}"}
    return [float(answer["measured_ms"]), *map(float, answer.get("side_by_side_ms", []))], where


def mirror_tables(url: str, root: str | None = None, devices: list[str] | None = None) -> str:
    """Download the service's tables (every device, or ``devices``) into a local root (default: a temp folder)."""
    client = ServiceClient(url)
    root = root or tempfile.mkdtemp(prefix="fleetprune-service-tables-")
    keys = devices or [d["device_key"] for d in client.tables()["devices"]]
    for key in keys:
        client.download_table(key, root)
    return root


__all__ = ["ServiceError", "build_network", "mirror_tables", "plan_job", "predict", "remote_measure",
           "remote_measure_side_by_side", "remote_profile", "resolve_token", "serve", "stop"]
