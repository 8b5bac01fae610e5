"""`fleetprune prune` end to end on fake device tables: several targets, reports, and bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fleetprune import models
from fleetprune.cli import main
from fleetprune.tables import TableStore

from prune_tables import compute_bound_ms, fake_tables, plan_configs, write_table

MODEL = "resnet20"


def _prune(tables: str, out, *extra: str, device: str = "all", budget: str = "0.7", steps: str = "3") -> int:
    return main(["prune", MODEL, "--tables", tables, "--device", device, "--budget", budget, "--steps", steps,
                 "--round-to", "8", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """One run for two fake devices, shared by the tests that only read its output."""
    out = tmp_path_factory.mktemp("variants")
    assert _prune(fake_tables(), out) == 0
    return out


def test_one_command_gives_one_variant_per_device_with_different_widths(pruned, capsys):
    summary = json.loads((pruned / "summary.json").read_text())
    keys = [d["device_key"] for d in summary["devices"]]
    assert keys == ["fake-compute", "fake-memory"]
    widths = {k: json.loads((pruned / k / "widths.json").read_text())["widths"] for k in keys}
    assert widths["fake-compute"] != widths["fake-memory"]
    for k in keys:
        assert sorted(os.listdir(pruned / k)) == ["model.ts", "report.json", "weights.pt", "widths.json"]
    assert not [p for p in os.listdir(pruned) if p.startswith(".")], "no temporary folder left behind"


def test_report_records_schedule_prediction_and_fixed_part(pruned):
    for key in ("fake-compute", "fake-memory"):
        r = json.loads((pruned / key / "report.json").read_text())
        assert r["predicted_ms"] <= r["budget_ms"] + 1e-9
        assert r["budget_ms"] == pytest.approx(0.7 * r["dense_ms"])
        assert r["measured_ms"] is None  # a fake device is never this machine
        assert r["fixed_ms"] == 0.0 and r["fixed_source"] == "table rows only"
        assert [s["step"] for s in r["steps"]] == [1, 2, 3]
        targets = [s["target_ms"] for s in r["steps"]]
        assert targets == sorted(targets, reverse=True) and targets[-1] == pytest.approx(r["budget_ms"])
        assert targets[0] == pytest.approx(r["dense_ms"] ** (2 / 3) * r["budget_ms"] ** (1 / 3))
        for s in r["steps"]:
            assert s["predicted_ms"] <= s["target_ms"] + 1e-9
            assert s["solver_time_s"] >= 0
        # widths only shrink from step to step
        for a, b in zip(r["steps"], r["steps"][1:]):
            assert all(b["widths"][g] <= a["widths"][g] for g in a["widths"])
        assert r["widths"] == r["steps"][-1]["widths"]
        assert r["method"] == "sp_lamp" and r["solver"] == "dp"


def test_summary_line_per_device_is_printed(tmp_path, capsys):
    assert _prune(fake_tables(), tmp_path / "v", device="fake-memory", steps="1") == 0
    out = capsys.readouterr().out
    assert "fake-memory" in out and "predicted" in out and "fake-compute" not in out


def test_budget_below_the_minimum_names_the_minimum(tmp_path, capsys):
    assert _prune(fake_tables(), tmp_path / "v", device="fake-compute", budget="0.05") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "smallest latency" in err and "Traceback" not in err
    minimum = float(err.split("reach there: ")[1].split(" ms")[0])
    assert minimum > 0
    assert not (tmp_path / "v").exists()


def test_unknown_device_lists_the_known_ones(tmp_path, capsys):
    assert _prune(fake_tables(), tmp_path / "v", device="cuda-nvidia-h100") == 2
    err = capsys.readouterr().err
    assert "cuda-nvidia-h100" in err and "fake-compute" in err and "fake-memory" in err


@pytest.mark.parametrize("flag, value, what", [("--batch", "8", "batch 8"), ("--dtype", "bf16", "bf16"),
                                               ("--memory-format", "nhwc", "nhwc")])
def test_a_table_of_another_setting_says_what_it_has(tmp_path, capsys, flag, value, what):
    assert _prune(fake_tables(), tmp_path / "v", flag, value, device="fake-compute") == 2
    err = capsys.readouterr().err
    assert what in err and "batch 1 fp32 nchw" in err and "fleetprune profile" in err


def test_missing_configurations_are_listed_with_the_profile_command(tmp_path, capsys):
    root = str(tmp_path / "tables")
    configs = plan_configs(MODEL)
    write_table(root, "fake-partial", configs[: len(configs) // 2], compute_bound_ms)
    assert _prune(root, tmp_path / "v", device="fake-partial") == 2
    err = capsys.readouterr().err
    assert f"lacks {len(configs) - len(configs) // 2} layer configurations" in err
    assert "conv|b1|fp32|nchw" in err
    assert f"fleetprune profile {MODEL} --tables {root} --devices fake-partial --batch 1 --dtype fp32" in err


def test_a_model_with_a_layer_the_pruner_cannot_handle(tmp_path, capsys):
    rc = main(["prune", "swin_t", "--num-classes", "10", "--input-size", "32", "--tables", fake_tables(),
               "--device", "fake-compute", "--budget", "0.7", "--out", str(tmp_path / "v")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "relative_position_bias_table" in err and "cannot prune" in err


def test_weights_that_do_not_fit(tmp_path, capsys):
    ckpt = tmp_path / "resnet32.pt"
    torch.save(models.create("resnet32").state_dict(), ckpt)
    assert _prune(fake_tables(), tmp_path / "v", "--weights", str(ckpt), device="fake-compute") == 2
    err = capsys.readouterr().err
    assert "do not fit" in err and "unexpected" in err


def test_weights_that_fit_are_pruned(tmp_path):
    torch.manual_seed(3)
    dense = models.create(MODEL)
    ckpt = tmp_path / "dense.pt"
    torch.save(dense.state_dict(), ckpt)
    assert _prune(fake_tables(), tmp_path / "v", "--weights", str(ckpt), device="fake-compute", steps="1") == 0
    pruned = torch.load(tmp_path / "v" / "fake-compute" / "weights.pt", weights_only=True)
    # the stem keeps a subset of the checkpoint's filters, not fresh random ones
    stem = pruned["conv1.weight"]
    rows = dense.state_dict()["conv1.weight"].flatten(1)
    assert all(any(torch.equal(r, d) for d in rows) for r in stem.flatten(1))


def test_a_non_empty_out_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "v"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _prune(fake_tables(), out, device="fake-compute", steps="1") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert _prune(fake_tables(), out, "--overwrite", device="fake-compute", steps="1") == 0
    first = (out / "fake-compute" / "weights.pt").stat().st_mtime_ns
    assert _prune(fake_tables(), out, "--overwrite", device="fake-memory", steps="1") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [d["device_key"] for d in summary["devices"]] == ["fake-compute", "fake-memory"]
    assert (out / "fake-compute" / "weights.pt").stat().st_mtime_ns == first  # other devices untouched
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_budget_text_and_steps(tmp_path, capsys):
    assert _prune(fake_tables(), tmp_path / "v", budget="fast") == 2
    assert "cannot read the budget" in capsys.readouterr().err
    assert _prune(fake_tables(), tmp_path / "v", steps="0") == 2
    assert "at least 1" in capsys.readouterr().err


def test_no_table_root(tmp_path, capsys):
    assert _prune(str(tmp_path / "nothing"), tmp_path / "v") == 2
    err = capsys.readouterr().err
    assert "fleetprune profile" in err
    assert TableStore(str(tmp_path / "nothing")).exists() is False


def test_a_validate_correction_for_this_model_sets_the_fixed_part(tmp_path):
    from fleetprune.api import prune

    root = str(tmp_path / "t")
    write_table(root, "fake-corr", plan_configs(MODEL), compute_bound_ms)
    store = TableStore(root)
    [plain] = prune(MODEL, tables=root, devices="fake-corr", budget="0.7", out=tmp_path / "v0", steps=1, round_to=8)
    assert plain.fixed_ms == 0.0 and plain.fixed_source == "table rows only"
    store.set_correction("fake-corr", {"a": 1.5, "b": 0.4, "model": MODEL, "input_shape": [3, 32, 32], "batch": 1,
                                       "dtype": "fp32", "memory_format": "nchw"})
    [res] = prune(MODEL, tables=root, devices="fake-corr", budget="0.7", out=tmp_path / "v1", steps=1, round_to=8)
    assert res.fixed_ms == pytest.approx(0.4) and res.fixed_source.startswith("fitted correction")
    assert res.dense_ms == pytest.approx(1.5 * plain.dense_ms + 0.4)
    assert res.report["correction"] == [1.5, 0.4]
    # a correction fitted for another model is ignored
    store.set_correction("fake-corr", {"a": 1.5, "b": 0.4, "model": "resnet56"})
    [res] = prune(MODEL, tables=root, devices="fake-corr", budget="0.7", out=tmp_path / "v2", steps=1, round_to=8)
    assert res.fixed_source == "table rows only" and res.dense_ms == pytest.approx(plain.dense_ms)


def test_coupled_reduce_is_recorded_and_rejected_for_other_methods(tmp_path, capsys):
    assert _prune(fake_tables(), tmp_path / "v", "--coupled-reduce", "balanced", device="fake-compute",
                  steps="1") == 0
    r = json.loads((tmp_path / "v" / "fake-compute" / "report.json").read_text())
    assert r["importance"] == {"name": "sp_lamp", "fold_bn": True, "coupled_reduce": "balanced",
                               "include_consumers": False}
    assert _prune(fake_tables(), tmp_path / "w", "--coupled-reduce", "balanced", "--method", "l1",
                  device="fake-compute") == 2
    err = capsys.readouterr().err
    assert "coupled_reduce" in err and "'l1'" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_default_importance_is_sp_lamp_per_layer(pruned):
    r = json.loads((pruned / "fake-compute" / "report.json").read_text())
    assert r["importance"]["name"] == "sp_lamp" and r["importance"]["coupled_reduce"] == "per_layer"
