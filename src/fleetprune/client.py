"""A small Python client of the fleetprune service (``fleetprune serve``), on the standard library alone.

    from fleetprune.client import ServiceClient
    svc = ServiceClient("http://127.0.0.1:8000")           # token from FLEETPRUNE_TOKEN
    job = svc.submit({"model": "resnet20", "batch": 16})
    final = svc.follow(job["id"])                         # polls until done/failed/cancelled
    svc.lookup("cpu-amd-epyc-7b13-t1", keys=[...])

Every failure is a :class:`ServiceError` (a :class:`~fleetprune.errors.FleetpruneError`) carrying
the HTTP status and the service's own message, which says what to do next.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable, Mapping, Sequence

from fleetprune.errors import FleetpruneError

TOKEN_ENV = "FLEETPRUNE_TOKEN"
FINAL_STATES = ("done", "failed", "cancelled")


class ServiceError(FleetpruneError):
    """The service refused a request or could not be reached.

    Attributes:
        status: the HTTP status (0 when nothing answered).
        retry_after_s: the service's hint on a 429, else None.
    """

    def __init__(self, message: str, status: int = 0, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class ServiceClient:
    """Talks to one service.

    Args:
        url: its base URL, e.g. ``http://127.0.0.1:8000``.
        token: the bearer token writes need (default: ``$FLEETPRUNE_TOKEN``).
        timeout_s: per-request timeout.
    """

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0):
        parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ServiceError(f"--service must be a URL such as http://127.0.0.1:8000, got {url!r}")
        self.url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout_s = timeout_s

    # ---- transport -----------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, raw: bool = False,
                timeout_s: float | None = None) -> Any:
        """One request; the decoded JSON answer (bytes with ``raw``), or :class:`ServiceError`."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                message = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = text.strip() or exc.reason
            retry = exc.headers.get("Retry-After")
            raise ServiceError(f"{message} (HTTP {exc.code} from {self.url})", exc.code,
                               float(retry) if retry else None) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServiceError(f"no fleetprune service answers at {self.url} ({reason}); start one with "
                               "`fleetprune serve --tables ROOT` or check --service") from None
        return payload if raw else json.loads(payload or b"null")

    # ---- jobs ----------------------------------------------------------------------------------

    def submit(self, job: Mapping[str, Any], *, retries: int = 0, max_wait_s: float = 600.0) -> dict[str, Any]:
        """Submit a profile job (``{"model": ..., "batch": ...}``); on 429 retry up to ``retries`` times
        after the service's hint (at most ``max_wait_s`` in all). Returns its status (with ``id``)."""
        waited = 0.0
        for attempt in range(retries + 1):
            try:
                return self.request("POST", "/v1/jobs", dict(job))
            except ServiceError as exc:
                pause = min(exc.retry_after_s or 5.0, max_wait_s - waited)
                if exc.status != 429 or attempt == retries or pause <= 0:
                    raise
                time.sleep(pause)
                waited += pause
        raise AssertionError("unreachable")

    def status(self, job_id: str) -> dict[str, Any]:
        """A job's status: ``state``, per-device done / total / failed, rate and ETA."""
        return self.request("GET", f"/v1/jobs/{urllib.parse.quote(job_id)}")

    def jobs(self) -> list[dict[str, Any]]:
        """Every job the service knows."""
        return self.request("GET", "/v1/jobs")["jobs"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job (rows already measured stay)."""
        return self.request("DELETE", f"/v1/jobs/{urllib.parse.quote(job_id)}")

    def follow(self, job_id: str, on_status: Callable[[dict[str, Any]], None] | None = None, *,
               poll_s: float = 1.0, timeout_s: float | None = None) -> dict[str, Any]:
        """Poll a job until it is done, failed or cancelled (or ``timeout_s`` passes: ServiceError)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if on_status is not None:
                on_status(status)
            if status["state"] in FINAL_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceError(f"job {job_id} is still {status['state']} after {timeout_s:g} s; follow it again "
                                   "later, it keeps running on the service")
            time.sleep(poll_s)

    # ---- the fleet and its tables --------------------------------------------------------------

    def devices(self) -> dict[str, Any]:
        """Device types, nodes, replicas, queue lengths and table summaries."""
        return self.request("GET", "/v1/devices")

    def lookup(self, device: str, configs: Sequence[Any] | None = None, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """Latency of configurations (``LayerConfig`` or column dicts) or keys: ``{"latency_ms": {key: ms}, "missing"}``."""
        if configs is not None:
            body = {"device": device, "configs": [_config_columns(c) for c in configs]}
        else:
            body = {"device": device, "keys": list(keys or [])}
        return self.request("POST", "/v1/lookup", body)

    def predict(self, device: str, model: str, widths: Mapping[str, int] | None = None, **setting: Any) -> dict[str, Any]:
        """Predicted latency of a width plan of ``model`` from the device's table."""
        return self.request("POST", "/v1/predict", {"device": device, "model": model, "widths": dict(widths or {}),
                                                    **_given(setting)})

    def measure(self, device: str, model: str, widths: Mapping[str, int] | None = None, *,
                timeout_s: float = 900.0, **setting: Any) -> dict[str, Any]:
        """Measure a network (``model`` cut to ``widths``) end to end on a replica of ``device``."""
        return self.request("POST", "/v1/measure", {"device": device, "model": model, "widths": dict(widths or {}),
                                                    **_given(setting)}, timeout_s=timeout_s)

    def tables(self) -> dict[str, Any]:
        """Summaries of every device's table in the service's root."""
        return self.request("GET", "/v1/tables")

    def table_bytes(self, device: str) -> bytes:
        """A device's table as one Parquet part file."""
        return self.request("GET", f"/v1/tables/{urllib.parse.quote(device)}", raw=True)

    def download_table(self, device: str, root: str) -> str:
        """Write a device's table into the local table root ``root`` as a new part file; return its path."""
        data = self.table_bytes(device)
        key = self._device_key(device)
        folder = os.path.join(root, f"device_key={key}")
        os.makedirs(folder, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        path = os.path.join(folder, f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet")
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return path

    def _device_key(self, device: str) -> str:
        for t in self.devices().get("types", []):
            if device.lower() in (t["name"].lower(), str(t.get("device_key")).lower()):
                return t["device_key"]
        return device

    def shutdown(self) -> dict[str, Any]:
        """Ask the service to shut down (needs the token)."""
        return self.request("POST", "/v1/shutdown", {})


def _given(setting: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in setting.items() if v is not None}


def _config_columns(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    row = config.to_row()
    row.pop("key", None)
    return row


__all__ = ["FINAL_STATES", "ServiceClient", "ServiceError", "TOKEN_ENV"]
