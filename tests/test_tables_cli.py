"""``fleetprune tables ls|show|validate|merge|diff``: exit codes and what they print."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from fleetprune.cli import main
from fleetprune.tables import LayerConfig, TableStore, make_row

A, B = "cpu-a-t2", "cuda-b"


def conv(c: int) -> LayerConfig:
    return LayerConfig("conv", c, c, 3, 3, 1, 1, 1, 1, 1, 1, 8, 8)


@pytest.fixture
def root(tmp_path) -> Path:
    store = TableStore(tmp_path / "tables")
    convs = [conv(c) for c in (16, 32, 48)]
    store.write(A, [make_row(c, A, c.cin / 10, c.cin / 11, c.cin / 9, 5) for c in convs]
                + [make_row(LayerConfig("linear", 64, 10, act="none"), A, 0.05, 0.04, 0.06, 5),
                   make_row(conv(64), A, 6.4, 6.0, 7.0, 5)],
                {"device_name": "Test EPYC", "torch": "2.14.1", "threads": 2})
    store.write(B, [make_row(c, B, c.cin / 40, c.cin / 44, c.cin / 36, 5) for c in convs],
                {"device_name": "NVIDIA H100", "torch": "2.11.0", "cuda": "12.8", "correction": [1.1, 0.0]})
    return tmp_path / "tables"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["tables", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ls_lists_devices_with_rows_and_provenance(root, capsys):
    code, out, _ = run(capsys, "ls", "--tables", str(root))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "ROWS", "FILES"]
    row_a = next(line for line in lines if line.startswith(A))
    row_b = next(line for line in lines if line.startswith(B))
    assert row_a.split()[1] == "5" and "Test EPYC" in row_a and "2.14.1" in row_a
    assert row_b.split()[1] == "3" and "12.8" in row_b and row_b.rstrip().endswith("yes")


def test_ls_reports_an_unreadable_file_and_goes_on(root, capsys):
    bad = root / f"device_key={A}" / "part-zz-bad.parquet"
    bad.write_bytes(b"garbage")
    code, out, _ = run(capsys, "ls", "--tables", str(root))
    assert code == 0
    assert B in out and str(bad) in out and "fleetprune tables validate" in out


def test_show_filters_and_limits(root, capsys):
    code, out, _ = run(capsys, "show", A, "--tables", str(root), "--op", "conv", "--limit", "2")
    assert code == 0
    body = [line for line in out.splitlines()[1:] if line.startswith("conv")]
    assert [line.split()[11] for line in body] == ["16", "32"]  # CIN column, smallest first
    assert "2 of 4 matching rows shown (5 in the table)" in out
    code, out, _ = run(capsys, "show", A, "--tables", str(root), "--op", "linear")
    assert code == 0 and "linear" in out and "1 of 1 matching rows" in out and "conv " not in out


def test_show_unknown_device_exits_2_naming_known_ones(root, capsys):
    code, out, err = run(capsys, "show", "cpu-nope", "--tables", str(root))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and A in err and B in err


def test_validate_exit_codes(root, capsys):
    code, out, _ = run(capsys, "validate", "--tables", str(root))
    assert code == 0 and "ok: 2 device(s), 8 configurations, no defects" in out
    path = TableStore(root).write(A, [make_row(conv(80), A, math.nan, 1, 2, 5)], {})
    code, out, _ = run(capsys, "validate", "--tables", str(root))
    assert code == 1
    assert f"{A}: {path}: bad_latency" in out and "1 defect(s) in 1 file(s)" in out


def test_diff_prints_common_configs_with_ratio_and_summary(root, capsys):
    code, out, _ = run(capsys, "diff", A, B, "--tables", str(root))
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.startswith("conv|")]
    assert [r[0] for r in rows] == [conv(c).key for c in (16, 32, 48)]
    assert all(r[3] == "0.250" for r in rows)
    assert rows[0][1] == "1.6000" and rows[0][2] == "0.4000"
    assert f"common configurations: 3 (3 shown); only in {A}: 2; only in {B}: 0" in out
    assert f"latency ratio {B}/{A}: median 0.250" in out


def test_merge_then_read_back(root, tmp_path, capsys):
    dst = tmp_path / "merged"
    code, out, _ = run(capsys, "merge", str(root), "--tables", str(dst))
    assert code == 0 and "copied 8 row(s)" in out
    code, out, _ = run(capsys, "merge", str(root), "--tables", str(dst))
    assert code == 0 and "copied 0 row(s)" in out
    assert {s.device_key: s.rows for s in TableStore(dst).devices()} == {A: 5, B: 3}


def test_a_missing_or_bad_root_is_a_clear_error(tmp_path, capsys):
    code, _, err = run(capsys, "ls", "--tables", str(tmp_path / "nowhere"))
    assert code == 2 and "no table root" in err
    code, _, err = run(capsys, "validate", "--tables", "nosuchscheme://x/y")
    assert code == 2 and "Unrecognized filesystem" in err


def test_console_script_prints_the_error_without_a_traceback(root):
    script = Path(sys.executable).with_name("fleetprune")
    proc = subprocess.run([str(script), "tables", "show", "cpu-nope", "--tables", str(root)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no latency table for device 'cpu-nope'")
    assert "Traceback" not in proc.stderr
