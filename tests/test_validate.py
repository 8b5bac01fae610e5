"""``fleetprune validate``: rows whose figures recompute, a stored correction, and the errors users hit."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from fleetprune.api.validate import draw_widths, fidelity, fit_correction, validate
from fleetprune.cli import main
from fleetprune.errors import DeviceError, FleetpruneError, MissingConfigsError
from fleetprune.profiler import (
    Measurement,
    TimingProtocol,
    TorchTimingBackend,
    cpu_device,
    profile_configs,
    provenance,
)

from fleetprune.pruner.export import module_widths
from fleetprune.pruner.latency import LatencyModel
from fleetprune.pruner.plan import build_plan
from fleetprune.pruner.variant import example_input
from fleetprune.tables import TableStore
from fleetprune.tables.schema import read_provenance

# the module; ``fleetprune.api.validate`` is the verb of the same name
vmod = importlib.import_module("fleetprune.api.validate")

SHAPE = (3, 16, 16)
FORMAT = "nhwc"
VARIANTS = 6
OTHER = "cpu-some-other-chip-t1"


class Tiny(nn.Module):
    """Stem 3->32, body 32->48 (stride 2), linear head: two prunable groups, 11 configurations."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(32, 48, 3, 2, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.body(self.stem(x))), 1))


def tiny_plan():
    return build_plan(Tiny(), example_input(SHAPE), round_to=16, memory_format=FORMAT)


@pytest.fixture(scope="module")
def device():
    # One thread: on a loaded 2-core machine two threads wait on each other and times explode.
    return cpu_device(1)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, device):
    """A real (quick) table of this CPU covering every configuration of the tiny model's plan."""
    protocol = TimingProtocol.quick()
    rows = list(profile_configs(tiny_plan().configs(), TorchTimingBackend(device, protocol)))
    root = tmp_path_factory.mktemp("validate") / "tables"
    TableStore(root).write(device.key, rows, provenance(device, protocol))
    return root, rows


@pytest.fixture(scope="module")
def run(profiled, device):
    root, _ = profiled
    summary = validate("tiny", str(root), device.key, variants=VARIANTS, model_factory=Tiny,
                       input_shape=SHAPE, protocol=TimingProtocol.quick())
    return root, summary


def _frame(root) -> pd.DataFrame:
    return pd.read_parquet(root / "validation.parquet")


def test_rows_are_written_and_the_figures_recompute_from_them(run, device):
    root, s = run
    df = _frame(root)
    df = df[df["run_id"] == s.run_id].sort_values("variant")
    assert len(df) == VARIANTS + 1
    assert df["dense"].tolist() == [True] + [False] * VARIANTS
    assert set(df["device_key"]) == {device.key} and set(df["model"]) == {"tiny"}
    assert set(df["input_shape"]) == {"3x16x16"} and set(df["memory_format"]) == {FORMAT}
    np.testing.assert_allclose(df["rel_error"], (df["predicted_ms"] - df["measured_ms"]) / df["measured_ms"])
    np.testing.assert_allclose(df["predicted_ms"], df["layer_sum_ms"] + df["fixed_ms"])
    assert set(df["statistic"]) == {"min"}  # the table's protocol (quick) takes the fastest block
    np.testing.assert_allclose(df["measured_ms"], df["measured_min_ms"])
    assert (df["measured_min_ms"] <= df["measured_p10_ms"]).all()
    assert (df["measured_p10_ms"] <= df["measured_median_ms"]).all()
    assert (df["measured_median_ms"] <= df["measured_p90_ms"]).all()

    varied = df[~df["dense"]]
    before = fidelity(varied["predicted_ms"], varied["measured_ms"])
    for k in ("n", "within_5", "within_10", "median_abs_error", "bias", "spearman"):
        assert getattr(s, k) == pytest.approx(before[k], nan_ok=True), k
    # The figures are what they claim to be, not just consistent with themselves.
    rel = (varied["predicted_ms"] - varied["measured_ms"]) / varied["measured_ms"]
    assert s.within_10 == pytest.approx(float((rel.abs() <= 0.10).mean()))
    assert s.bias == pytest.approx(float(rel.median()))
    assert s.raw == pytest.approx(fidelity(varied["layer_sum_ms"], varied["measured_ms"]), nan_ok=True)

    held = varied[~varied["calibration"]]
    assert len(held) == VARIANTS - vmod.calibration_count(VARIANTS) > 0
    assert s.after == pytest.approx(fidelity(held["corrected_ms"], held["measured_ms"]), nan_ok=True)
    assert s.held_out_before == pytest.approx(fidelity(held["predicted_ms"], held["measured_ms"]), nan_ok=True)


