"""`fleetprune profile` end to end: the embedded default, resuming after a kill, and bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fleetprune.api.profile import plan_configs
from fleetprune.cli import main
from fleetprune.profiler import cpu_device
from fleetprune.tables import TableStore

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleetprune", *args]


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``: a CLI run started with its own session."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def wait_session_gone(sid: int, timeout_s: float = 30) -> list[int]:
    deadline = time.time() + timeout_s
    while (left := session_pids(sid)) and time.time() < deadline:
        time.sleep(0.5)
    return left


def kill_session(sid: int) -> None:
    """Kill what is left of a run this test started (by pid; Ray's agents outlive a SIGKILLed driver)."""
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def part_files(root: Path) -> list[Path]:
    return sorted(root.glob("device_key=*/part-*.parquet"))


def raw_keys(root: Path) -> list[str]:
    return [k for f in part_files(root) for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()]


@pytest.mark.ray
def test_the_embedded_default_profiles_this_cpu_and_shuts_ray_down(tmp_path):
    """No --ray-address: Ray starts on this machine, measures its CPU, stops; a rerun measures nothing."""
    root = tmp_path / "tables"
    args = cli("profile", "resnet20", "--quick", "--round-to", "64", "--threads", "1", "--tables", str(root))
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert not wait_session_gone(proc.pid), "Ray processes outlived the run"
    finally:
        kill_session(proc.pid)
    key = cpu_device(1).key
    expected = {c.key for c in plan_configs("resnet20", round_to=64)}
    assert TableStore(str(root)).measured_keys(key) == expected
    assert sorted(raw_keys(root)) == sorted(expected)
    assert out.splitlines()[1].split()[:5] == [key, key, str(len(expected)), str(len(expected)), "0"]
    assert "Traceback" not in err
    files = part_files(root)

    again = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "nothing to measure" in again.stdout
    assert part_files(root) == files


def _kill_midway_and_resume(tmp_path: Path, extra: list[str]) -> None:
    root = tmp_path / "tables"
    args = cli("profile", "resnet20", "--backend", "fake:0.1", "--chunk-size", "2", "--threads", "1",
               "--tables", str(root), *extra)
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(part_files(root)) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_session(proc.pid)
    first = part_files(root)
    kept = raw_keys(root)
    assert len(first) >= 3 and len(kept) == 2 * len(first)  # whole chunks only: atomic part files

    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    expected = {c.key for c in plan_configs("resnet20")}
    keys = raw_keys(root)
    assert sorted(keys) == sorted(expected)  # complete, and nothing measured twice
    assert set(first) <= set(part_files(root))  # what the killed run wrote is still there
    measured_now = int(done.stdout.splitlines()[1].split()[3])
    assert measured_now == len(expected) - len(kept)


def test_a_run_killed_midway_resumes_without_losing_anything(tmp_path):
    """In-process (no Ray): SIGKILL after a few chunks, rerun: complete, no row twice."""
    _kill_midway_and_resume(tmp_path, ["--ray-address", "none"])


@pytest.mark.ray
@pytest.mark.slow
def test_an_embedded_ray_run_killed_midway_resumes_without_losing_anything(tmp_path):
    _kill_midway_and_resume(tmp_path, [])


@pytest.mark.ray
@pytest.mark.slow
def test_a_cluster_without_a_usable_device_is_a_clear_error(tmp_path):
    """Embedded Ray on this machine, but more threads asked than it has CPUs."""
    proc = subprocess.Popen(cli("profile", "resnet20", "--threads", "999", "--tables", str(tmp_path)), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
        assert not wait_session_gone(proc.pid), "Ray processes outlived the run"
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 2
    assert err.startswith("error: this machine has no usable device to profile") and "fewer than --threads 999" in err
    assert "Traceback" not in err and not part_files(tmp_path)


def test_an_unknown_model_is_refused_before_anything_starts(tmp_path, capsys):
    assert main(["profile", "resnet2000", "--tables", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'resnet2000'") and "resnet20" in err and "Traceback" not in err


def test_an_unreachable_address_fails_fast(tmp_path, capsys):
    started = time.perf_counter()
    assert main(["profile", "resnet20", "--ray-address", "127.0.0.1:1", "--tables", str(tmp_path)]) == 2
    assert time.perf_counter() - started < 60  # planning the model included; connecting is the fast part
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach a Ray cluster at 127.0.0.1:1") and "Traceback" not in err


def test_an_unknown_device_type_lists_the_known_ones(tmp_path, capsys):
    argv = ["profile", "resnet20", "--ray-address", "none", "--devices", "H100", "--tables", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown device type 'H100' on this machine") and cpu_device(2).key.rsplit("-t", 1)[0] in err
    assert "Traceback" not in err


@pytest.mark.ray
def test_an_unknown_device_type_on_a_cluster_lists_its_types(ray_cluster, tmp_path, capsys):
    argv = ["profile", "resnet20", "--ray-address", ray_cluster.address, "--devices", "H100", "--tables", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown device type 'H100'" in err and "FAKE_A" in err and "FAKE_B" in err and "Traceback" not in err


def test_failed_configurations_make_a_nonzero_exit_after_the_summary(tmp_path, capsys, monkeypatch):
    """A run that could not measure everything prints what it did, then says to rerun."""
    from fleetprune.cluster import work

    real = work.measure_chunk

    def half_fails(backend, configs, **kw):
        result = real(backend, configs[1:], **kw)
        result.failures.append((configs[0].key, "ProfileError: cannot build"))
        return result

    monkeypatch.setattr(work, "measure_chunk", half_fails)
    monkeypatch.setattr("fleetprune.cluster.local.measure_chunk", half_fails)
    argv = ["profile", "resnet20", "--ray-address", "none", "--backend", "fake", "--chunk-size", "4",
            "--tables", str(tmp_path)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "failed on" in captured.out and "cannot build" in captured.out
    assert "rerun the same command" in captured.err and "Traceback" not in captured.err


def test_input_size_classes_and_choices_profile_what_prune_will_ask_for(tmp_path, capsys):
    """A table profiled with --input-size/--num-classes/--max-choices holds exactly the plan prune builds
    with the same options, and a bad size is refused with the form it takes."""
    root = str(tmp_path / "t")
    argv = ["profile", "resnet18", "--ray-address", "none", "--backend", "fake", "--threads", "1",
            "--input-size", "48", "--num-classes", "10", "--max-choices", "4", "--round-to", "32",
            "--tables", root]
    assert main(argv) == 0
    [dev] = TableStore(root).devices()
    want = plan_configs("resnet18", input_size=48, num_classes=10, max_choices=4, round_to=32)
    assert TableStore(root).measured_keys(dev.device_key) == {c.key for c in want}
    assert {c.in_h for c in want if c.op == "conv"} >= {48, 12, 6} and 224 not in {c.in_h for c in want}
    assert any(c.op == "linear" and c.cout == 10 for c in want)
    default = plan_configs("resnet18", round_to=32)
    assert len(want) < len(default)  # 4 choices per group, not up to 32

    assert main(["profile", "resnet18", "--ray-address", "none", "--backend", "fake", "--input-size", "48x",
                 "--tables", root]) == 2
    assert "--input-size must be H or HxW" in capsys.readouterr().err


def test_timing_cache_cold_is_recorded_in_the_tables_protocol(tmp_path, capsys):
    from fleetprune.tables import TableStore

    root = str(tmp_path / "tables")
    assert main(["profile", "resnet20", "--quick", "--timing-cache", "cold", "--ray-address", "none", "--threads", "1",
                 "--max-choices", "2", "--round-to", "32", "--tables", root]) == 0
    store = TableStore(root)
    [device] = store.devices()
    assert store.read(device.device_key).provenance["timing_protocol"]["cache"] == "cold"
