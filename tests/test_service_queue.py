"""The service's plain parts without Ray: the shared queue, the job journal, request checks."""

from __future__ import annotations

import json

import pytest

from fleetprune.cluster.service.jobs import DeviceProgress, Job, Journal
from fleetprune.cluster.service.queue import DeviceQueue
from fleetprune.cluster.service.requests import (
    QueueFullError, RequestError, http_status, job_from_dict, parse_job, parse_lookup, parse_network,
)
from fleetprune.cluster.work import ChunkResult
from fleetprune.tables import LayerConfig


def configs(n: int, start: int = 0) -> list[LayerConfig]:
    return [LayerConfig("conv", cin=8 * (1 + i % 8), cout=8 * (1 + i // 8), kh=3, kw=3, ph=1, pw=1, in_h=6, in_w=6)
            for i in range(start, start + n)]


def rows_for(chunk) -> ChunkResult:  # noqa: ANN001
    return ChunkResult([{"key": c.key} for c in chunk.configs])


def drain(queue: DeviceQueue) -> list[str]:
    keys: list[str] = []
    while (chunk := queue.take()) is not None:
        keys.extend(c.key for c in chunk.configs)
        queue.returned(chunk, rows_for(chunk))
    return keys


def test_overlapping_jobs_queue_each_configuration_once_and_both_hear_of_it():
    q = DeviceQueue("dev", "T", "cpu", workers=2)
    a, b = configs(20), configs(20, start=10)  # 10 shared
    assert q.add("A", a, measured=set()) == 20
    assert q.add("B", b, measured={configs(1, start=29)[0].key}) == 9  # 10 shared, 1 already in the table
    chunk = q.take()
    done, failed = q.returned(chunk, rows_for(chunk))
    shared = {c.key for c in chunk.configs} & {c.key for c in b}
    assert not failed and all(shared <= done.get(j, set()) for j in ("A", "B") if shared)
    keys = [c.key for c in chunk.configs] + drain(q)
    assert sorted(keys) == sorted({c.key for c in a + b} - {configs(1, start=29)[0].key})
    assert len(q) == 0 and q.ledger.finished


def test_cancel_drops_only_what_no_other_job_waits_for():
    q = DeviceQueue("dev", "T", "cpu")
    q.add("A", configs(10), set())
    q.add("B", configs(4), set())
    assert q.cancel("A") == 6
    assert sorted(drain(q)) == sorted(c.key for c in configs(4))


def test_a_lost_chunk_is_retried_first_then_failed_for_its_jobs():
    q = DeviceQueue("dev", "T", "cpu", chunk_size=5)
    q.add("A", configs(10), set())
    chunk = q.take()
    assert q.lost(chunk, "replica died", max_retries=1) == {}
    again = q.take()
    assert [c.key for c in again.configs] == [c.key for c in chunk.configs]
    failed = q.lost(again, "replica died", max_retries=1)
    assert set(failed["A"]) == {c.key for c in chunk.configs} and "gave up" in next(iter(failed["A"].values()))
    assert q.ledger.run.retried_chunks == 1


def test_a_job_ends_failed_when_a_configuration_failed_and_done_otherwise():
    job = Job("j", parse_job({"model": "m"}))
    job.devices["d"] = DeviceProgress("d", "T", {"a", "b"}, done={"a"})
    assert not job.check_complete() and job.state == "queued"
    job.devices["d"].failed["b"] = "boom"
    assert job.check_complete() and job.state == "failed" and "retry" in job.message
    job.finish("done")
    assert job.state == "failed"  # final states never move


def test_the_journal_replays_unfinished_jobs_and_skips_a_torn_line(tmp_path):
    journal = Journal(str(tmp_path))
    spec = parse_job({"model": "resnet20", "batch": 16, "devices": ["FAKE_A", "FAKE_B"]})
    journal.append({"op": "submit", "id": "1", "at": "t1", "job": spec.to_dict()})
    journal.append({"op": "submit", "id": "2", "at": "t2", "job": spec.to_dict()})
    journal.append({"op": "end", "id": "2", "at": "t3", "state": "done", "message": "", "status": {}})
    journal.append({"op": "submit", "id": "3", "at": "t4", "job": spec.to_dict()})
    journal.append({"op": "cancel", "id": "3", "at": "t5"})
    with open(journal.path, "a") as f:
        f.write('{"op": "submit", "id": "4", "jo')  # a killed writer
    resume, history = journal.replay()
    assert [(i, at) for i, _, at in resume] == [("1", "t1")]
    assert job_from_dict(resume[0][1]) == spec
    assert {i: h["state"] for i, h in history.items()} == {"2": "done", "3": "cancelled"}
    assert journal.path.startswith(str(tmp_path / "_service"))


@pytest.mark.parametrize("body, field", [
    ("x", "JSON object"),
    ({"model": "resnet20", "bacth": 2}, "'bacth'"),
    ({"model": "resnet20", "batch": "16"}, "'batch'"),
    ({"model": "resnet20", "batch": 0}, "'batch'"),
    ({"model": "resnet20", "batch": True}, "'batch'"),
    ({"model": "resnet20", "dtype": "fp64"}, "'dtype'"),
    ({"model": "resnet20", "configs": [{}]}, "exactly one"),
    ({}, "exactly one"),
    ({"configs": [{"op": "conv", "cin": 8}]}, "'cout'"),
    ({"configs": [{"op": "pool", "cin": 8, "cout": 8}]}, "configs[0]"),
    ({"model": "resnet20", "input_size": [0, 3]}, "'input_size'"),
    ({"model": "resnet20", "devices": 3}, "'devices'"),
])
def test_a_malformed_job_names_what_is_wrong(body, field):
    with pytest.raises(RequestError) as err:
        parse_job(body)
    assert field in str(err.value) and http_status(err.value) == 400


def test_lookup_and_network_bodies():
    device, parsed, keys = parse_lookup({"device": "fake_a", "configs": [c.to_row() for c in configs(2)]})
    assert device == "fake_a" and keys == [c.key for c in configs(2)] == [c.key for c in parsed]
    with pytest.raises(RequestError, match="'keys'"):
        parse_lookup({"device": "fake_a", "keys": [1]})
    body = parse_network({"device": "fake_a", "model": "resnet20", "widths": {"layer1.0.conv1": 8}}, "a measurement")
    assert body["widths"] == {"layer1.0.conv1": 8} and body["rounds"] == 3
    with pytest.raises(RequestError, match="'widths'"):
        parse_network({"device": "fake_a", "model": "resnet20", "widths": {"g": 0}}, "a measurement")
    assert http_status(QueueFullError("full", 3)) == 429
    assert json.loads(json.dumps(parse_job({"model": "resnet20", "input_size": "64x48"}).to_dict()))["input_size"] == [64, 48]