def test_rows_carry_the_tables_provenance(run, device):
    root, s = run
    part = pq.read_schema(s.path)
    prov = read_provenance(part)
    assert prov["device_key"] == device.key
    assert prov["timing_protocol"] == TimingProtocol.quick().to_dict()
    assert prov["fingerprint"]["cpu_model"] == device.fingerprint["cpu_model"]


def test_the_fitted_correction_is_stored_and_read_back(run, device):
    root, s = run
    df = _frame(root)
    calib = df[(df["run_id"] == s.run_id) & df["calibration"]].sort_values("variant")
    assert calib["variant"].tolist() == list(range(vmod.calibration_count(VARIANTS) + 1))  # dense + first k
    refit = fit_correction(calib["layer_sum_ms"], calib["measured_ms"])
    assert (s.correction["a"], s.correction["b"]) == pytest.approx((refit["a"], refit["b"]))

    df_run = df[df["run_id"] == s.run_id]
    np.testing.assert_allclose(df_run["corrected_ms"], s.correction["a"] * df_run["layer_sum_ms"] + s.correction["b"])
    table = TableStore(root).read(device.key)
    assert len(table) == len(tiny_plan().configs())  # the correction part adds no rows
    # Real timings on a busy machine can give a slope <= 0, or a fit that predicts the held-out
    # networks worse than the table does; neither is stored (see the tests below).
    worse = s.after["median_abs_error"] > s.held_out_before["median_abs_error"]
    assert s.correction_stored == (s.correction["a"] > 0 and not worse)
    if s.correction_stored:
        assert table.correction == pytest.approx((s.correction["a"], s.correction["b"]))
        stored = table.provenance["correction"]
        assert stored["model"] == "tiny" and stored["input_shape"] == list(SHAPE)
        assert (stored["batch"], stored["dtype"], stored["memory_format"]) == (1, "fp32", FORMAT)
    else:
        assert not s.correction_stored and table.correction is None


def _copy_table(profiled, tmp_path, device):
    """A table of this device whose latencies are a fixed function of each configuration's MACs, so the
    tests that script the measurements never depend on what this machine's timings happen to be (a
    real table on another CPU model can order the random plans differently)."""
    from fleetprune.tables import LayerConfig, make_row

    root = tmp_path / "tables"
    rows = []
    for row in profiled[1]:
        config = LayerConfig.from_row(row)
        ms = 0.02 + config.macs / 5e7
        rows.append(make_row(config, device.key, ms, 0.99 * ms, 1.01 * ms, 15, minimum=ms, latency=ms))
    TableStore(root).write(device.key, rows, provenance(device, TimingProtocol.quick()))
    return root


def _linear_measurements(monkeypatch, root, device, a: float, b: float) -> None:
    """End-to-end 'measurements' that are exactly a * layer_sum + b of the network's actual widths."""
    plan = tiny_plan()
    lm = LatencyModel(plan, TableStore(root).read(device.key))

    def measure(net, shape, dev, dtype, memory_format, protocol, **_):
        assert dev.key == device.key and tuple(shape) == (1, *SHAPE) and memory_format == FORMAT
        ms = a * lm.layer_sum(module_widths(net, plan)) + b
        return Measurement(1.01 * ms, ms, 1.02 * ms, 5, min_ms=ms)  # the table's protocol takes the min

    monkeypatch.setattr(vmod, "measure_model", measure)


def test_a_known_offset_and_scale_are_fitted_stored_and_read_back(profiled, tmp_path, device, monkeypatch):
    root = _copy_table(profiled, tmp_path, device)
    _linear_measurements(monkeypatch, root, device, a=1.25, b=0.4)
    s = validate("tiny", str(root), device.key, variants=8, model_factory=Tiny, input_shape=SHAPE)
    assert (s.correction["a"], s.correction["b"]) == pytest.approx((1.25, 0.4))
    assert s.correction["n"] == 1 + vmod.calibration_count(8)
    assert s.correction_stored
    assert TableStore(root).read(device.key).correction == pytest.approx((1.25, 0.4))
    assert s.after["median_abs_error"] == pytest.approx(0.0, abs=1e-9) and s.after["within_5"] == 1.0
    assert s.after["n"] == 8 - vmod.calibration_count(8)
    # Before the correction only the dense model anchors the offset, so a scale shows as an error of
    # 0.25 * (dense layer sum - layer sum) / measured on every held-out variant.
    df = _frame(root)
    held = df[~df["dense"] & ~df["calibration"]]
    dense_sum = float(df.loc[df["dense"], "layer_sum_ms"].iloc[0])
    expected = 0.25 * (dense_sum - held["layer_sum_ms"]) / (1.25 * held["layer_sum_ms"] + 0.4)
    np.testing.assert_allclose(held["rel_error"], expected, atol=1e-9)


