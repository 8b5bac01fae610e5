"""The profiling service against a real Ray Serve deployment on loopback (the session's simulated cluster).

Timing is the fake backend's (made-up latencies, COST_S of sleep per configuration), so every
assertion is about who measured what, how often, and what the API says; never this machine's speed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest

from fleetprune.client import ServiceClient, ServiceError
from fleetprune.cluster.spec import BackendSpec
from fleetprune.profiler import cpu_device
from fleetprune.tables import LayerConfig, TableStore

pytestmark = pytest.mark.ray

COST_S = 0.05  # fake seconds per configuration
TOKEN = "test-token-not-a-secret"
QUEUE_LIMIT = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configs(n: int, in_hw: int, start: int = 0) -> list[LayerConfig]:
    """``n`` distinct conv configurations; ``in_hw`` keeps the sets of different tests apart."""
    return [LayerConfig("conv", cin=8 * (1 + i % 8), cout=8 * (1 + i // 8), kh=3, kw=3, ph=1, pw=1,
                        in_h=in_hw, in_w=in_hw) for i in range(start, start + n)]


def rows(cs: list[LayerConfig]) -> list[dict]:
    return [{k: v for k, v in c.to_row().items() if k != "key"} for c in cs]


def raw_keys(root, device_key: str) -> list[str]:
    """Every row's key in every part file of a device (duplicates kept)."""
    keys: list[str] = []
    for f in sorted((root / f"device_key={device_key}").glob("part-*.parquet")):
        keys.extend(pq.read_table(f, columns=["key"]).column("key").to_pylist())
    return keys


