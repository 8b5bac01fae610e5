"""The service's HTTP API (JSON under ``/v1/``) as a Ray Serve ingress deployment on FastAPI.

Reads are open; writes (jobs, cancel, measure, shutdown) need ``Authorization: Bearer <token>``.
The ingress checks every body (400 saying what is wrong), answers lookups, predictions and table
downloads itself from the table root (tables cached per write counter of the coordinator), and
hands jobs and measurements to the coordinator.
"""


import asyncio
import hashlib
import hmac
import io
import json
import logging
import tempfile
import time
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from fleetprune.cluster.service.requests import (
    AuthError, NotFoundError, RequestError, http_status, parse_job, parse_lookup, parse_network,
)
from fleetprune.errors import FleetpruneError, TableError
from fleetprune.tables.schema import COLUMNS
from fleetprune.tables.store import TableStore

log = logging.getLogger(__name__)

Predictor = Callable[[Any, dict], dict]  # no `from __future__ import annotations` here: FastAPI reads the hints
"""``predict(table, request) -> {"predicted_ms", ...}`` for ``POST /v1/predict`` (injected by the api)."""

TABLE_TTL_S = 5.0  # tables of devices the coordinator does not write are re-read after this
PARQUET = "application/vnd.apache.parquet"

app = FastAPI(title="fleetprune", description="Latency tables of a fleet as a service")


