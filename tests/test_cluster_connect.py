"""Connecting: address parsing, fast failure on unreachable clusters, and ``none`` never importing Ray."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

import pytest

from fleetprune.cluster.connect import check_reachable, connect, split_host_port
from fleetprune.errors import DeviceError


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.0.0.5:6380", ("10.0.0.5", 6380)),
        ("head", ("head", 6379)),
        ("ray://head:10001", ("head", 10001)),
        ("[::1]:7000", ("::1", 7000)),
    ],
)
def test_addresses_are_split_into_host_and_port(text, expected):
    assert split_host_port(text) == expected


@pytest.mark.parametrize("text", ["http://head:6379", "head:port", "head:70000", ":6379"])
def test_malformed_addresses_are_device_errors(text):
    with pytest.raises(DeviceError, match="malformed Ray address"):
        split_host_port(text)


def test_an_unreachable_address_fails_fast_with_advice():
    port = _closed_port()
    started = time.perf_counter()
    with pytest.raises(DeviceError) as err:
        with connect(f"127.0.0.1:{port}"):
            pass
    assert time.perf_counter() - started < 10
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "ray start --head" in message and "--ray-address" in message


def test_an_unknown_host_is_reported_not_hung():
    with pytest.raises(DeviceError, match="unknown host"):
        check_reachable("no-such-host.invalid:6379", timeout_s=2)


def test_auto_without_a_cluster_says_so(monkeypatch):
    services = pytest.importorskip("ray._private.services")

    def nothing(_addr):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(services, "canonicalize_bootstrap_address_or_die", nothing)
    with pytest.raises(DeviceError, match="found no running Ray cluster"):
        with connect("auto"):
            pass


def test_none_means_no_ray_at_all(tmp_path):
    """`--ray-address none` works where Ray is not installed: the in-process path never imports it."""
    code = textwrap.dedent(
        f"""
        import sys
        from fleetprune.cli import main
        from fleetprune.cluster.connect import connect
        with connect("none") as conn:
            assert not conn.uses_ray
        assert main(["fleet", "--ray-address", "none"]) == 0
        assert main(["profile", "resnet20", "--ray-address", "none", "--backend", "fake",
                     "--tables", {str(tmp_path)!r}]) == 0
        assert "ray" not in sys.modules, sorted(m for m in sys.modules if m.startswith("ray"))
        print("NO-RAY-OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "NO-RAY-OK" in out.stdout
    assert "this machine (no Ray)" in out.stdout and "CPU" in out.stdout
    assert list(tmp_path.glob("device_key=fake-cpu-*/part-*.parquet"))
