"""The closed loop: a variant is measured beside its dense model and re-solved until its budget holds.

Every measurement here is scripted (a known function of the widths), so the tests assert what the
loop does with measurements, never what this machine's timings happen to be.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fleetprune.errors import BudgetError, DeviceLostError
from fleetprune.pruner.calibrate import (
    WINDOW,
    Settled,
    Timing,
    check_floor,
    close_loop,
    settle,
    status_of,
    verdict_text,
)
from fleetprune.pruner.latency import LatencyModel
from fleetprune.pruner.pipeline import prune_for_device
from fleetprune.pruner.plan import build_plan
from fleetprune.pruner.progressive import progressive_prune
from fleetprune.pruner.schedule import read_budget
from fleetprune.pruner.variant import example_input

from pruner_fakes import DictLatencyTable, TinyResNet, macs_staircase_ms

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = TinyResNet(width=128, inner=128)
    plan = build_plan(model, example_input(SHAPE, 4), round_to=8)
    table = DictLatencyTable.from_function(plan.configs(), lambda c: 0.01 + macs_staircase_ms(c, 8) * 1e3)
    return model, plan, table


class Device:
    """A scripted device: a network takes ``1.3 * layer_sum + 0.05 * (share of weight kept)**2 + ...`` ms
    (a shape a line through two networks does not fit). ``disturbed`` slows the dense model of a call
    by that factor (a neighbour busy while it was timed: interference only ever adds time)."""

    def __init__(self, plan, table, disturbed=(1.0,)):
        self.lm = LatencyModel(plan, table)
        self.dense = self.lm.layer_sum()
        self.disturbed = list(disturbed)
        self.calls: list[list[dict]] = []

    def ms(self, widths) -> float:
        s = self.lm.layer_sum(widths)
        return 1.3 * s + 0.05 * (s / self.dense) ** 2 + 0.3 * s * (1 - s / self.dense)

    def __call__(self, networks):
        slow = self.disturbed[min(len(self.calls), len(self.disturbed) - 1)]
        self.calls.append([dict(n.widths) for n in networks])
        return Timing([(slow if i == 0 else 1.0) * self.ms(n.widths) for i, n in enumerate(networks)],
                      {"device_key": "scripted", "via": "test"})


def _copy(model):
    return copy.deepcopy(model)


def _solver(model, plan, lm, steps=2):
    def solve(target):
        res = progressive_prune(_copy(model), plan, lm, target, steps)
        return res.widths, res.predicted_ms
    return solve


@pytest.mark.parametrize("budget", ["0.5", "0.7", "2x", "0.3"])
def test_the_loop_lands_inside_the_window_where_open_loop_misses(setup, budget):
    model, plan, table = setup
    device = Device(plan, table, disturbed=(1.0, 1.4, 1.2, 1.3, 1.1))
    settled = settle(plan, table, measure=device)
    b = read_budget(budget)
    v = close_loop(_solver(model, plan, settled.model), device, b, settled.model, rounds=4,
                   dense_measured_ms=settled.dense_measured_ms)
    first = v.rounds[0]
    assert v.status == "met" and WINDOW[0] <= v.share <= WINDOW[1], v.to_dict()
    assert 1 <= len(v.rounds) <= 4 and v.rounds[v.chosen].target_ms == v.target_ms
    for r in v.rounds:
        # the dense model of every round was disturbed, but the share uses its fastest measurement
        # (settle's, undisturbed): a slow dense figure never makes a variant look inside the window
        assert r.raw_dense_ms > r.dense_measured_ms
        assert r.share == pytest.approx(device.ms(r.widths) / (b.fraction * device.ms(settled.model.full_widths())))
    assert device.calls[0][0] == settled.model.full_widths()  # every call measures the dense model first
    if len(v.rounds) > 1:
        assert not WINDOW[0] <= first.share <= WINDOW[1]  # it needed correcting, and was corrected


def test_where_no_width_plan_lands_inside_the_window_the_loop_says_so(setup):
    """On a coarse staircase (cost steps of 16 channels, widths in 8s) 0.5 of dense falls between two
    width plans: the loop brackets it, measures each plan once, and names the granularity."""
    model, plan, _ = setup
    table = DictLatencyTable.from_function(plan.configs(), lambda c: 0.01 + macs_staircase_ms(c, 16) * 1e3)
    device = Device(plan, table)
    settled = settle(plan, table, measure=device)
    v = close_loop(_solver(model, plan, settled.model), device, read_budget("0.5"), settled.model, rounds=4)
    assert v.status in ("under", "over") and "granularity" in v.note, v.to_dict()
    assert len({tuple(sorted(r.widths.items())) for r in v.rounds}) == len(v.rounds)  # no plan measured twice
    shares = [r.share for r in v.rounds]
    assert min(shares) < WINDOW[0] and max(shares) > WINDOW[1]  # bracketed
    # the round nearest the window is kept, a share over the budget weighing twice one under it
    nearest = min(v.rounds, key=lambda r: 2 * (r.share - 1.0) if r.share > 1.0 else WINDOW[0] - r.share)
    assert v.rounds[v.chosen] is nearest


def test_a_call_disturbed_as_a_whole_is_measured_again(setup):
    """Round 1's call is slowed as a whole (both networks 30% slow, the fastest dense figure from
    before is not): the two estimates disagree, so the pair is measured again before the round counts."""
    model, plan, table = setup
    device = Device(plan, table)
    settled = settle(plan, table, measure=device)
    calls = []

    def drifting(networks):
        calls.append(1)
        timing = device(networks)
        if len(calls) == 1:
            timing.ms = [1.3 * ms for ms in timing.ms]
        return timing

    b = read_budget("0.5")
    v = close_loop(_solver(model, plan, settled.model), drifting, b, settled.model, rounds=1,
                   dense_measured_ms=settled.dense_measured_ms)
    [r] = v.rounds
    assert len(calls) == 2 and r.raw_ms == pytest.approx(device.ms(r.widths))  # the second, quiet call
    assert r.share == pytest.approx(device.ms(r.widths) / (0.5 * device.ms(settled.model.full_widths())))


def test_an_absolute_budget_is_checked_against_the_variant_alone(setup):
    model, plan, table = setup
    device = Device(plan, table)
    settled = settle(plan, table, measure=device)
    dense_ms = device.ms(settled.model.full_widths())
    b = read_budget(f"{0.6 * dense_ms:.6f}ms")
    v = close_loop(_solver(model, plan, settled.model), device, b, settled.model, rounds=4)
    assert v.status == "met"
    assert v.share == pytest.approx(v.rounds[v.chosen].measured_ms / b.ms)


def test_a_device_lost_mid_way_leaves_the_prediction(setup):
    model, plan, table = setup
    device = Device(plan, table)
    settled = settle(plan, table, measure=device)
    calls = []

    def flaky(networks):
        calls.append(1)
        if len(calls) > 1:
            raise DeviceLostError("node gone")
        return device(networks)

    v = close_loop(_solver(model, plan, settled.model), flaky, read_budget("0.3"), settled.model, rounds=4)
    assert v.status == "predicted only" and "node gone" in v.note and len(v.rounds) == 1


def test_settle_fits_the_line_through_dense_and_fastest_measured_side_by_side(setup):
    _, plan, table = setup
    device = Device(plan, table, disturbed=(1.1,))
    s = settle(plan, table, measure=device)
    fastest = s.model.min_widths()
    assert device.calls == [[s.model.full_widths(), fastest]]
    assert s.dense_measured_ms == pytest.approx(1.1 * device.ms(s.model.full_widths()))  # as measured
    assert s.model.dense_ms() == pytest.approx(s.dense_measured_ms)  # the line passes through both points
    assert s.model.predict(fastest) == pytest.approx(s.narrow_measured_ms)
    assert s.floor_share == pytest.approx(device.ms(fastest) / (1.1 * device.ms(s.model.full_widths())))


def test_the_floor_refuses_only_what_measurement_says_is_out_of_reach(setup):
    _, plan, table = setup
    s = Settled(LatencyModel(plan, table), dense_measured_ms=10.0, narrow_measured_ms=3.0)
    check_floor(read_budget("0.29"), s, "tiny", "dev")  # a hair below the measured floor: the loop decides
    check_floor(read_budget("2.8ms"), s, "tiny", "dev")
    with pytest.raises(BudgetError, match=r"0\.300 of dense"):
        check_floor(read_budget("0.2"), s, "tiny", "dev")
    with pytest.raises(BudgetError, match="ask for at least"):
        check_floor(read_budget("2ms"), s, "tiny", "dev")


def test_without_a_measurement_the_model_minimum_decides(setup):
    _, plan, table = setup
    s = Settled(LatencyModel(plan, table))
    floor = s.model.min_latency() / s.model.dense_ms()
    check_floor(read_budget(f"{floor * 1.01:.6f}"), s, "tiny", "dev")
    with pytest.raises(BudgetError, match="below the smallest latency"):
        check_floor(read_budget(f"{floor * 0.9:.6f}"), s, "tiny", "dev")


def test_the_fastest_widths_of_a_table_that_is_not_monotone(setup):
    """A table where the narrowest inner width runs slower than a wider one (a kernel cliff): the
    minimum is taken over each group's options, so a budget between the two is reachable."""
    model, plan, _ = setup
    inner = next(g for g in plan.groups if g.prunable and "conv2" in g.members)
    narrow = min(inner.choices)

    def cliff(c):
        ms = 0.01 + macs_staircase_ms(c) * 1e3
        return ms * 8 if (c.cin != 3 and c.kh == 3 and c.cout == narrow) else ms  # conv2 at its narrowest

    table = DictLatencyTable.from_function(plan.configs(), cliff)
    lm = LatencyModel(plan, table)
    assert lm.predict(lm.min_widths()) < lm.predict(lm.narrowest_widths())
    assert lm.min_widths()[inner.name] != narrow
    budget = 0.5 * (lm.predict(lm.min_widths()) + lm.predict(lm.narrowest_widths()))
    res = progressive_prune(_copy(model), plan, lm, budget, 2)
    assert res.predicted_ms <= budget * (1 + 1e-9)