def token_digest(token: str) -> str:
    """What the service keeps of its token (so the token itself is not stored in Serve's config)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _error(exc: FleetpruneError) -> JSONResponse:
    status = http_status(exc)
    headers = {}
    if status == 429:
        headers["Retry-After"] = str(getattr(exc, "retry_after_s", 30))
    elif status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": {"kind": type(exc).__name__, "message": str(exc)}}, status, headers=headers)


def _reply(answer: dict[str, Any], status: int = 200) -> JSONResponse:
    """A coordinator answer as a response (its ``error`` with its status and retry hint)."""
    err = answer.get("error") if isinstance(answer, dict) else None
    if err:
        headers = {"Retry-After": str(err["retry_after_s"])} if err.get("retry_after_s") else {}
        return JSONResponse({"error": {"kind": err["kind"], "message": err["message"]}}, err["status"], headers=headers)
    return JSONResponse(answer, status)


def part_bytes(table: Any) -> bytes:
    """A latency table as one Parquet part file (the store's own writer, so it merges like any part)."""
    frame = table.frame
    rows = frame[[c for c in COLUMNS if c in frame.columns]].to_dict("records")
    for row in rows:
        row["device_key"] = table.device_key
        row["measured_at"] = row["measured_at"].to_pydatetime()
        if row.get("lat_ms_min") is not None and row["lat_ms_min"] != row["lat_ms_min"]:
            row["lat_ms_min"] = None
    with tempfile.TemporaryDirectory() as tmp:
        path = TableStore(tmp).write(table.device_key, rows, dict(table.provenance))
        with open(path, "rb") as f:
            return io.BytesIO(f.read()).getvalue()


# Serve pickles this class with the module globals it sees here: helpers it uses are defined above.
@serve.ingress(app)
class Ingress:
    """The HTTP front of the service.

    Args:
        coordinator: handle of the coordinator deployment.
        root: the table root.
        token_sha256: digest of the bearer token writes need (None: every write is refused).
        predictor: the injected width-plan predictor (None: ``/v1/predict`` answers 400).
    """

    def __init__(self, coordinator: Any, root: str, token_sha256: str | None, predictor: Predictor | None = None):
        self.coord = coordinator
        self.store = TableStore(root)
        self.token_sha256 = token_sha256
        self.predictor = predictor
        self.cache: dict[str, tuple[Any, float, Any]] = {}

    # ---- helpers -----------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.token_sha256 is None:
            raise AuthError("this service was started without a token, so it takes no writes; restart it with "
                            "FLEETPRUNE_TOKEN set or --token-file")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token or not hmac.compare_digest(token_digest(token.strip()),
                                                                               self.token_sha256):
            raise AuthError("writes need the service's token: send 'Authorization: Bearer <token>' (the client "
                            "and the CLI read it from FLEETPRUNE_TOKEN)")

    @staticmethod
    async def _body(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the body is not valid JSON ({exc}); send a JSON object") from None

    async def _table(self, device: str) -> Any:
        """The latency table of a device (type name or table key), cached until the coordinator writes to it."""
        info = await self.coord.table_versions.remote()
        key = info["aliases"].get(device.lower(), device)
        stamp = (info["boot"], info["versions"].get(key))
        hit = self.cache.get(key)
        if hit and hit[0] == stamp and (stamp[1] is not None or time.monotonic() - hit[1] < TABLE_TTL_S):
            return hit[2]
        try:
            table = await asyncio.to_thread(self.store.read, key)
        except TableError as exc:
            raise NotFoundError(str(exc)) from None
        self.cache[key] = (stamp, time.monotonic(), table)
        return table

    # ---- routes ------------------------------------------------------------------------------

    @app.get("/v1/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"ok": True})

    @app.post("/v1/jobs")
    async def submit(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            spec = parse_job(await self._body(request))
        except FleetpruneError as exc:
            return _error(exc)
        return _reply(await self.coord.submit.remote(spec), 201)

    @app.get("/v1/jobs")
    async def jobs(self) -> JSONResponse:
        return _reply(await self.coord.list_jobs.remote())

    @app.get("/v1/jobs/{job_id}")
    async def job(self, job_id: str) -> JSONResponse:
        return _reply(await self.coord.status.remote(job_id))

    @app.delete("/v1/jobs/{job_id}")
    async def cancel(self, job_id: str, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
        except FleetpruneError as exc:
            return _error(exc)
        return _reply(await self.coord.cancel.remote(job_id))

    @app.get("/v1/devices")
    async def devices(self) -> JSONResponse:
        return _reply(await self.coord.devices.remote())

    @app.post("/v1/lookup")
    async def lookup(self, request: Request) -> JSONResponse:
        try:
            device, _, keys = parse_lookup(await self._body(request))
            table = await self._table(device)
        except FleetpruneError as exc:
            return _error(exc)
        found = {k: table.lookup_key(k) for k in keys if k in table}
        missing = [k for k in keys if k not in found]
        return JSONResponse({"device_key": table.device_key, "latency_ms": found, "missing": missing})

    @app.post("/v1/predict")
    async def predict(self, request: Request) -> JSONResponse:
        try:
            body = parse_network(await self._body(request), "a prediction")
            if self.predictor is None:
                raise RequestError("this service cannot predict width plans (started without a predictor)")
            table = await self._table(body["device"])
            return JSONResponse(await asyncio.to_thread(self.predictor, table, body))
        except FleetpruneError as exc:
            return _error(exc)

    @app.post("/v1/measure")
    async def measure(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            body = parse_network(await self._body(request), "a measurement")
        except FleetpruneError as exc:
            return _error(exc)
        return _reply(await self.coord.measure_network.remote(body))

    @app.get("/v1/tables")
    async def tables(self) -> JSONResponse:
        found = await asyncio.to_thread(self.store.devices)
        return JSONResponse({"tables": self.store.root, "devices": [
            {"device_key": d.device_key, "rows": d.rows, "files": d.files, "last_measured": str(d.last_measured or ""),
             "provenance": d.provenance, "bad_files": list(d.bad_files)} for d in found]})

    @app.get("/v1/tables/{device}")
    async def table(self, device: str) -> Response:
        try:
            table = await self._table(device)
        except FleetpruneError as exc:
            return _error(exc)
        data = await asyncio.to_thread(part_bytes, table)
        name = f"{table.device_key}.parquet"
        return Response(data, media_type=PARQUET, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.post("/v1/shutdown")
    async def shutdown(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
        except FleetpruneError as exc:
            return _error(exc)
        return JSONResponse(await self.coord.stop.remote())


__all__ = ["Ingress", "PARQUET", "Predictor", "app", "part_bytes", "token_digest"]
