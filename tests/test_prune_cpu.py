"""Pruning for this CPU from a table profiled here: the variant runs, is measured, and meets the budget.

Tables are timed with the profiler's quick protocol, so the measured figures are rough; the tests
assert on structure (the closed loop measured the variant beside the dense model, every round is
recorded and its figures are consistent), never on what this machine's timings happen to be. Whether
variants land on their budget is a benchmark figure (benchmarks/prune_cpu.py), not a test.
"""

from __future__ import annotations

import json

import pytest
import torch

from fleetprune import load_variant
from fleetprune.api import prune
from fleetprune.api.prune import FIXED_MEASURED, FIXED_TWO_POINT
from fleetprune.cli import main
from fleetprune.profiler import TimingProtocol, cpu_device

from prune_tables import CPU_THREADS, cpu_tables


def _check(result, budget_fraction: float, input_shape=(3, 32, 32)) -> None:
    report = result.report
    assert result.dense_measured_ms is not None and result.dense_measured_ms > 0
    assert report["latency_fit"] == "two-point" and report["narrow_measured_ms"] > 0
    if result.fixed_source.startswith(FIXED_TWO_POINT):
        _check_line(report)
    else:  # the two points gave no sane line (rough quick-protocol timings): the offset stands
        assert result.fixed_source == FIXED_MEASURED
    assert result.dense_measured_ms is not None and result.dense_measured_ms > 0
    assert result.measured_ms is not None and result.measured_ms > 0
    assert result.budget_ms == pytest.approx(budget_fraction * result.dense_ms)
    v = report["verification"]
    assert v["status"] in ("met", "over", "under") and v["measured_on"]["via"] == "this process"
    assert result.verification == v["status"] and v["rounds"][-1]["final"]
    for r in v["rounds"]:  # every share is the variant over the budget taken of the dense model beside it
        assert r["share"] == pytest.approx(r["measured_ms"] / (budget_fraction * r["dense_measured_ms"]))
    assert result.measured_ms == v["rounds"][-1]["measured_ms"]
    model = load_variant(result.folder)
    with torch.no_grad():
        y = model(torch.randn(2, *input_shape))
    assert y.shape[0] == 2 and torch.isfinite(y).all()


def _check_line(report) -> None:
    """The two-point line a * layer_sum + b passes through both measured networks."""
    a, b = (float(v.split("=")[1]) for v in report["fixed_source"].rstrip(")").split("(")[1].split(", "))
    assert report["fixed_ms"] == pytest.approx(b, rel=1e-3, abs=1e-3)
    assert report["dense_ms"] == pytest.approx(report["dense_measured_ms"], rel=1e-3)
    assert a * report["narrow_layer_sum_ms"] + report["fixed_ms"] == pytest.approx(report["narrow_measured_ms"], rel=1e-2)
    assert report["narrow_layer_sum_ms"] < report["dense_layer_sum_ms"]


def test_prune_resnet20_for_this_cpu_through_the_cli(tmp_path, capsys):
    # 46 configurations (stage 1 stays dense); batch 8 so that convs, not per-op overhead, dominate
    root = cpu_tables(("resnet20",), batch=8, round_to=16)
    key = cpu_device(CPU_THREADS).key
    rc = main(["prune", "resnet20", "--tables", root, "--device", key, "--budget", "0.8", "--steps", "2",
               "--round-to", "16", "--quick", "--latency-fit", "offset", "--out", str(tmp_path / "v")])
    assert rc == 0
    report = json.loads((tmp_path / "v" / key / "report.json").read_text())
    assert report["measured_ms"] > 0 and report["dense_measured_ms"] > 0
    assert report["latency_fit"] == "offset" and report["narrow_measured_ms"] > 0  # measured for the floor
    assert report["fixed_source"] == FIXED_MEASURED
    assert report["fixed_ms"] == pytest.approx(max(0.0, report["dense_measured_ms"] - report["dense_layer_sum_ms"]))
    out = capsys.readouterr().out
    assert key in out and f"{report['measured_ms']:.3f} ms" in out and report["verdict"] in out


def test_the_default_two_point_fit_measures_the_narrowest_network_too(tmp_path):
    root = cpu_tables(("resnet20",), batch=8, round_to=16)
    [res] = prune("resnet20", tables=root, devices=cpu_device(CPU_THREADS).key, budget=0.8, out=tmp_path / "v",
                  steps=2, round_to=16, protocol=TimingProtocol.quick())
    _check(res, 0.8)


def test_an_unknown_latency_fit_is_refused(tmp_path):
    from fleetprune.errors import FleetpruneError

    with pytest.raises(FleetpruneError, match="--latency-fit must be one of two-point, offset"):
        prune("resnet20", tables=cpu_tables(("resnet20",), batch=8, round_to=16), devices="all", budget=0.8,
              out=tmp_path / "v", latency_fit="scale")


@pytest.mark.parametrize("points, expected", [
    ((10.0, 12.0, 4.0, 5.0), (7 / 6, 12.0 - 70 / 6)),  # a line through both points
    ((10.0, 16.0, 4.0, 6.4), (1.6, 0.0)),  # all proportional: b = 0
    ((10.0, 12.0, 9.5, 5.0), None),  # layer sums within 10%: the slope would be noise
    ((10.0, 12.0, 4.0, 11.9), None),  # slope 0.017: noise, not a device
    ((10.0, 40.0, 4.0, 1.0), None),  # slope 6.5
])
def test_two_point_line(points, expected):
    from fleetprune.pruner.calibrate import two_point_line

    got = two_point_line(*points)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0.7, 0.5])
def test_prune_resnet56_for_this_cpu(tmp_path, budget):
    root = cpu_tables(("resnet56",), batch=16)
    [res] = prune("resnet56", tables=root, devices=cpu_device(CPU_THREADS).key, budget=budget,
                  out=tmp_path / "v", steps=5, round_to=8, protocol=TimingProtocol.quick())
    _check(res, budget)


@pytest.mark.slow
@pytest.mark.parametrize("name, round_to, size", [("resnet18", 32, 32), ("mobilenet_v2", 16, 64)])
def test_prune_imagenet_models_at_a_small_input_for_this_cpu(tmp_path, name, round_to, size):
    """Budgets relative to the table's dense latency (``measure=False``, as for a remote device).

    Measured here, a small-input MobileNet-V2 spends about 40% of its time outside the priced layers,
    so 0.5 of the *measured* dense latency is out of reach and the verb says so (BudgetError); the
    table-only budget still exercises the whole prune and export path for these architectures.
    """
    # batch 8 and at most 4 widths per group keep the table to about 150 configurations
    root = cpu_tables((name,), batch=8, round_to=round_to, input_size=size, max_choices=4)
    for budget in (0.7, 0.5):
        [res] = prune(name, tables=root, devices="all", budget=budget, out=tmp_path / f"v{budget}", steps=3,
                      num_classes=10, input_size=size, round_to=round_to, max_choices=4, measure=False)
        assert res.fixed_source == "table rows only" and res.measured_ms is None
        assert res.verification == "predicted only"
        assert res.budget_ms == pytest.approx(budget * res.dense_ms)
        assert res.predicted_ms <= res.budget_ms * (1 + 1e-9)
        model = load_variant(res.folder)
        with torch.no_grad():
            assert model(torch.randn(2, 3, size, size)).shape == (2, 10)
