"""What the service accepts: request bodies checked field by field, and the errors it answers with.

No Ray and no torch here, so the checks are plain functions the tests and the client can share.
Every error says which field is wrong and what would be right; the ingress turns them into HTTP
status codes (:data:`HTTP_STATUS`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from fleetprune.errors import DeviceError, FleetpruneError, ModelError, TableError
from fleetprune.tables.config import CONFIG_COLUMNS, DTYPES, MEMORY_FORMATS, LayerConfig

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")


class RequestError(FleetpruneError):
    """A malformed request body or argument (HTTP 400)."""


class AuthError(FleetpruneError):
    """A write without the service's bearer token (HTTP 401)."""


class NotFoundError(FleetpruneError):
    """An unknown job id or a device without a table (HTTP 404)."""


class QueueFullError(FleetpruneError):
    """The service's queue cannot take the job now (HTTP 429).

    Attributes:
        retry_after_s: a hint of when to try again, in whole seconds.
    """

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = int(retry_after_s)


HTTP_STATUS: dict[type, int] = {
    RequestError: 400, ModelError: 400, DeviceError: 400, AuthError: 401, NotFoundError: 404, TableError: 404,
    QueueFullError: 429,
}


def http_status(exc: BaseException) -> int:
    """The HTTP status of a user error (its most specific class in :data:`HTTP_STATUS`), 400 by default."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400


# Setting fields every model-based request shares, with their checks: (types, predicate, what is expected).
_POS_INT = ((int,), lambda v: v >= 1, "a whole number >= 1")
_SETTING: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "batch": _POS_INT,
    "dtype": ((str,), lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "memory_format": ((str,), lambda v: v in MEMORY_FORMATS, f"one of {', '.join(MEMORY_FORMATS)}"),
    "round_to": _POS_INT,
    "num_classes": _POS_INT,
    "max_choices": _POS_INT,
    "threads": _POS_INT,
}
JOB_FIELDS = ("model", "configs", "devices", "input_size", *_SETTING)
NETWORK_FIELDS = ("model", "device", "widths", "side_by_side", "input_size", "batch", "dtype", "memory_format",
                  "round_to", "num_classes", "max_choices", "quick", "rounds")


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A checked profile job: what to measure (a model's plan or explicit configurations) and where.

    ``to_dict()`` is what the journal stores and the planner is handed (the CLI's option names with
    underscores); ``configs`` are table rows.
    """

    devices: str = "all"
    model: str | None = None
    configs: tuple[LayerConfig, ...] = ()
    batch: int = 1
    dtype: str | None = None
    memory_format: str = "nhwc"
    round_to: int | None = None
    input_size: tuple[int, int] | None = None
    num_classes: int | None = None
    max_choices: int = 32
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (configurations as their table columns)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "configs"}
        out["input_size"] = list(self.input_size) if self.input_size else None
        out["configs"] = [{k: v for k, v in c.to_row().items() if k != "key"} for c in self.configs]
        return out

    def describe(self) -> str:
        """Short text for logs and job listings."""
        what = self.model or f"{len(self.configs)} configurations"
        return f"{what} (batch {self.batch}, {self.dtype or 'default dtype'}, {self.memory_format}) on {self.devices}"


def _object(body: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise RequestError(f"the body of {what} must be a JSON object, got {type(body).__name__}")
    return body


def _unknown(body: Mapping[str, Any], allowed: tuple[str, ...], what: str) -> None:
    extra = sorted(set(body) - set(allowed))
    if extra:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, extra))} in {what}; allowed: {', '.join(allowed)}")


