"""Profiling on the simulated heterogeneous cluster: placement, one table per type, split, loss and recovery."""

from __future__ import annotations

import os
import signal
import time

import pyarrow.parquet as pq
import pytest

from fleetprune.cli import main
from fleetprune.cluster.run import profile_fleet
from fleetprune.cluster.spec import BackendSpec
from fleetprune.errors import DeviceError
from fleetprune.profiler import cpu_device
from fleetprune.tables import LayerConfig, TableStore

pytestmark = pytest.mark.ray

COST_S = 0.05  # fake seconds per configuration: long enough to overlap, short enough for CI


def configs(n: int, in_hw: int = 8) -> list[LayerConfig]:
    """``n`` distinct conv configurations (``in_hw`` keeps the sets of different tests apart)."""
    return [LayerConfig("conv", cin=8 * (1 + i % 8), cout=8 * (1 + i // 8), kh=3, kw=3, ph=1, pw=1,
                        in_h=in_hw, in_w=in_hw) for i in range(n)]


def raw_keys(root, device_key: str) -> list[str]:
    """Every row's key in every part file of a device (duplicates kept)."""
    keys: list[str] = []
    for f in sorted((root / f"device_key={device_key}").glob("part-*.parquet")):
        keys.extend(pq.read_table(f, columns=["key"]).column("key").to_pylist())
    return keys


@pytest.fixture(scope="module")
def first_run(ray_cluster, tmp_path_factory):
    """One run over every type of the cluster (its actors are the expensive part, so tests share it)."""
    root = tmp_path_factory.mktemp("fleet") / "tables"
    cs = configs(48)
    events = []
    summary = profile_fleet(cs, str(root), backend=BackendSpec.fake(COST_S), progress=events.append)
    return root, cs, summary, events


def test_each_actor_lands_on_a_node_of_its_type(ray_cluster, first_run):
    _, _, summary, _ = first_run
    expected = {**ray_cluster.type_nodes, cpu_device(1).key: [ray_cluster.head_id]}
    seen = set()
    for run in summary.devices:
        for actor in run.actors:
            # node_id is what the actor read from its own runtime context.
            assert actor.node_id in expected[run.device_type], (run.device_type, actor)
            assert actor.state == "finished" and actor.error is None
            seen.add(actor.node_id)
    assert len(seen) == 4  # one actor per simulated GPU, one on the CPU-only head


def test_each_device_type_gets_its_own_complete_table(first_run):
    root, cs, summary, _ = first_run
    store = TableStore(str(root))
    cpu_key = "fake-" + cpu_device(1).key
    assert {d.device_key for d in store.devices()} == {"fake_a", "fake_b", cpu_key}
    assert [d.device_type for d in summary.devices] == ["FAKE_A", "FAKE_B", cpu_device(1).key]
    for key in ("fake_a", "fake_b", cpu_key):
        assert store.measured_keys(key) == {c.key for c in cs}
        assert sorted(raw_keys(root, key)) == sorted(c.key for c in cs)  # each measured once
        assert store.read(key).provenance["fingerprint"]["fake"] is True
    assert summary.ok and summary.measured == 3 * len(cs)


def test_the_work_of_a_type_is_split_across_both_of_its_nodes(ray_cluster, first_run):
    _, cs, summary, events = first_run
    run = summary.device("FAKE_A")
    assert len(run.actors) == 2
    assert {a.node_id for a in run.actors} == set(ray_cluster.type_nodes["FAKE_A"])
    assert all(a.chunks > 0 for a in run.actors), [(a.node_id[:8], a.chunks) for a in run.actors]
    assert sum(a.rows for a in run.actors) == len(cs)
    # Progress: per type, done grows to the total, one event per chunk written.
    done = [e.done for e in events if e.device_type == "FAKE_A"]
    assert done == sorted(done) and done[0] == 0 and done[-1] == len(cs)
    assert len(done) - 1 == sum(a.chunks for a in run.actors)


def test_a_rerun_measures_nothing_and_starts_no_actor(first_run):
    root, cs, _, _ = first_run
    started = time.perf_counter()
    again = profile_fleet(cs, str(root), backend=BackendSpec.fake(COST_S))
    assert again.measured == 0 and again.ok
    assert all(d.skipped == d.total == len(cs) and not d.actors for d in again.devices)
    assert time.perf_counter() - started < 30  # probing the CPU node only


def test_a_node_removed_mid_run_loses_no_row(ray_cluster, tmp_path):
    import ray

    victim = ray_cluster.add_gpu_node("FAKE_A")
    # Enough chunks that work is still queued when the victim (the last actor to start) reports its
    # first one; with too few, the others can drain the queue and the victim just finishes.
    cs = configs(180, in_hw=12)
    root = tmp_path / "tables"
    removed = []

    def remove_victim(event):
        # The victim has just been handed its next chunk: removing the node now loses that chunk.
        if event.node_id == victim and not removed:
            ray_cluster.remove(victim)
            removed.append(time.perf_counter())

    try:
        summary = profile_fleet(cs, str(root), devices="FAKE_A", backend=BackendSpec.fake(COST_S),
                                progress=remove_victim)
    finally:
        deadline = time.time() + 60  # let the cluster mark the node dead before other tests discover
        while time.time() < deadline and any(n["NodeID"] == victim and n["Alive"] for n in ray.nodes()):
            time.sleep(0.5)
    assert removed, "the victim node never returned a chunk"
    run = summary.device("FAKE_A")
    states = {a.node_id: a.state for a in run.actors}
    assert states[victim] == "died" and len(states) == 3
    assert run.retried_chunks >= 1
    assert summary.ok and run.measured == len(cs)
    keys = raw_keys(root, "fake_a")
    assert sorted(keys) == sorted(c.key for c in cs)  # nothing lost, nothing measured twice
    again = profile_fleet(cs, str(root), devices="FAKE_A", backend=BackendSpec.fake())
    assert again.measured == 0 and sorted(raw_keys(root, "fake_a")) == sorted(keys)


def test_when_every_actor_of_a_type_dies_its_remaining_work_is_reported_and_a_rerun_finishes_it(tmp_path):
    cs = configs(40, in_hw=10)
    root = tmp_path / "tables"
    killed = []

    def kill_actor(event):
        if event.pid and not killed:
            os.kill(event.pid, signal.SIGKILL)
            killed.append(event.pid)

    summary = profile_fleet(cs, str(root), devices="FAKE_B", backend=BackendSpec.fake(COST_S), progress=kill_actor)
    run = summary.device("FAKE_B")
    assert killed and not summary.ok
    assert run.actors[0].state == "died"
    assert run.measured > 0 and run.measured + run.failed == len(cs)
    assert any("no actor of FAKE_B is left" in f.reason for f in run.failures)
    assert len(raw_keys(root, "fake_b")) == run.measured
    assert "failed on FAKE_B" in summary.format()
    again = profile_fleet(cs, str(root), devices="FAKE_B", backend=BackendSpec.fake())
    assert again.ok and again.measured == run.failed
    assert sorted(raw_keys(root, "fake_b")) == sorted(c.key for c in cs)


def test_real_timing_on_simulated_gpus_is_no_usable_device(ray_cluster, tmp_path, capsys):
    """The torch backend cannot time a node without a real GPU: a clear error, exit 2, no traceback."""
    argv = ["profile", "resnet20", "--ray-address", ray_cluster.address, "--devices", "FAKE_B", "--quick",
            "--tables", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no usable device") and "CUDA" in err and "FAKE_B" in err
    assert "Traceback" not in err and not list(tmp_path.glob("device_key=*"))


def test_an_unknown_device_type_lists_the_cluster_types(ray_cluster, tmp_path):
    with pytest.raises(DeviceError) as err:
        profile_fleet(configs(4), str(tmp_path), devices="FAKE_A,H100", backend=BackendSpec.fake())
    message = str(err.value)
    assert "'H100'" in message and "FAKE_A" in message and "FAKE_B" in message and ray_cluster.address in message


def test_the_profile_cli_on_a_cluster_profiles_gpus_in_fp16(ray_cluster, tmp_path, capsys):
    """`fleetprune profile MODEL --ray-address ADDR --devices TYPE`: default dtype fp16 on a GPU type."""
    root = tmp_path / "tables"
    argv = ["profile", "resnet20", "--ray-address", ray_cluster.address, "--devices", "FAKE_B",
            "--tables", str(root), "--backend", "fake"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:2] == ["FAKE_B", "fake_b"]
    table = TableStore(str(root)).read("fake_b")
    configs_in_table = table.configs()
    assert {c.dtype for c in configs_in_table} == {"fp16"} and {c.memory_format for c in configs_in_table} == {"nhwc"}
    assert {c.cout % 8 for c in configs_in_table if c.op == "conv"} == {0}
    assert main(argv) == 0
    assert "nothing to measure" in capsys.readouterr().out
