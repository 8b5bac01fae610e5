"""Per-kind calibration (issue 13): one non-negative factor per op kind plus a constant, fitted by validate,
stored in the table with its provenance and applied by the pruner's latency model (the line stays the fallback)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fleetprune.pruner.calibrate import KindScaledTable, settle, stored_correction
from fleetprune.pruner.fidelity import ValidationSummary, fit_per_kind, per_kind_predict, summarise
from fleetprune.pruner.latency import LatencyModel
from fleetprune.tables import TableStore

from test_op_kinds_plan import ResidualNet, plan_of
from test_op_kinds_tables import DEV, PROV, rows

TRUE = {"conv": 1.3, "add": 2.5, "linear": 0.9, "adaptive_avgpool": 1.0}


def networks(n: int, seed: int = 0) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    return [{"conv": float(rng.uniform(1, 10)), "add": float(rng.uniform(0.05, 0.5)), "linear": float(rng.uniform(0.01, 0.1)),
             "adaptive_avgpool": float(rng.uniform(0.01, 0.05))} for _ in range(n)]


def truth(ks: dict[str, float], b: float = 0.2) -> float:
    return sum(TRUE[k] * v for k, v in ks.items()) + b


def test_the_fit_recovers_factors_per_kind_and_keeps_them_non_negative():
    nets = networks(12)
    fit = fit_per_kind(nets, [truth(k) for k in nets], ridge=0.0)
    assert fit["factors"]["conv"] == pytest.approx(1.3, rel=1e-6) and fit["factors"]["add"] == pytest.approx(2.5, rel=1e-5)
    assert fit["b"] == pytest.approx(0.2, abs=1e-6) and fit["n"] == 12
    assert per_kind_predict(fit, nets[0]) == pytest.approx(truth(nets[0]))
    # a kind that makes networks faster cannot get a negative factor
    faster = [truth(k) - 3.0 * k["add"] for k in nets]
    assert fit_per_kind(nets, faster, ridge=0.0)["factors"]["add"] == pytest.approx(0.0, abs=1e-8)
    # the ridge pulls a kind toward the prior only where the data leave it free
    pulled = fit_per_kind(nets, [truth(k) for k in nets], prior=1.0, ridge=0.05)
    assert pulled["factors"]["conv"] == pytest.approx(1.3, rel=0.05)


def _rows(nets: list[dict[str, float]], measured: list[float], calibration: int) -> list[dict]:
    return [{"dense": i == 0, "calibration": i <= calibration, "layer_sum_ms": sum(k.values()),
             "kind_sums": json.dumps(k), "measured_ms": m} for i, (k, m) in enumerate(zip(nets, measured))]


def test_validate_reports_it_on_held_out_networks_and_stores_it_when_it_helps():
    nets = networks(21, seed=1)
    rows = _rows(nets, [truth(k) for k in nets], calibration=10)
    s = ValidationSummary(DEV, "residualnet", "run", (3, 16, 16), 1, "fp32", "nchw")
    summarise(rows, s, fit=True, variants=20)
    assert s.per_kind_after["n"] == 10 and s.per_kind_after["median_abs_error"] < 0.01
    assert s.per_kind_after["median_abs_error"] < s.after["median_abs_error"]  # the line cannot fit two slopes
    assert s.correction_stored and s.correction["per_kind"] == s.per_kind
    assert "per op kind" in s.correction_note
    held = [r for r in rows if not r["calibration"]]
    assert all(abs(r["per_kind_rel_error"]) < 0.02 for r in held)


def test_a_stored_per_kind_correction_prices_the_network(tmp_path):
    plan = plan_of(ResidualNet())
    store = TableStore(tmp_path)
    store.write(DEV, rows(plan.configs()), PROV)
    setting = {"batch": 1, "dtype": "fp32", "memory_format": "nchw", "input_shape": [3, 16, 16]}
    per_kind = {"factors": {"conv": 1.5, "add": 3.0, "linear": 1.0, "adaptive_avgpool": 2.0}, "b": -0.01, "n": 11,
                "prior": 1.2, "ridge": 0.05}
    store.set_correction(DEV, {"a": 1.2, "b": 0.05, "model": "residualnet", **setting, "per_kind": per_kind})
    table = store.read(DEV)
    corr = stored_correction(table, "residualnet", setting)
    assert tuple(corr) == pytest.approx((1.2, 0.05)) and corr.per_kind["factors"] == per_kind["factors"]
    st = settle(plan, table, correction=corr)
    assert st.priced_by == "per-kind correction" and isinstance(st.model.table, KindScaledTable)
    assert st.to_dict()["latency_model"] == "per-kind correction" and st.to_dict()["correction"] == [1.2, 0.05]
    widths = {g.name: g.choices[0] for g in plan.prunable_groups()}
    bare = LatencyModel(plan, table).kind_sums(widths)
    assert set(bare) == {"conv", "add", "linear", "adaptive_avgpool"}
    assert st.model.predict(widths) == pytest.approx(per_kind_predict(per_kind, bare))
    # fitted for another model or setting: not used
    assert stored_correction(table, "othernet", setting) is None
    assert stored_correction(table, "residualnet", {**setting, "batch": 8}) is None


@pytest.mark.parametrize("per_kind", [None, {"factors": {"conv": -1.0}, "b": 0.0}, {"factors": {}, "b": 0.0},
                                      {"b": 1.0}])
def test_without_a_usable_per_kind_fit_the_line_prices_it(tmp_path, per_kind):
    plan = plan_of(ResidualNet())
    store = TableStore(tmp_path)
    store.write(DEV, rows(plan.configs()), PROV)
    extra = {} if per_kind is None else {"per_kind": per_kind}
    store.set_correction(DEV, {"a": 1.2, "b": 0.05, "model": "residualnet", **extra})
    table = store.read(DEV)
    corr = stored_correction(table, "residualnet", {"batch": 1})
    assert corr.per_kind is None
    st = settle(plan, table, correction=corr)
    assert st.priced_by == "line correction" and st.to_dict()["per_kind"] is None
    assert st.model.predict() == pytest.approx(1.2 * LatencyModel(plan, table).layer_sum() + 0.05)
    assert settle(plan, table).priced_by == "table only"
