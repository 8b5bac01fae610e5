"""Connecting to Ray: an embedded local instance, an existing cluster, or no Ray at all.

``local`` starts Ray on this machine for the duration of the run; ``auto`` and ``HOST:PORT`` (or
``ray://HOST:PORT``) attach to a cluster started with ``ray start``; ``none`` uses no Ray (this
module then never imports it). Attaching checks that the address answers on TCP first, because
``ray.init`` on an unreachable address retries for minutes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Iterator

from fleetprune.errors import DeviceError

log = logging.getLogger(__name__)

LOCAL = "local"
AUTO = "auto"
NONE = "none"
DEFAULT_PORT = 6379  # `ray start --head` default GCS port
REACH_TIMEOUT_S = 3.0

# Measured on our machines: without these, Ray asks about usage stats and token auth.
RAY_ENV_DEFAULTS = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

_HINT = ("start one with `ray start --head` (and `ray start --address HEAD:6379` on the other nodes), "
         "or use --ray-address local (Ray on this machine only) or none (no Ray)")


@dataclass(frozen=True)
class Connection:
    """How this process is connected to Ray for a run.

    Attributes:
        mode: ``local`` (embedded Ray started here), ``attached`` (an existing cluster),
            ``reused`` (Ray was already initialised in this process) or ``none`` (no Ray).
        address: the cluster's GCS address; None without Ray.
        owned: whether leaving :func:`connect` shuts Ray down / disconnects.
    """

    mode: str
    address: str | None
    owned: bool

    @property
    def uses_ray(self) -> bool:
        """False for ``--ray-address none``."""
        return self.mode != NONE

    @property
    def display(self) -> str:
        """How the run names where it ran: ``local``, ``none`` or the cluster address."""
        if self.mode in (LOCAL, NONE):
            return self.mode
        return self.address or self.mode


def set_ray_env_defaults() -> None:
    """Set the Ray environment defaults we rely on, unless the user set them."""
    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``ray://host:port`` or a bare host as (host, port).

    Raises:
        DeviceError: a malformed address.
    """
    text = address.strip()
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme != "ray":
            raise DeviceError(f"malformed Ray address {address!r}: the only scheme Ray accepts is ray://; {_HINT}")
    text = text.rstrip("/")
    if text.startswith("["):  # IPv6 literal
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host:
        raise DeviceError(f"malformed Ray address {address!r}: expected HOST:PORT; {_HINT}")
    if not port_text:
        return host, DEFAULT_PORT
    try:
        port = int(port_text)
    except ValueError:
        raise DeviceError(f"malformed Ray address {address!r}: the port must be a number; {_HINT}") from None
    if not 0 < port < 65536:
        raise DeviceError(f"malformed Ray address {address!r}: port {port} is out of range")
    return host, port


def check_reachable(address: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Fail fast unless something answers on the address's TCP port.

    Raises:
        DeviceError: the host is unknown, refuses, or does not answer within ``timeout_s``.
    """
    host, port = split_host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except socket.gaierror as exc:
        why = f"unknown host {host!r} ({exc.strerror or exc})"
    except TimeoutError:
        why = f"no answer from {host}:{port} within {timeout_s:g} s"
    except OSError as exc:
        why = f"{host}:{port} refused the connection ({exc.strerror or exc})"
    raise DeviceError(f"cannot reach a Ray cluster at {address}: {why}; {_HINT}")


def _resolve_auto() -> str:
    """The address ``ray.init(address='auto')`` would use, or DeviceError when there is none."""
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:  # private API moved: let ray.init find it (no fast reachability check)
        return AUTO
    try:
        return canonicalize_bootstrap_address_or_die(AUTO)
    except ConnectionError as exc:
        raise DeviceError(f"--ray-address auto found no running Ray cluster to attach to ({exc}); {_HINT}") from None


def _import_ray():  # noqa: ANN202 - the ray module
    set_ray_env_defaults()
    try:
        import ray
    except ImportError as exc:
        raise DeviceError(
            f"Ray is not installed in this environment ({exc}); install it, or profile this machine's "
            "devices in-process with --ray-address none"
        ) from None
    return ray


@contextlib.contextmanager
def connect(address: str | None = LOCAL, *, num_cpus: int | None = None,
            reach_timeout_s: float = REACH_TIMEOUT_S) -> Iterator[Connection]:
    """Connect to Ray for the duration of a ``with`` block.

    Args:
        address: ``local`` (default; start Ray on this machine, sized to it, and shut it down
            afterwards), ``auto`` (the cluster ``ray start`` left on this machine or in
            ``RAY_ADDRESS``), ``HOST:PORT`` / ``ray://HOST:PORT``, or ``none`` (no Ray).
        num_cpus: CPUs of an embedded instance (default: all this process may use).
        reach_timeout_s: how long to wait for an address to answer before giving up.

    If Ray is already initialised in this process (a notebook, a test session), that connection
    is used (and left open) for ``local``, ``auto`` and its own address; another address is an error.

    Raises:
        DeviceError: nothing to attach to, an unreachable or malformed address, Ray missing, or an
            embedded instance that would not start.
    """
    mode = (address or LOCAL).strip()
    if mode.lower() == NONE:
        yield Connection(NONE, None, owned=False)
        return
    ray = _import_ray()
    if ray.is_initialized():
        current = _current_address(ray)
        if mode.lower() not in (LOCAL, AUTO) and current and split_host_port(mode)[1] != split_host_port(current)[1]:
            check_reachable(mode, reach_timeout_s)  # an unreachable address is reported as such
            raise DeviceError(
                f"this process is already connected to the Ray cluster at {current}, not {mode}; Ray allows one "
                "cluster per process: call ray.shutdown() first, or pass that cluster's address"
            )
        yield Connection("reused", current, owned=False)
        return
    init_kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    if mode.lower() == LOCAL:
        cpus = num_cpus or _usable_cpus()
        try:
            ray.init(address=LOCAL, num_cpus=cpus, **init_kwargs)
        except Exception as exc:  # noqa: BLE001 - any start-up failure is the same advice
            raise DeviceError(
                f"could not start an embedded Ray on this machine ({type(exc).__name__}: {exc}); "
                "profile in-process with --ray-address none, or attach to a cluster with --ray-address"
            ) from exc
        conn = Connection(LOCAL, _current_address(ray), owned=True)
        log.info("started an embedded Ray with %d CPUs at %s", cpus, conn.address)
    else:
        target = _resolve_auto() if mode.lower() == AUTO else mode
        if target != AUTO:
            check_reachable(target, reach_timeout_s)
        try:
            ray.init(address=target, **init_kwargs)
        except (ConnectionError, TimeoutError, ValueError) as exc:
            raise DeviceError(f"cannot attach to the Ray cluster at {target}: {exc}; {_HINT}") from exc
        conn = Connection("attached", _current_address(ray) or target, owned=True)
        log.info("attached to the Ray cluster at %s", conn.address)
    try:
        yield conn
    finally:
        ray.shutdown()
        log.info("%s Ray", "shut down the embedded" if conn.mode == LOCAL else "disconnected from")


def _current_address(ray) -> str | None:  # noqa: ANN001
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - informational only
        return None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