def test_verdicts():
    assert status_of(None) == "predicted only" and verdict_text(None) == "predicted only"
    assert verdict_text(0.97) == "met (0.970 of budget)"
    assert verdict_text(1.041) == "over by 4.1%" and status_of(1.041) == "over"
    assert verdict_text(0.9) == "under by 10.0%" and status_of(0.9) == "under"


def test_prune_for_device_measures_the_final_variant_and_records_every_round(setup):
    model, plan, table = setup
    device = Device(plan, table, disturbed=(1.0, 1.2, 1.05, 1.1, 1.0, 1.3))
    settled = settle(plan, table, measure=device)
    seen = []

    def watched(networks):
        seen.append(networks)
        return device(networks)

    out = prune_for_device(model, plan, settled, read_budget("0.5"), steps=2, measure=watched)
    v = out.verification
    assert v.rounds[-1].final and v.rounds[-1].widths == out.widths
    assert v.status == status_of(v.rounds[-1].share) and out.measured_ms == v.rounds[-1].measured_ms
    assert len(seen) >= len(v.rounds)  # a measurement per round, the final one included (more where disturbed)
    # without fine-tuning the final variant is the chosen round's network
    assert v.rounds[-1].widths == v.rounds[v.chosen].widths
    assert sum(p.numel() for p in out.model.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert out.model(torch.randn(2, *SHAPE)).shape == (2, 10)


def test_an_unreachable_device_is_pruned_open_loop_and_says_so(setup):
    model, plan, table = setup
    settled = settle(plan, table)
    out = prune_for_device(model, plan, settled, read_budget("0.5"), steps=2, measure=None,
                           unreachable_note="no node of this type")
    v = out.verification
    assert v.status == "predicted only" and v.note == "no node of this type" and not v.rounds
    assert out.measured_ms is None and out.result.predicted_ms <= 0.5 * settled.model.dense_ms() * (1 + 1e-9)
