"""The service survives a restart: the journal in the table root brings unfinished jobs back.

Real Ray Serve on loopback over the session's simulated cluster, fake timing backend (FAKE_B only,
so one replica starts each time).
"""

from __future__ import annotations

import time

import pytest

from fleetprune.cli import main
from fleetprune.client import ServiceClient
from fleetprune.cluster.spec import BackendSpec
from fleetprune.tables import TableStore
from test_service_api import TOKEN, configs, free_port, raw_keys, rows

pytestmark = pytest.mark.ray

COST_S = 0.05


def start(root, port: int):  # noqa: ANN201 - a ServiceInfo
    from fleetprune.api.serve import build_network, plan_job, predict
    from fleetprune.cluster.service import start_service
    from fleetprune.cluster.service.ingress import token_digest

    return start_service(str(root), token_sha256=token_digest(TOKEN), devices="FAKE_B",
                         backend=BackendSpec.fake(COST_S), port=port, planner=plan_job, predictor=predict,
                         build_network=build_network)


def test_a_restart_mid_job_resumes_and_completes_it(ray_cluster, tmp_path, monkeypatch):
    from fleetprune.cluster.service import stop_service, wait_until_stopped

    root = tmp_path / "tables"
    cs = configs(80, in_hw=13)
    info = start(root, free_port())
    try:
        client = ServiceClient(info.url, TOKEN)
        job = client.submit({"configs": rows(cs), "devices": "FAKE_B"})
        other = client.submit({"configs": rows(configs(2, in_hw=14)), "devices": "FAKE_B"})
        deadline = time.monotonic() + 60
        while client.status(job["id"])["done"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = client.status(job["id"])
        assert 0 < before["done"] < len(cs) and before["state"] == "running"
    finally:
        stop_service(str(root))  # as if the service process went away mid-job
    measured = len(raw_keys(root, "fake_b"))
    assert measured < len(cs)  # stopped mid-job: in-flight chunks were written, nothing new started

    info = start(root, free_port())
    try:
        client = ServiceClient(info.url, TOKEN)
        after = client.status(job["id"])
        assert after["state"] in ("queued", "running", "done") and after["done"] >= before["done"]
        final = client.follow(job["id"], poll_s=0.1, timeout_s=120)
        assert final["state"] == "done" and final["done"] == final["total"] == len(cs)
        assert client.follow(other["id"], poll_s=0.1, timeout_s=60)["state"] == "done"  # queued behind the first
        keys = raw_keys(root, "fake_b")
        assert sorted(keys) == sorted(set(keys)) and set(keys) >= {c.key for c in cs}  # nothing measured twice
        assert TableStore(str(root)).read("fake_b").keys()  # the journal folder does not disturb readers
        assert [j["id"] for j in client.jobs()] == [job["id"], other["id"]]

        # `fleetprune serve --stop --tables ROOT` finds the service through its state file and stops it.
        monkeypatch.setenv("FLEETPRUNE_TOKEN", TOKEN)
        assert main(["serve", "--stop", "--tables", str(root)]) == 0
        started = time.monotonic()
        wait_until_stopped(poll_s=0.1, should_stop=lambda: time.monotonic() - started > 30)
        assert time.monotonic() - started < 30
    finally:
        stop_service(str(root))
    assert not (root / "_service" / "service.json").exists()