def test_a_slope_that_is_not_positive_is_not_stored(profiled, tmp_path, device, monkeypatch, caplog):
    root = _copy_table(profiled, tmp_path, device)
    _linear_measurements(monkeypatch, root, device, a=-0.5, b=50.0)
    s = validate("tiny", str(root), device.key, variants=4, model_factory=Tiny, input_shape=SHAPE)
    assert s.correction["a"] == pytest.approx(-0.5) and not s.correction_stored
    assert TableStore(root).read(device.key).correction is None
    assert "not stored" in caplog.text


def test_a_fit_that_predicts_held_out_networks_worse_is_not_stored(profiled, tmp_path, device, monkeypatch, caplog):
    """The table plus the dense model's fixed part is exact, but the calibration networks ran 10% slow
    (as if disturbed): the fit would skew every prediction, so it is reported and not stored."""
    root = _copy_table(profiled, tmp_path, device)
    plan = tiny_plan()
    lm = LatencyModel(plan, TableStore(root).read(device.key))
    calls = []
    variants = 8

    def measure(net, shape, dev, dtype, memory_format, protocol, **_):
        calls.append(1)
        ms = lm.layer_sum(module_widths(net, plan)) + 0.2
        if 1 < len(calls) <= 1 + vmod.calibration_count(variants):  # the calibration variants, not the dense
            ms *= 1.1
        return Measurement(1.01 * ms, ms, 1.02 * ms, 5, min_ms=ms)

    monkeypatch.setattr(vmod, "measure_model", measure)
    s = validate("tiny", str(root), device.key, variants=variants, model_factory=Tiny, input_shape=SHAPE, passes=1)
    assert s.held_out_before["median_abs_error"] == pytest.approx(0.0, abs=1e-9)
    assert s.after["median_abs_error"] > 0.01
    assert not s.correction_stored and "raises the held-out median" in s.correction_note
    assert TableStore(root).read(device.key).correction is None
    assert "not stored" in caplog.text


def test_a_network_measured_slow_in_one_pass_keeps_its_fastest_pass(profiled, tmp_path, device, monkeypatch):
    root = _copy_table(profiled, tmp_path, device)
    plan = tiny_plan()
    lm = LatencyModel(plan, TableStore(root).read(device.key))
    calls = []

    def measure(net, shape, dev, dtype, memory_format, protocol, **_):
        calls.append(1)
        ms = 1.25 * lm.layer_sum(module_widths(net, plan)) + 0.4
        if len(calls) in (1, 12):  # pass 1: the dense model was disturbed; pass 2: variant 2
            ms *= 1.5
        return Measurement(1.01 * ms, ms, 1.02 * ms, 5, min_ms=ms)

    monkeypatch.setattr(vmod, "measure_model", measure)
    s = validate("tiny", str(root), device.key, variants=8, model_factory=Tiny, input_shape=SHAPE)
    assert len(calls) == 2 * 9  # every network in each of the two passes
    dense_sum = lm.layer_sum(plan.dense_widths())
    assert s.dense_measured_ms == pytest.approx(1.25 * dense_sum + 0.4)
    assert (s.correction["a"], s.correction["b"]) == pytest.approx((1.25, 0.4))
    frame = _frame(root)
    dense_row = frame.query("dense").iloc[0]
    assert dense_row["measured_ms"] == pytest.approx(1.25 * dense_sum + 0.4)
    # every row, variant 2 included, is the undisturbed pass: the line fits exactly
    assert (frame["measured_ms"] - (1.25 * frame["layer_sum_ms"] + 0.4)).abs().max() < 1e-9
    with pytest.raises(FleetpruneError, match="passes"):
        validate("tiny", str(root), device.key, variants=1, model_factory=Tiny, input_shape=SHAPE, passes=0)


def test_a_second_run_appends_with_the_same_columns(run, device):
    root, first = run
    s = validate("tiny", str(root), device.key, variants=1, model_factory=Tiny, input_shape=SHAPE,
                 protocol=TimingProtocol.quick(), fit=False, seed=1)
    df = _frame(root)
    assert set(df["run_id"]) >= {first.run_id, s.run_id}
    mine = df[df["run_id"] == s.run_id]
    assert len(mine) == 2 and mine["corrected_ms"].isna().all() and not mine["calibration"].any()
    assert s.correction is None and s.after is None
    # Without a fit the table keeps what the earlier run stored.
    kept = (first.correction["a"], first.correction["b"]) if first.correction_stored else None
    assert TableStore(root).read(device.key).correction == (pytest.approx(kept) if kept else None)


