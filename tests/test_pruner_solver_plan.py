"""The scoring and width-choice algorithms on real plans (``build_plan``) and a real ``LatencyTable``.

The model has a residual stage with a depthwise conv inside it, a branch pair whose outputs are
concatenated (a layer whose c_in depends on two groups) and a linear head.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fleetprune.pruner.exact import build_coupled_problem
from fleetprune.pruner.latency import LatencyModel
from fleetprune.pruner.plan import build_plan
from fleetprune.pruner.scores import make_importance
from fleetprune.pruner.solve import choose_widths, current_widths_from
from fleetprune.pruner.units import update_masks
from fleetprune.tables.table import LatencyTable

from pruner_fakes import macs_staircase_ms


class ConcatNet(nn.Module):
    """stem + residual block + depthwise (all one group), pointwise, two branches concatenated, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(32)
        self.c1 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.c1_bn = nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.c2_bn = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.dw_bn = nn.BatchNorm2d(32)
        self.pw = nn.Conv2d(32, 48, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(48)
        self.a = nn.Conv2d(48, 32, 1, bias=False)
        self.a_bn = nn.BatchNorm2d(32)
        self.b = nn.Conv2d(48, 32, 3, padding=1, bias=False)
        self.b_bn = nn.BatchNorm2d(32)
        self.c = nn.Conv2d(64, 32, 1, bias=False)
        self.c_bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        y = torch.relu(self.c1_bn(self.c1(x)))
        x = torch.relu(self.c2_bn(self.c2(y)) + x)
        x = torch.relu(self.dw_bn(self.dw(x)))
        x = torch.relu(self.pw_bn(self.pw(x)))
        x = torch.cat([torch.relu(self.a_bn(self.a(x))), torch.relu(self.b_bn(self.b(x)))], 1)
        x = torch.relu(self.c_bn(self.c(x)))
        return self.fc(x.mean((2, 3)))


def macs_table(plan, device_key: str = "fake-macs") -> LatencyTable:
    """A real LatencyTable whose medians come from MACs on a 16-channel staircase."""
    configs = plan.configs()
    frame = pd.DataFrame({"key": [c.key for c in configs], "lat_ms": [macs_staircase_ms(c) for c in configs]})
    return LatencyTable(device_key, {}, frame)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = ConcatNet().eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.2
            m.running_var.data = torch.rand(m.num_features, generator=g) + 0.2
    plan = build_plan(model, torch.randn(1, 3, 8, 8), round_to=8)
    lm = LatencyModel(plan, macs_table(plan), fixed_ms=0.002, fixed_source="test")
    return model, plan, lm


def test_plan_has_the_structures_under_test(setup):
    _, plan, lm = setup
    assert plan.group("stem").members == ("stem", "c2", "dw")
    assert lm.depends_on(plan.layer("c")) == ("a", "b", "c")
    assert lm.depends_on(plan.layer("dw")) == ("stem",)


def test_predict_matches_direct_lookups_of_the_plan(setup):
    _, plan, lm = setup
    rng = np.random.default_rng(0)
    for _ in range(20):
        widths = {g.name: int(rng.choice(g.choices)) for g in plan.groups}
        direct = sum(lm.table.lookup(plan.layer_config(layer, widths)) for layer in plan.layers)
        assert lm.predict(widths) == pytest.approx(direct + 0.002)
    options = {g.name: list(g.choices) for g in plan.prunable_groups()}
    prob = build_coupled_problem(lm, lm.full_widths(), options, {g: np.zeros(len(o)) for g, o in options.items()})
    assert ("a", "b", "c") in prob.factors  # the concat reader couples three classes
    for _ in range(20):
        choice = {g: int(rng.integers(len(o))) for g, o in options.items()}
        assert prob.latency(choice) == pytest.approx(lm.predict({g: options[g][k] for g, k in choice.items()}))


@pytest.mark.parametrize("method", ["sp_lamp", "l1", "random"])
def test_importances_score_every_prunable_group(setup, method):
    model, plan, _ = setup
    masks = {"pw": torch.arange(48) < 40}
    scores = make_importance(method).scores(model, plan, masks)
    assert set(scores) == {g.name for g in plan.prunable_groups()}
    assert bool((scores["pw"][40:] == 0).all())
    if method == "sp_lamp":  # every member conv of a group contributes one score-1 filter
        for g in plan.prunable_groups():
            alive = masks.get(g.name, torch.ones(g.width, dtype=torch.bool))
            s = scores[g.name][alive]
            assert 1.0 <= float(s.max()) <= len(g.members) + 1e-9
            assert 1 <= int((s >= 1.0).sum()) <= len(g.members)
            if len(g.members) == 1:
                assert int((s == 1.0).sum()) == 1


def test_dp_and_exact_fit_and_exact_is_at_least_dp(setup):
    model, plan, lm = setup
    scores = make_importance("sp_lamp").scores(model, plan)
    lo, hi = lm.min_latency(), lm.dense_ms()
    for frac in (0.8, 0.5, 0.2):
        budget = lo + frac * (hi - lo)
        dp = choose_widths(plan, lm, scores, None, budget, solver="dp")
        ex = choose_widths(plan, lm, scores, None, budget, solver="exact", time_limit_s=30)
        for res in (dp, ex):
            assert res.predicted_ms <= budget
            assert all(res.widths[g.name] in g.choices for g in plan.groups)
            assert res.predicted_ms == pytest.approx(lm.predict(res.widths))
        assert ex.optimal and ex.value >= dp.value - 1e-9
    uni = choose_widths(plan, lm, scores, None, lo + 0.5 * (hi - lo), policy="uniform")
    assert uni.predicted_ms <= lo + 0.5 * (hi - lo) and uni.value <= ex.value + 1e-9


def test_progressive_steps_shrink_monotonically_and_never_revive(setup):
    model, plan, lm = setup
    importance = make_importance("sp_lamp")
    masks = None
    previous = plan.dense_widths()
    from fleetprune.pruner.schedule import exponential_schedule

    for target in exponential_schedule(lm.dense_ms(), lm.min_latency() + 0.3 * (lm.dense_ms() - lm.min_latency()), 3):
        scores = importance.scores(model, plan, masks)
        res = choose_widths(plan, lm, scores, masks, target)
        new = update_masks(plan, scores, masks, res.widths)
        for g in plan.prunable_groups():
            assert int(new[g.name].sum()) == res.widths[g.name] <= previous[g.name]
            if masks is not None:
                assert not bool((new[g.name] & ~masks[g.name]).any())
        assert current_widths_from(plan, new) == res.widths
        masks, previous = new, res.widths
        assert lm.predict(res.widths) <= target