def http(method: str, url: str, data: bytes | None = None, token: str | None = None) -> tuple[int, dict, dict]:
    """A bare request: (status, headers, JSON body)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    """One service over every type of the simulated cluster (head CPU, FAKE_A x2, FAKE_B), fake timing."""
    from fleetprune.api.serve import build_network, plan_job, predict
    from fleetprune.cluster.service import start_service, stop_service
    from fleetprune.cluster.service.ingress import token_digest

    root = tmp_path_factory.mktemp("service") / "tables"
    info = start_service(str(root), token_sha256=token_digest(TOKEN), backend=BackendSpec.fake(COST_S),
                         port=free_port(), planner=plan_job, predictor=predict, build_network=build_network,
                         queue_limit=QUEUE_LIMIT)
    try:
        yield info, root
    finally:
        stop_service(str(root))


def follow(client: ServiceClient, job_id: str, seen: list[dict]) -> dict:
    return client.follow(job_id, seen.append, poll_s=0.1, timeout_s=120)


def test_overlapping_jobs_from_two_clients_measure_each_configuration_once(service):
    info, root = service
    a, b = configs(60, in_hw=8), configs(60, in_hw=8, start=30)  # 30 shared
    clients = [ServiceClient(info.url, TOKEN), ServiceClient(info.url, TOKEN)]
    ids: list[str] = [None, None]  # type: ignore[list-item]
    seen: list[list[dict]] = [[], []]

    def run(i: int, cs: list[LayerConfig]) -> None:
        ids[i] = clients[i].submit({"configs": rows(cs), "devices": "FAKE_A"})["id"]
        follow(clients[i], ids[i], seen[i])

    threads = [threading.Thread(target=run, args=(i, cs)) for i, cs in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    union = sorted({c.key for c in a + b})
    assert sorted(raw_keys(root, "fake_a")) == union  # each measured exactly once, by whichever job queued it
    assert sorted(TableStore(str(root)).read("fake_a").keys()) == union
    order = ("queued", "running", "done")
    for statuses in seen:
        assert statuses[-1]["state"] == "done" and statuses[-1]["done"] == statuses[-1]["total"] == 60
        done = [s["done"] for s in statuses]
        assert done == sorted(done), done  # progress never goes back
        states = [order.index(s["state"]) for s in statuses]
        assert states == sorted(states), [s["state"] for s in statuses]
        device = statuses[-1]["devices"][0]
        assert device["device_key"] == "fake_a" and device["failed"] == 0 and device["eta_s"] == 0.0


def test_each_device_type_is_measured_on_its_own_replicas(ray_cluster, service):
    info, root = service
    client = ServiceClient(info.url, TOKEN)
    cs = configs(24, in_hw=9)
    final = follow(client, client.submit({"configs": rows(cs)})["id"], [])
    assert final["state"] == "done" and final["total"] == 3 * len(cs)
    nodes = {**ray_cluster.type_nodes, cpu_device(1).key: [ray_cluster.head_id]}
    types = {t["name"]: t for t in client.devices()["types"]}
    assert set(types) == set(nodes)
    for name, t in types.items():
        for replica in t["replicas"]:
            # ran_on is what the replica read from its own runtime context
            assert replica["ran_on"] == replica["node_id"] and replica["node_id"] in nodes[name], (name, replica)
        assert len(t["replicas"]) == len(nodes[name])
        assert TableStore(str(root)).measured_keys(t["device_key"]) >= {c.key for c in cs}
    assert all(r["chunks"] > 0 for r in types["FAKE_A"]["replicas"])  # the type's work is split over both


def test_cancel_stops_a_job_and_keeps_what_was_measured(service):
    info, root = service
    client = ServiceClient(info.url, TOKEN)
    cs = configs(80, in_hw=10)
    job = client.submit({"configs": rows(cs), "devices": "FAKE_B"})
    deadline = time.monotonic() + 60
    while client.status(job["id"])["done"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelled = client.cancel(job["id"])
    assert cancelled["state"] == "cancelled"
    time.sleep(2.5)  # the chunk in flight comes back and is written
    kept = TableStore(str(root)).measured_keys("fake_b") & {c.key for c in cs}
    assert 0 < len(kept) < len(cs)
    time.sleep(1.5)
    assert TableStore(str(root)).measured_keys("fake_b") & {c.key for c in cs} == kept  # nothing more measured
    assert client.status(job["id"])["state"] == "cancelled"
    assert sorted(raw_keys(root, "fake_b")) == sorted(set(raw_keys(root, "fake_b")))


def test_writes_need_the_token_and_reads_do_not(service):
    info, _ = service
    body = json.dumps({"model": "resnet20"}).encode()
    for token in (None, "wrong"):
        status, headers, answer = http("POST", f"{info.url}/v1/jobs", body, token)
        assert status == 401 and "Bearer" in answer["error"]["message"] and headers.get("www-authenticate", headers.get("WWW-Authenticate"))
        assert http("DELETE", f"{info.url}/v1/jobs/x", None, token)[0] == 401
        assert http("POST", f"{info.url}/v1/measure", body, token)[0] == 401
    status, _, answer = http("GET", f"{info.url}/v1/devices")
    assert status == 200 and {t["name"] for t in answer["types"]} >= {"FAKE_A", "FAKE_B"}


@pytest.mark.parametrize("body, words", [
    (b"{not json", "not valid JSON"),
    (b'{"model": "resnet20", "batch": "sixteen"}', "'batch'"),
    (b'{"model": "resnet20", "colour": "red"}', "'colour'"),
    (b'{"model": "no_such_model"}', "no_such_model"),
    (b'{"model": "resnet20", "devices": "H100"}', "H100"),
    (b'{"model": "resnet20", "threads": 7}', "thread"),
])
def test_malformed_jobs_answer_400_saying_what_is_wrong(service, body, words):
    info, _ = service
    status, _, answer = http("POST", f"{info.url}/v1/jobs", body, TOKEN)
    assert status == 400 and words in answer["error"]["message"], answer


def test_a_full_queue_answers_429_with_a_retry_hint(service):
    info, _ = service
    client = ServiceClient(info.url, TOKEN)
    first = client.submit({"configs": rows(configs(100, in_hw=11)), "devices": "FAKE_B"})
    with pytest.raises(ServiceError) as err:
        client.submit({"configs": rows(configs(100, in_hw=11, start=100)), "devices": "FAKE_B"})
    assert err.value.status == 429 and err.value.retry_after_s >= 1 and "queue is full" in str(err.value)
    assert client.cancel(first["id"])["state"] == "cancelled"
    with pytest.raises(ServiceError) as err:  # a job that could never fit is malformed, not "later"
        client.submit({"configs": rows(configs(QUEUE_LIMIT + 1, in_hw=11, start=200)), "devices": "FAKE_B"})
    assert err.value.status == 400 and "--queue-limit" in str(err.value)
    assert http("GET", f"{info.url}/v1/jobs/no-such-job")[0] == 404


def test_lookup_predict_measure_and_download(service, tmp_path):
    info, root = service
    client = ServiceClient(info.url, TOKEN)
    final = follow(client, client.submit({"model": "resnet20", "devices": "FAKE_B", "dtype": "fp32"})["id"], [])
    assert final["state"] == "done"
    table = TableStore(str(root)).read("fake_b")
    known = table.keys()[:3]
    answer = client.lookup("FAKE_B", keys=known + ["no-such-key"])
    assert answer["device_key"] == "fake_b" and answer["missing"] == ["no-such-key"]
    assert answer["latency_ms"] == {k: table.lookup_key(k) for k in known}

    dense = client.predict("fake_b", "resnet20", {}, dtype="fp32", memory_format="nhwc")
    narrow = client.predict("fake_b", "resnet20", {"layer3.0.conv1": 16, "layer3.1.conv1": 16}, dtype="fp32",
                            memory_format="nhwc")
    assert narrow["predicted_ms"] < dense["predicted_ms"] == pytest.approx(dense["dense_ms"])
    with pytest.raises(ServiceError) as err:
        client.predict("fake_b", "resnet20", {"nope": 8}, dtype="fp32", memory_format="nhwc")
    assert err.value.status == 400 and "layer3.0.conv1" in str(err.value)
    with pytest.raises(ServiceError) as err:  # the cancel test left nchw rows beside resnet20's nhwc ones
        client.predict("fake_b", "resnet20", {})
    assert err.value.status == 404 and "several settings" in str(err.value)

    small = client.measure("FAKE_B", "resnet20", {"layer3.0.conv1": 16}, dtype="fp32", rounds=1, quick=True)
    full = client.measure("FAKE_B", "resnet20", {}, dtype="fp32", rounds=1, quick=True)
    assert small["fake"] and small["device_key"] == "fake_b" and small["measured_ms"] > 0
    assert small["params"] < full["params"]

    path = client.download_table("FAKE_B", str(tmp_path / "copy"))
    copy = TableStore(str(tmp_path / "copy")).read("fake_b")
    assert path.endswith(".parquet") and sorted(copy.keys()) == sorted(table.keys())
    assert all(copy.lookup_key(k) == table.lookup_key(k) for k in known)
    assert TableStore(str(tmp_path / "copy")).merge_from(str(tmp_path / "copy")) == 0


def test_the_cli_profiles_and_reads_tables_through_the_service(service, monkeypatch, capsys):
    from fleetprune.api.serve import remote_measure
    from fleetprune.cli import main

    info, root = service
    monkeypatch.setenv("FLEETPRUNE_TOKEN", TOKEN)
    assert main(["profile", "resnet20", "--batch", "2", "--devices", "FAKE_B", "--dtype", "fp32",
                 "--service", info.url]) == 0
    out = capsys.readouterr().out
    assert ": done" in out and "FAKE_B" in out
    needed = int(out.split("fake_b")[1].split("/")[1].split()[0])
    assert main(["tables", "ls", "--service", info.url]) == 0
    assert "fake_b" in capsys.readouterr().out
    assert main(["tables", "show", "fake_b", "--limit", "0", "--service", info.url]) == 0
    shown = capsys.readouterr().out
    assert len(shown.splitlines()) >= needed  # one line per row, plus the header
    ms = remote_measure(info.url, "fake_b", model="resnet20", widths={"layer2.0.conv1": 16}, dtype="fp32",
                        quick=True, rounds=1)
    assert ms > 0
    monkeypatch.delenv("FLEETPRUNE_TOKEN")
    assert main(["profile", "resnet20", "--devices", "FAKE_B", "--service", info.url]) == 2
    assert "token" in capsys.readouterr().err


def test_prune_verifies_a_device_through_the_service(service, tmp_path, monkeypatch):
    """`prune --service URL`: a device that is not this machine is measured on the service's replica of
    its type, the variant beside the dense model in one request (side by side). The fake service times
    on this node's CPU, so only structure is asserted."""
    from fleetprune.api import prune

    info, root = service
    monkeypatch.setenv("FLEETPRUNE_TOKEN", TOKEN)
    client = ServiceClient(info.url, TOKEN)
    job = client.submit({"model": "resnet20", "batch": 2, "devices": "FAKE_B", "dtype": "fp32"})
    assert follow(client, job["id"], [])["state"] == "done"
    [r] = prune("resnet20", tables=str(root), devices="fake_b", budget=0.95, steps=2, batch=2, dtype="fp32",
                memory_format="nhwc", out=tmp_path / "v", service=info.url, verify_rounds=2)
    v = r.report["verification"]
    assert v["measured_on"]["via"] == f"service {info.url}" and v["measured_on"]["device_key"] == "fake_b"
    assert v["rounds"] and v["rounds"][-1]["final"] and r.measured_ms == v["rounds"][-1]["measured_ms"] > 0
    for rd in v["rounds"]:
        assert rd["share"] == pytest.approx(rd["measured_ms"] / (0.95 * rd["dense_measured_ms"]))
    assert r.verification in ("met", "over", "under")


def test_a_replica_killed_mid_chunk_has_its_chunk_retried_on_another_of_its_type(service):
    info, root = service
    client = ServiceClient(info.url, TOKEN)
    cs = configs(100, in_hw=12)
    job = client.submit({"configs": rows(cs), "devices": "FAKE_A"})
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        fake_a = next(t for t in client.devices()["types"] if t["name"] == "FAKE_A")
        victim = next((r for r in fake_a["replicas"] if r["state"] == "busy" and r["chunks"] >= 1), None)
    assert victim is not None
    os.kill(victim["pid"], signal.SIGKILL)
    final = follow(client, job["id"], [])
    assert final["state"] == "done" and final["done"] == len(cs)
    assert sorted(k for k in raw_keys(root, "fake_a") if k in {c.key for c in cs}) == sorted(c.key for c in cs)
    fake_a = next(t for t in client.devices()["types"] if t["name"] == "FAKE_A")
    assert fake_a["retried_chunks"] >= 1
