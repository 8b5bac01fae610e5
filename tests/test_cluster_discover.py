"""Discovering the device types of the simulated cluster, and `fleetprune fleet` printing them."""

from __future__ import annotations

import pytest

from fleetprune.cli import main
from fleetprune.cluster.discover import discover
from fleetprune.errors import DeviceError
from fleetprune.profiler import cpu_device

pytestmark = pytest.mark.ray


def test_gpu_types_come_from_accelerator_types_and_cpu_nodes_from_their_cpu(ray_cluster):
    fleet = discover(probe_gpus=False)
    by_name = {t.name: t for t in fleet.types}
    a, b = by_name["FAKE_A"], by_name["FAKE_B"]
    assert a.kind == b.kind == "cuda"
    assert {n.node_id for n in a.nodes} == set(ray_cluster.type_nodes["FAKE_A"]) and a.slots == 2
    assert {n.node_id for n in b.nodes} == set(ray_cluster.type_nodes["FAKE_B"]) and b.slots == 1
    # The head node has no GPU: a CPU type keyed as the profiler keys that node's CPU.
    cpu_key = cpu_device(1).key
    cpu = by_name[cpu_key]
    assert cpu.kind == "cpu" and cpu.key == cpu_key and cpu.threads == 1
    assert [n.node_id for n in cpu.nodes] == [ray_cluster.head_id]
    assert fleet.names()[:2] == ["FAKE_A", "FAKE_B"]  # GPU types first


def test_cpu_nodes_with_fewer_cpus_than_threads_are_unusable(ray_cluster):
    fleet = discover(threads=4, probe_gpus=False)
    assert all(t.kind == "cuda" for t in fleet.types)
    assert [(n.node_id, why) for n, why in fleet.unusable] == [(ray_cluster.head_id, "has 1 CPUs, fewer than --threads 4")]


def test_fleet_prints_each_type_with_its_nodes(ray_cluster, capsys):
    assert main(["fleet", "--ray-address", ray_cluster.address]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"the Ray cluster at {ray_cluster.address}: 3 device type(s) on 4 node(s)")
    a_line = next(ln for ln in lines if ln.startswith("FAKE_A"))
    assert "GPU" in a_line and "2 node(s), 2 GPU(s)" in a_line
    for node_id in ray_cluster.type_nodes["FAKE_A"]:
        assert f"node {node_id[:8]}" in out
    cpu_line = next(ln for ln in lines if ln.startswith(cpu_device(1).key))
    assert "CPU" in cpu_line and "1 node(s), 1 CPU(s)" in cpu_line


def test_fleet_with_an_unreachable_address_is_an_error_not_a_traceback(capsys):
    assert main(["fleet", "--ray-address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach a Ray cluster at 127.0.0.1:1") and "Traceback" not in err


def test_the_known_types_are_listed_for_an_unknown_one(ray_cluster):
    from fleetprune.cluster.devices import select_types

    with pytest.raises(DeviceError) as err:
        select_types(discover(probe_gpus=False), "FAKE_C")
    assert "'FAKE_C'" in str(err.value) and "FAKE_A" in str(err.value) and "FAKE_B" in str(err.value)
