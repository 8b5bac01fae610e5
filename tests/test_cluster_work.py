"""The Ray-free parts of the cluster package: picking device types, chunks, retries, the in-process runner."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from fleetprune.cluster.devices import DeviceType, Fleet, NodeInfo, select_types
from fleetprune.cluster.local import profile_local
from fleetprune.cluster.spec import BackendSpec
from fleetprune.cluster.summary import DeviceRun
from fleetprune.cluster.work import Ledger, chunk_size_for, make_chunks, measure_chunk, todo_configs
from fleetprune.errors import DeviceError, ProfileError
from fleetprune.profiler import FakeTimingBackend, fake_device
from fleetprune.tables import LayerConfig, TableStore

NODE = NodeInfo("n1", "10.0.0.1", cpus=8, gpus=2)
FLEET = Fleet(
    (
        DeviceType("H100", "cuda", (NODE,), key="cuda-nvidia-h100-80gb-hbm3", label="NVIDIA H100 80GB HBM3"),
        DeviceType("cpu-amd-epyc-t8", "cpu", (NodeInfo("n2", "10.0.0.2", 8, 0),), key="cpu-amd-epyc-t8", threads=8),
    ),
    address="10.0.0.1:6379",
)


def configs(n: int = 24) -> list[LayerConfig]:
    return [LayerConfig("conv", cin=8 * (1 + i % 6), cout=8 * (1 + i // 6), kh=3, kw=3, ph=1, pw=1, in_h=8, in_w=8)
            for i in range(n)]


def test_device_types_are_picked_by_name_key_or_kind():
    assert [t.name for t in select_types(FLEET, "all")] == ["H100", "cpu-amd-epyc-t8"]
    assert [t.name for t in select_types(FLEET, "h100")] == ["H100"]
    assert [t.name for t in select_types(FLEET, "cuda-nvidia-h100-80gb-hbm3")] == ["H100"]
    assert [t.name for t in select_types(FLEET, "cpu")] == ["cpu-amd-epyc-t8"]
    assert [t.name for t in select_types(FLEET, ["gpu", "cpu-amd-epyc-t8"])] == ["H100", "cpu-amd-epyc-t8"]


def test_an_unknown_device_type_lists_the_known_ones():
    with pytest.raises(DeviceError) as err:
        select_types(FLEET, "H100,A100")
    message = str(err.value)
    assert "'A100'" in message and "H100" in message and "cpu-amd-epyc-t8" in message and "10.0.0.1:6379" in message


def test_a_fleet_without_devices_is_a_clear_error():
    empty = Fleet((), ((NodeInfo("n9", "10.0.0.9", 0, 0), "declares no CPUs"),), address="10.0.0.1:6379")
    with pytest.raises(DeviceError, match="no usable device.*declares no CPUs"):
        select_types(empty, "all")


def test_a_gpu_type_counts_one_slot_per_gpu():
    assert FLEET.types[0].slots == 2 and FLEET.types[1].slots == 1


def test_chunks_cover_every_configuration_once_in_a_seeded_order():
    cs = configs(50)
    size = chunk_size_for(len(cs), workers=3)
    assert size == 5  # about 4 chunks per worker
    chunks = make_chunks(cs, size, seed=1)
    keys = [c.key for ch in chunks for c in ch.configs]
    assert sorted(keys) == sorted(c.key for c in cs) and len(keys) == len(set(keys))
    assert keys == [c.key for ch in make_chunks(cs, size, seed=1) for c in ch.configs]
    assert chunk_size_for(10_000, workers=1) == 32 and chunk_size_for(3, workers=8) == 1


def test_measured_and_duplicate_configurations_are_skipped():
    cs = configs(6)
    todo = todo_configs(cs + cs[:2], {cs[0].key})
    assert [c.key for c in todo] == [c.key for c in cs[1:]]


def test_a_lost_chunk_is_retried_then_failed_and_pending_work_fails_when_no_actor_is_left():
    events = []
    run = DeviceRun("fake-x", "X", "cpu", total=6)
    ledger = Ledger(run, make_chunks(configs(6), 2), events.append)
    chunk = ledger.take()
    ledger.lost(chunk, "actor died", max_retries=1)
    assert run.retried_chunks == 1 and ledger.pending[0] is chunk  # goes back first
    assert ledger.take() is chunk
    ledger.lost(chunk, "actor died", max_retries=1)
    assert run.failed == 2 and "gave up after 2 attempts" in run.failures[0].reason
    ledger.fail_pending("no actor of X is left")
    assert run.failed == 6 and ledger.finished
    assert events[-1].done == events[-1].total == 6


class _Breaks(FakeTimingBackend):
    """A fake backend that cannot build one configuration."""

    def __init__(self, bad_key: str):
        super().__init__(fake_device("fake-breaks", "breaks"))
        self.bad_key = bad_key

    def measure(self, config):
        if config.key == self.bad_key:
            raise ProfileError(f"configuration {config.key}: unsupported")
        return super().measure(config)


def test_one_failing_configuration_costs_only_itself():
    cs = configs(8)
    result = measure_chunk(_Breaks(cs[3].key), cs, seed=0)
    assert sorted(r["key"] for r in result.rows) == sorted(c.key for c in cs if c is not cs[3])
    assert [k for k, _ in result.failures] == [cs[3].key]
    assert "unsupported" in result.failures[0][1]


def test_in_process_profiling_streams_chunks_and_resumes(tmp_path):
    """`--ray-address none`: each chunk is one part file; a rerun measures nothing."""
    store = TableStore(tmp_path / "tables")
    cs = configs(24)
    events = []
    summary = profile_local(cs, store, backend=BackendSpec.fake(), chunk_size=5, progress=events.append)
    (run,) = summary.devices
    assert run.device_key.startswith("fake-cpu-") and run.measured == 24 and summary.ok
    files = sorted((tmp_path / "tables" / f"device_key={run.device_key}").glob("part-*.parquet"))
    assert len(files) == 5  # ceil(24 / 5) chunks, one atomic part file each
    assert sum(pq.read_metadata(f).num_rows for f in files) == 24
    assert store.measured_keys(run.device_key) == {c.key for c in cs}
    assert [e.done for e in events] == [0, 5, 10, 15, 20, 24]
    again = profile_local(cs, store, backend=BackendSpec.fake())
    assert again.measured == 0 and again.devices[0].skipped == 24
    assert len(list((tmp_path / "tables" / f"device_key={run.device_key}").glob("part-*.parquet"))) == 5


def test_in_process_profiling_of_an_unknown_device_type_is_refused(tmp_path):
    with pytest.raises(DeviceError, match="unknown device type 'tpu-v9'"):
        profile_local(configs(2), TableStore(tmp_path), devices="tpu-v9", backend=BackendSpec.fake())


def test_the_summary_formats_one_line_per_device_and_the_failures():
    run = DeviceRun("fake-x", "X", "cpu", total=4, measured=3)
    ledger = Ledger(run, make_chunks(configs(1), 1))
    ledger.fail_pending("no actor of X is left")
    from fleetprune.cluster.summary import RunSummary

    text = RunSummary("tables", "local", [run], seconds=2.0).format()
    assert "fake-x" in text and "no actor of X is left" in text and text.splitlines()[1].split()[3] == "3"


def test_a_ledger_counts_rows_of_another_statistic_as_missing(tmp_path):
    from fleetprune.cluster.work import open_ledger
    from fleetprune.profiler import TimingProtocol
    from fleetprune.tables import make_row

    configs = [LayerConfig("conv", c, c, 3, 3, 1, 1, 1, 1, 1, 1, 8, 8) for c in (8, 16, 24)]
    store = TableStore(tmp_path)
    store.write("cpu-x-t1", [make_row(configs[0], "cpu-x-t1", 1.0, 0.9, 1.1, 5)],
                {"timing_protocol": {"repeats": 5}})  # a median row (older protocol)
    assert BackendSpec.torch().statistic == "min" and BackendSpec.fake().statistic is None
    assert BackendSpec.torch(TimingProtocol(statistic="median")).statistic == "median"

    def ledger(statistic):
        return open_ledger(store, configs, key="cpu-x-t1", device_type="x", kind="cpu", label="x", workers=1,
                           chunk_size=None, seed=0, progress=None, statistic=statistic)

    assert ledger("min").run.skipped == 0  # the median row is measured again under the minimum
    assert ledger("median").run.skipped == 1
    assert ledger(None).run.skipped == 1
