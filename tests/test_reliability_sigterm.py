"""SIGTERM during `fleetprune profile` is handled like Ctrl-C: rows kept, Ray shut down, exit 143 (issue 12, item 4)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fleetprune.tables import TableStore

from test_profile_cli import ENV, cli, kill_session, part_files, raw_keys, wait_session_gone


def _terminate_after_first_rows(tmp_path: Path, extra: list[str]) -> None:
    root = tmp_path / "tables"
    args = cli("profile", "resnet20", "--backend", "fake:0.2", "--chunk-size", "2", "--threads", "1",
               "--tables", str(root), *extra)
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not part_files(root) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be terminated"
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert not wait_session_gone(proc.pid), "Ray processes outlived the run"
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "SIGTERM received" not in err and "@ " not in err
    assert err.strip().splitlines()[-1].startswith("terminated: everything measured so far is saved")
    keys = raw_keys(root)
    assert keys and len(keys) % 2 == 0  # whole chunks only
    [device] = TableStore(str(root)).devices()
    assert TableStore(str(root)).measured_keys(device.device_key) == set(keys)
    assert not [p for p in root.rglob(".*") if p.suffix == ".tmp"]  # no half-written part left
    again = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)  # lock released
    assert again.returncode == 0, again.stderr
    measured_again = int(again.stdout.splitlines()[1].split()[3])
    total = int(again.stdout.splitlines()[1].split()[2])
    assert measured_again == total - len(keys)  # only what the terminated run had not written


def test_sigterm_without_ray_keeps_the_rows_and_exits_143(tmp_path):
    _terminate_after_first_rows(tmp_path, ["--ray-address", "none"])


@pytest.mark.ray
def test_sigterm_during_an_embedded_ray_run_shuts_ray_down_and_exits_143(tmp_path):
    _terminate_after_first_rows(tmp_path, [])
