"""Two profiles of one device on one root never measure a configuration twice (issue 12, item 6)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from fleetprune.api.profile import plan_configs
from fleetprune.cluster.spec import BackendSpec
from fleetprune.profiler import cpu_device
from fleetprune.tables import TableStore, make_row

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
KEY = BackendSpec.fake().fake_key(cpu_device(1).key)  # what `--backend fake --threads 1` writes


def profile_cmd(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fleetprune", "profile", "resnet20", "--ray-address", "none", "--threads", "1",
            "--chunk-size", "2", "--tables", str(root), *extra]


def raw_keys(root: Path) -> list[str]:
    return [k for f in sorted(root.glob("device_key=*/part-*.parquet"))
            for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()]


def test_a_second_profile_waits_for_the_first_and_measures_only_what_is_missing(tmp_path):
    root = tmp_path / "tables"
    store = TableStore(str(root))
    first = plan_configs("resnet20", max_choices=2)
    everything = plan_configs("resnet20")
    lock = store.lock_device(KEY)  # this test is "the first profile"
    proc = subprocess.Popen(profile_cmd(root, "--backend", "fake"), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        waiting = ""
        while proc.poll() is None and "waiting for another profile" not in waiting:
            waiting = proc.stderr.readline()
        assert f"waiting for another profile of {KEY} in {root} (pid {os.getpid()})" in waiting
        assert not raw_keys(root)  # it measures nothing while the lock is held
        rows = [make_row(c, KEY, 1.0, 0.9, 1.1, 5) for c in first]
        store.write(KEY, rows, {"device_name": "fake", "timing_protocol": {"statistic": "min"}})
        lock.release()
        out, err = proc.communicate(timeout=300)
    finally:
        watchdog.cancel()
        lock.release()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    keys = raw_keys(root)
    assert Counter(keys).most_common(1)[0][1] == 1  # no configuration measured twice
    assert set(keys) == {c.key for c in everything}
    measured = int(out.splitlines()[1].split()[3])
    assert measured == len(everything) - len(first)


def test_two_concurrent_profiles_measure_each_configuration_once(tmp_path):
    root = tmp_path / "tables"
    cmd = profile_cmd(root, "--backend", "fake:0.1")
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    keys = raw_keys(root)
    assert sorted(keys) == sorted({c.key for c in plan_configs("resnet20")})  # complete, none twice
    measured = sorted(int(out.splitlines()[1].split()[3]) for out, _ in results)
    assert sum(measured) == len(keys)
    assert not [p for p in root.iterdir() if not p.name.startswith((".", "_", "device_key="))]


def test_the_lock_is_reentrant_in_one_process_and_a_no_op_off_local_disks(tmp_path):
    import pyarrow.fs as pafs

    store = TableStore(str(tmp_path))
    with store.lock_device("cpu-x") as a, store.lock_device("cpu-x") as b:  # one process never waits on itself
        assert a.held and b.held
    mockfs, _ = pafs.FileSystem.from_uri("mock:///")
    assert not TableStore("t", filesystem=mockfs).lock_device("cpu-x").held