def _field(body: Mapping[str, Any], name: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    types, ok, expected = _SETTING[name]
    if isinstance(value, bool) or not isinstance(value, types) or not ok(value):
        raise RequestError(f"field {name!r} must be {expected}, got {value!r}")
    return value


def input_size(value: Any) -> tuple[int, int] | None:
    """``64``, ``[64, 48]`` or ``"64x48"`` as (H, W); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.lower().split("x")]
        except ValueError:
            value = None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not 1 <= len(value) <= 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise RequestError(f"field 'input_size' must be H, [H, W] or \"HxW\" with positive sizes, got {value!r}")
    return (value[0], value[-1])


def _devices(value: Any) -> str:
    if value is None:
        return "all"
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value) and value:
        return ",".join(v.strip() for v in value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise RequestError(f"field 'devices' must be \"all\", a comma-separated string or a list of device types, got {value!r}")


def config_from(row: Any, where: str) -> LayerConfig:
    """A layer configuration from a JSON object of table columns (``key`` and extra columns ignored)."""
    if not isinstance(row, Mapping):
        raise RequestError(f"{where} must be an object of configuration columns ({', '.join(CONFIG_COLUMNS)})")
    try:
        base = {f.name: f.default for f in dataclasses.fields(LayerConfig) if f.default is not dataclasses.MISSING}
        return LayerConfig.from_row({**base, **row})
    except KeyError as exc:
        raise RequestError(f"{where} lacks the column {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise RequestError(f"{where} is not a valid configuration: {exc}") from None


def parse_job(body: Any) -> JobSpec:
    """A profile job from its JSON body (``POST /v1/jobs``).

    Raises:
        RequestError: not an object, an unknown field, a value of the wrong type or range, neither
            or both of ``model`` and ``configs``.
    """
    body = _object(body, "a job")
    _unknown(body, JOB_FIELDS, "a job")
    model, configs = body.get("model"), body.get("configs")
    if (model is None) == (configs is None):
        raise RequestError("a job needs exactly one of 'model' (a model name) or 'configs' (a list of configurations)")
    if model is not None and not (isinstance(model, str) and model.strip()):
        raise RequestError(f"field 'model' must be a model name, got {model!r}")
    parsed: tuple[LayerConfig, ...] = ()
    if configs is not None:
        if not isinstance(configs, list) or not configs:
            raise RequestError("field 'configs' must be a non-empty list of configuration objects")
        parsed = tuple(config_from(row, f"configs[{i}]") for i, row in enumerate(configs))
    return JobSpec(
        devices=_devices(body.get("devices")), model=model.strip() if model else None, configs=parsed,
        batch=_field(body, "batch", 1), dtype=_field(body, "dtype"), memory_format=_field(body, "memory_format", "nhwc"),
        round_to=_field(body, "round_to"), input_size=input_size(body.get("input_size")),
        num_classes=_field(body, "num_classes"), max_choices=_field(body, "max_choices", 32),
        threads=_field(body, "threads"),
    )


def job_from_dict(data: Mapping[str, Any]) -> JobSpec:
    """The inverse of :meth:`JobSpec.to_dict` (a journal record); checked like a request."""
    body = {k: v for k, v in data.items() if v not in (None, [])}
    return parse_job(body)


def parse_lookup(body: Any) -> tuple[str, list[LayerConfig] | None, list[str]]:
    """``{"device": KEY, "configs": [...]}`` or ``{"device": KEY, "keys": [...]}`` (``POST /v1/lookup``)."""
    body = _object(body, "a lookup")
    _unknown(body, ("device", "configs", "keys"), "a lookup")
    device = _device(body)
    configs, keys = body.get("configs"), body.get("keys")
    if (configs is None) == (keys is None):
        raise RequestError("a lookup needs exactly one of 'configs' (configuration objects) or 'keys' (their keys)")
    if keys is not None:
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            raise RequestError("field 'keys' must be a non-empty list of configuration keys (strings)")
        return device, None, list(keys)
    if not isinstance(configs, list) or not configs:
        raise RequestError("field 'configs' must be a non-empty list of configuration objects")
    parsed = [config_from(row, f"configs[{i}]") for i, row in enumerate(configs)]
    return device, parsed, [c.key for c in parsed]


def _device(body: Mapping[str, Any]) -> str:
    device = body.get("device")
    if not isinstance(device, str) or not device.strip():
        raise RequestError("field 'device' must name a device type or table key (see GET /v1/devices)")
    return device.strip()


def parse_network(body: Any, what: str) -> dict[str, Any]:
    """A network on a device (``POST /v1/predict`` and ``POST /v1/measure``), checked, as a plain dict.

    ``widths`` maps channel-group names to kept widths (groups left out stay dense).
    """
    body = _object(body, what)
    _unknown(body, NETWORK_FIELDS, what)
    device = _device(body)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise RequestError(f"{what} needs field 'model' (a model name)")
    widths = body.get("widths") or {}
    _check_width_plan(widths, "field 'widths'")
    side = body.get("side_by_side")
    if side is not None:
        if not isinstance(side, list) or not 1 <= len(side) <= 8:
            raise RequestError("field 'side_by_side' must be a list of 1 to 8 width plans, measured in the same "
                               "interleaved rounds as 'widths'")
        for i, plan in enumerate(side):
            _check_width_plan(plan, f"field 'side_by_side'[{i}]")
    rounds = body.get("rounds", 3)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= 10:
        raise RequestError(f"field 'rounds' must be a whole number from 1 to 10, got {rounds!r}")
    if not isinstance(body.get("quick", False), bool):
        raise RequestError("field 'quick' must be true or false")
    out = {name: _field(body, name) for name in ("batch", "dtype", "memory_format", "round_to", "num_classes",
                                                 "max_choices")}
    out.update(device=device, model=model.strip(), widths=dict(widths), input_size=input_size(body.get("input_size")),
               quick=bool(body.get("quick", False)), rounds=rounds)
    if side is not None:
        out["side_by_side"] = [dict(p or {}) for p in side]
    return out


def _check_width_plan(widths: Any, what: str) -> None:
    if not isinstance(widths, Mapping) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1 for k, v in widths.items()):
        raise RequestError(f"{what} must be an object of channel-group name -> kept width (a whole number >= 1)")


__all__ = ["AuthError", "FINAL_STATES", "JobSpec", "NotFoundError", "QueueFullError", "RequestError", "STATES",
           "config_from", "http_status", "input_size", "job_from_dict", "parse_job", "parse_lookup", "parse_network"]
