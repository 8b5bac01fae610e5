"""Bad input to ``fleetprune report``: a ReportError that says what to do, exit 2, no report written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetprune.cli import main
from fleetprune.errors import ReportError
from fleetprune.report import write_report

from report_fixtures import TABLE_DEVICES, VARIANT_DEVICES, make_tables, make_variants


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _cli_error(["report", str(tmp_path)], capsys)
    assert "is empty" in err and "fleetprune prune --out" in err
    assert not (tmp_path / "report.html").exists()


def test_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _cli_error(["report", str(tmp_path / "nope")], capsys)
    assert "is not a folder" in err


def test_neither_variants_nor_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    err = _cli_error(["report", str(tmp_path)], capsys)
    assert "neither a variants folder" in err and "device_key=" in err
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("missing", ["report.json", "widths.json", "folder"])
def test_variant_with_one_device_incomplete(tmp_path: Path, missing: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_variants(tmp_path / "v")
    device = root / VARIANT_DEVICES[1]
    if missing == "folder":
        for f in device.iterdir():
            f.unlink()
        device.rmdir()
    else:
        (device / missing).unlink()
    with pytest.raises(ReportError, match=VARIANT_DEVICES[1]):
        write_report(root)
    err = _cli_error(["report", str(root)], capsys)
    assert "incomplete" in err and "--devices" in err
    assert not (root / "report.html").exists()
    if missing == "folder":  # leaving the broken device out is the way forward the message names
        assert main(["report", str(root), "--devices", VARIANT_DEVICES[0]]) == 0


def test_variants_without_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_variants(tmp_path / "v")
    (root / "summary.json").unlink()
    err = _cli_error(["report", str(root)], capsys)
    assert "no summary.json" in err


def test_corrupt_report_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_variants(tmp_path / "v")
    (root / VARIANT_DEVICES[0] / "report.json").write_text("{not json")
    err = _cli_error(["report", str(root)], capsys)
    assert "report.json" in err and "rerun `fleetprune prune`" in err


def test_unknown_device_and_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_tables(tmp_path / "t")
    err = _cli_error(["report", str(root), "--devices", "tpu-x"], capsys)
    assert "tpu-x" in err and TABLE_DEVICES[0] in err
    err = _cli_error(["report", str(root), "--layer", "op=linear"], capsys)  # only on one device
    assert "--layer" in err and "every selected device" in err
    err = _cli_error(["report", str(root), "--layer", "colour=red"], capsys)
    assert "no column 'colour'" in err
    assert not (root / "report.html").exists()


def test_bad_validation_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_tables(tmp_path / "t", validation=False)
    (root / "validation.parquet").write_text(json.dumps({"not": "parquet"}))
    err = _cli_error(["report", str(root)], capsys)
    assert "validation.parquet" in err and "fleetprune validate" in err
