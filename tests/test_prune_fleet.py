"""Verifying every device of a fleet in one prune: each variant measured on an actor of its own type.

The simulated cluster of conftest.py (FAKE_A on two nodes, FAKE_B on one) with tables of the fake
timing backend for both types; its actors time whole networks with the fake backend too (a
deterministic figure the table underpredicts, see ``FakeTimingBackend.measure_networks``), so these
tests check placement and the closed loop, never real timings. A third device exists only in the
tables and is pruned open-loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest

from fleetprune import load_variant
from fleetprune.api import prune
from fleetprune.cli import main
from fleetprune.profiler import FakeTimingBackend, fake_device
from fleetprune.tables import TableStore, make_row

from prune_tables import plan_configs

pytestmark = pytest.mark.ray

ORPHAN = "fake-orphan"


def _write(root: str, key: str, speed: float = 1.0) -> None:
    backend = FakeTimingBackend(fake_device(key, key), speed=speed)
    rows = []
    for c in plan_configs("resnet20", batch=1, round_to=8):
        ms = backend.latency_ms(c)
        rows.append(make_row(c, key, ms, ms, 1.01 * ms, 15, minimum=ms, latency=ms))
    TableStore(root).write(key, rows, {"device_key": key, "device_name": key, "fingerprint": {"fake": True},
                                      "timing_method": "fake", "threads": 1})


@pytest.fixture(scope="module")
def fleet_tables(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fleet-prune") / "tables")
    for key in ("fake_a", "fake_b", ORPHAN):
        _write(root, key)
    return root


def test_one_prune_verifies_each_type_on_its_own_actor_and_labels_the_rest(ray_cluster, fleet_tables, tmp_path,
                                                                          capsys):
    out = tmp_path / "v"
    rc = main(["prune", "resnet20", "--tables", fleet_tables, "--device", "all", "--budget", "0.7", "--steps", "2",
               "--round-to", "8", "--out", str(out), "--ray-address", ray_cluster.address, "--no-report"])
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    by_key = {d["device_key"]: d for d in summary["devices"]}
    assert set(by_key) == {"fake_a", "fake_b", ORPHAN}
    for key, accel in (("fake_a", "FAKE_A"), ("fake_b", "FAKE_B")):
        report = json.loads((out / key / "report.json").read_text())
        v = report["verification"]
        where = v["measured_on"]
        # measured in an actor pinned to a node of the device's own type, not in this process
        assert where["via"] == "ray actor" and where["device_type"] == accel
        assert where["node_id"] in ray_cluster.type_nodes[accel]
        assert v["rounds"] and v["rounds"][-1]["final"] and report["measured_ms"] == v["rounds"][-1]["measured_ms"]
        # the fake network runs slower than its rows, more so when wide: the table alone misses it, the loop
        # corrects it, and lands inside the window
        assert v["status"] == "met", v
        assert 0.95 <= report["measured_ms"] / (0.7 * v["rounds"][-1]["dense_measured_ms"]) <= 1.0
        assert by_key[key]["verification"] == "met" and by_key[key]["measured_ms"] == report["measured_ms"]
        assert v["verdict"] in printed
        load_variant(out / key)  # whole and loadable
    orphan = json.loads((out / ORPHAN / "report.json").read_text())
    assert orphan["verification"]["status"] == "predicted only" and orphan["measured_ms"] is None
    assert "not reachable on the cluster" in orphan["verification"]["note"]
    assert by_key[ORPHAN]["verification"] == "predicted only"
    assert orphan["predicted_ms"] <= orphan["budget_ms"] * (1 + 1e-9)


def test_a_node_removed_during_verification_falls_back_to_open_loop(ray_cluster, fleet_tables, tmp_path):
    """FAKE_B's only node is removed right after its first measurement (the dense and the fastest
    network): its variant is pruned open-loop and says so; FAKE_A's finishes verified; nothing is
    left half-written."""
    removed = []

    def on_round(device_key, timing):
        if device_key == "fake_b" and not removed:
            node = timing.where["node_id"]
            ray_cluster.remove(node)
            # a machine failure takes its worker processes too: without this the actor can serve the next
            # round before the node's death is detected, and a first round inside the window (op rows priced
            # since issue 13) would then end the loop verified
            with contextlib.suppress(ProcessLookupError):
                os.kill(timing.where["pid"], signal.SIGKILL)
            removed.append(node)

    out = tmp_path / "v"
    try:
        results = prune("resnet20", tables=fleet_tables, devices="fake_a,fake_b", budget=0.7, out=out, steps=2,
                        round_to=8, ray_address=ray_cluster.address, on_measured=on_round)
    finally:
        if removed:
            ray_cluster.add_gpu_node("FAKE_B")
            ray_cluster.cluster.wait_for_nodes()
    assert removed
    by_key = {r.device_key: r for r in results}
    assert by_key["fake_a"].verification == "met"
    b = json.loads((out / "fake_b" / "report.json").read_text())
    assert b["verification"]["status"] == "predicted only" and "device lost" in b["verification"]["note"]
    assert by_key["fake_b"].measured_ms is None
    assert sorted(p.name for p in out.iterdir()) == ["fake_a", "fake_b", "summary.json"]  # no temp folder left
    load_variant(out / "fake_b")