def test_a_table_of_another_device_is_refused(profiled, tmp_path, device):
    _, rows = profiled
    root = tmp_path / "tables"
    prov = dict(provenance(device, TimingProtocol.quick()), device_key=OTHER)
    TableStore(root).write(OTHER, [dict(r, device_key=OTHER) for r in rows], prov)
    with pytest.raises(DeviceError, match="not one of its devices"):
        validate("tiny", str(root), OTHER, variants=2, model_factory=Tiny, input_shape=SHAPE)
    assert not (root / "validation.parquet").exists()


def test_missing_configurations_fail_before_anything_is_measured(profiled, tmp_path, device, monkeypatch):
    _, rows = profiled
    dropped = sorted(r["key"] for r in rows if r["op"] == "linear")
    root = tmp_path / "tables"
    TableStore(root).write(device.key, [r for r in rows if r["key"] not in dropped],
                           provenance(device, TimingProtocol.quick()))

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured although configurations are missing")

    monkeypatch.setattr(vmod, "measure_model", no_measuring)
    with pytest.raises(MissingConfigsError) as err:
        validate("tiny", str(root), device.key, variants=4, model_factory=Tiny, input_shape=SHAPE)
    assert set(err.value.missing) <= set(dropped) and err.value.missing
    assert f"fleetprune profile tiny --tables {root} --devices {device.key}" in str(err.value)
    assert not (root / "validation.parquet").exists()
    assert TableStore(root).read(device.key).correction is None


def test_cli_prints_the_error_and_exits_2(profiled, tmp_path, device, capsys):
    _, rows = profiled
    root = tmp_path / "tables"
    prov = dict(provenance(device, TimingProtocol.quick()), device_key=OTHER)
    TableStore(root).write(OTHER, [dict(r, device_key=OTHER) for r in rows], prov)
    code = main(["validate", "resnet20", "--tables", str(root), "--device", OTHER, "--variants", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: validate measures on this machine, but the table's device '{OTHER}'" in err
    assert "Traceback" not in err

    code = main(["validate", "resnet20", "--tables", str(root), "--device", "cpu-nowhere-t9"])
    err = capsys.readouterr().err
    assert code == 2 and "no latency table for device 'cpu-nowhere-t9'" in err and OTHER in err


def test_fidelity_figures_on_known_numbers():
    f = fidelity([1.0, 2.18, 2.73, 4.0], [1.0, 2.0, 3.0, 5.0])  # errors 0, +9%, -9%, -20%
    assert f["n"] == 4
    assert f["within_5"] == 0.25 and f["within_10"] == pytest.approx(0.75)
    assert f["median_abs_error"] == pytest.approx(0.09)
    assert f["bias"] == pytest.approx(-0.045)
    assert f["spearman"] == pytest.approx(1.0)
    assert math.isnan(fidelity([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["spearman"])


def test_fit_correction_recovers_a_line():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    fit = fit_correction(x, 1.3 * x + 0.25)
    assert (fit["a"], fit["b"], fit["n"]) == pytest.approx((1.3, 0.25, 4))


def test_random_width_plans_are_valid_spread_and_repeatable():
    plan = tiny_plan()
    plans = draw_widths(plan, 12, seed=3)
    assert plans == draw_widths(plan, 12, seed=3)
    assert plans[0] == plan.dense_widths() and len(plans) == 13
    for w in plans:
        assert all(w[g.name] in g.choices for g in plan.groups)
    body = {w[plan.layer("body.0").out_group] for w in plans[1:]}
    assert len(body) >= 2  # not every plan is the same shrink


def test_cli_max_choices_matches_the_table_it_was_profiled_with(tmp_path, capsys, monkeypatch):
    """A table profiled with --max-choices 2 validates with --max-choices 2; with the default (32) the
    plans need widths the table lacks, and the error says so before anything is measured."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    root = str(tmp_path / "tables")
    assert main(["profile", "resnet20", "--tables", root, "--max-choices", "2", "--round-to", "8", "--threads", "1",
                 "--ray-address", "none", "--quick"]) == 0
    key = TableStore(root).devices()[0].device_key
    capsys.readouterr()
    assert main(["validate", "resnet20", "--tables", root, "--device", key, "--variants", "2", "--round-to", "8",
                 "--quick", "--passes", "1", "--no-fit"]) == 2
    assert "lacks" in capsys.readouterr().err
    assert main(["validate", "resnet20", "--tables", root, "--device", key, "--variants", "2", "--round-to", "8",
                 "--max-choices", "2", "--quick", "--passes", "1", "--no-fit"]) == 0
    assert len(_frame(tmp_path / "tables")) == 3  # the dense model and two variants
