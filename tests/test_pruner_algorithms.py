"""SP-LAMP scores, units, the knapsack DP, the exact MILP, the latency model, schedule and budgets."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from fleetprune.errors import BudgetError, MissingConfigsError
from fleetprune.pruner.exact import build_coupled_problem, solve_coupled_milp
from fleetprune.pruner.knapsack import integerise, solve_integer_mckp, solve_mckp
from fleetprune.pruner.latency import LatencyModel, fixed_part
from fleetprune.pruner.schedule import exponential_schedule, parse_budget
from fleetprune.pruner.scores import L1Importance, SPLampImportance, lamp_normalise, make_importance
from fleetprune.pruner.solve import choose_widths, repair
from fleetprune.pruner.units import group_units, make_units, unit_widths, update_masks
from fleetprune.tables.config import LayerConfig

from pruner_fakes import (
    DictLatencyTable,
    FakeGroup,
    FakeLayer,
    FakePlan,
    TinyResNet,
    macs_staircase_ms,
    random_chain_plan,
    random_table,
    tiny_resnet_plan,
)


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.1
            m.running_var.data = torch.rand(m.num_features, generator=g) + 0.1


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = TinyResNet()
    _randomise_bn(model)
    return model, tiny_resnet_plan()


# ------------------------------------------------------------------------------------ SP-LAMP


def test_lamp_normalise_matches_the_formula():
    e = torch.tensor([4.0, 1.0, 9.0, 1.0, 0.0])
    s = lamp_normalise(e)
    # ascending stable order: idx4 (0), idx1 (1), idx3 (1), idx0 (4), idx2 (9); tails 15, 15, 14, 13, 9
    expected = torch.tensor([4 / 13, 1 / 15, 1.0, 1 / 14, 0.0], dtype=torch.float64)
    assert torch.allclose(s, expected)
    assert float(lamp_normalise(torch.zeros(3)).max()) == 1.0  # all-zero energies stay finite


@pytest.mark.parametrize("reduce", ["per_layer", "balanced"])
def test_every_group_has_a_score_one_filter(tiny, reduce):
    """balanced: exactly one score-1 channel per group, all scores in (0, 1]; per_layer (default):
    the same for a one-conv group, and a coupled group's scores are its members' LAMP summed
    (each member's top filter adds 1), so they lie in (0, members]."""
    model, plan = tiny
    members = {g.name: len(g.members) for g in plan.groups}
    assert members["res"] > 1 and members["inner"] == 1
    masks = {"res": torch.arange(32) % 3 != 0, "inner": torch.arange(32) >= 8}
    for m in (None, masks):
        imp = SPLampImportance(coupled_reduce=reduce)
        scores = imp.scores(model, plan, m)
        assert set(scores) == {"res", "inner"}
        for name, s in scores.items():
            alive = torch.ones(32, dtype=torch.bool) if m is None else m[name]
            top = 1.0 if reduce == "balanced" else float(members[name])
            assert bool((s[alive] > 0).all()) and bool((s[alive] <= top + 1e-12).all())
            assert s[alive].max().item() >= 1.0
            if reduce == "balanced" or members[name] == 1:
                assert s[alive].max().item() == 1.0
                assert int((s[alive] == 1.0).sum()) == 1
            else:
                group = next(g for g in plan.groups if g.name == name)
                per_member = [lamp_normalise(e[alive]) for e in imp.member_energies(model, plan, group)]
                assert torch.allclose(s[alive], sum(per_member))
                assert int((s[alive] >= 1.0).sum()) >= 1


def test_masked_channels_are_excluded(tiny):
    model, plan = tiny
    alive = torch.ones(32, dtype=torch.bool)
    alive[[0, 5, 9, 20]] = False
    masks = {"inner": alive}
    before = SPLampImportance().scores(model, plan, masks)["inner"]
    # make a masked filter enormous: no survivor's score may change (not ranked, not in any denominator)
    with torch.no_grad():
        model.conv2.weight[5] *= 1e4
    after = SPLampImportance().scores(model, plan, masks)["inner"]
    assert torch.equal(before, after)
    assert bool((after[~alive] == 0).all())
    # and the survivors' scores are exactly LAMP over the survivors alone
    scale = model.bn2.weight / torch.sqrt(model.bn2.running_var + model.bn2.eps)
    e = (model.conv2.weight.detach().double().flatten(1) * scale.detach().double()[:, None]).pow(2).sum(1)
    assert torch.allclose(after[alive], lamp_normalise(e[alive]))


def _single_conv_plan(n: int = 4) -> tuple[nn.Module, FakePlan]:
    model = nn.Sequential(nn.Conv2d(1, n, 1, bias=False), nn.BatchNorm2d(n))
    plan = FakePlan(
        [FakeGroup("g", n, 1, tuple(range(1, n + 1)), ("0",), ())],
        [FakeLayer("0", LayerConfig("conv", 1, n), None, "g", "1")],
    )
    return model, plan


def test_bn_folding_changes_the_ranking():
    model, plan = _single_conv_plan()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1))  # raw: 3 strongest
        model[1].weight.copy_(torch.tensor([8.0, 3.0, 1.0, 0.5]))  # folded: 8, 6, 3, 2 -> 0 strongest
        model[1].running_var.fill_(1.0 - model[1].eps)
    folded = SPLampImportance(fold_bn=True).scores(model, plan)["g"]
    raw = SPLampImportance(fold_bn=False).scores(model, plan)["g"]
    assert torch.argsort(raw).tolist() == [0, 1, 2, 3]
    assert torch.argsort(folded).tolist() == [3, 2, 1, 0]
    assert torch.allclose(folded, lamp_normalise(torch.tensor([64.0, 36.0, 9.0, 4.0])))


def _coupled_plan() -> tuple[nn.Module, FakePlan]:
    model = nn.ModuleDict({"a": nn.Conv2d(1, 4, 1, bias=False), "b": nn.Conv2d(1, 4, 1, bias=False)})
    with torch.no_grad():
        model["a"].weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).sqrt().view(4, 1, 1, 1) * 100)  # energies x1e4
        model["b"].weight.copy_(torch.tensor([8.0, 1.0, 0.5, 0.5]).sqrt().view(4, 1, 1, 1))
    plan = FakePlan(
        [FakeGroup("g", 4, 1, (1, 2, 3, 4), ("a", "b"), ())],
        [FakeLayer("a", LayerConfig("conv", 1, 4), None, "g"), FakeLayer("b", LayerConfig("conv", 1, 4), None, "g")],
    )
    return model, plan


def test_balanced_reduction_normalises_each_member():
    model, plan = _coupled_plan()
    balanced = SPLampImportance(coupled_reduce="balanced").scores(model, plan)["g"]
    concat = SPLampImportance(coupled_reduce="concat").scores(model, plan)["g"]
    ea = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    eb = torch.tensor([8.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    assert torch.allclose(balanced, lamp_normalise(ea / ea.sum() + eb / eb.sum()))
    assert torch.allclose(concat, lamp_normalise(ea * 1e4 + eb))
    assert int(torch.argmax(concat)) == 3  # the large member dominates
    assert int(torch.argmax(balanced)) == 0  # member b's strong filter 0 wins once both count equally
    # surviving-only denominators: masking channel 0 renormalises each member on the rest
    masked = SPLampImportance(coupled_reduce="balanced").scores(
        model, plan, {"g": torch.tensor([False, True, True, True])})["g"]
    assert torch.allclose(masked[1:], lamp_normalise(ea[1:] / ea[1:].sum() + eb[1:] / eb[1:].sum()))


def test_per_layer_reduction_sums_each_members_lamp():
    """The default: every member conv has its own score-1 filter, so a coupled set of m convs
    carries m layers' worth of score (the knapsack values a residual stream like m layers)."""
    model, plan = _coupled_plan()
    ea = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    eb = torch.tensor([8.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    default = SPLampImportance().scores(model, plan)["g"]
    assert torch.allclose(default, lamp_normalise(ea) + lamp_normalise(eb))
    # channel 3 (a's score-1 filter) and channel 0 (b's) both reach at least 1; one LAMP over the set
    # would give exactly one channel 1 and a total below the two members' totals together
    assert default[0] >= 1 and default[3] >= 1
    balanced = SPLampImportance(coupled_reduce="balanced").scores(model, plan)["g"]
    assert float(default.sum()) > float(balanced.sum()) + 0.5
    masked = SPLampImportance().scores(model, plan, {"g": torch.tensor([True, True, False, True])})["g"]
    keep = [0, 1, 3]
    assert masked[2] == 0
    assert torch.allclose(masked[keep], lamp_normalise(ea[keep]) + lamp_normalise(eb[keep]))


def test_l1_matches_torch_pruning_group_magnitude(tiny):
    tp = pytest.importorskip("torch_pruning")
    model, plan = tiny
    ours = L1Importance().scores(model, plan)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    imp = tp.importance.GroupMagnitudeImportance(p=1, normalizer=None, group_reduction="mean")
    for gname, module in (("inner", model.conv2), ("res", model.conv1)):
        group = dg.get_pruning_group(module, tp.prune_conv_out_channels, idxs=list(range(32)))
        assert torch.allclose(ours[gname], imp(group).double(), rtol=1e-5), gname


def test_random_importance_is_seeded(tiny):
    model, plan = tiny
    a = make_importance("random", seed=3).scores(model, plan)
    b = make_importance("random", seed=3).scores(model, plan)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="sp_lamp"):
        make_importance("taylor")


# -------------------------------------------------------------------------------------- units


def test_unit_widths_put_the_remainder_in_the_top_unit():
    assert unit_widths(32, 8) == (8, 16, 24, 32)
    assert unit_widths(30, 8) == (14, 22, 30)
    assert unit_widths(5, 8) == (5,)


def test_units_form_from_the_least_important_end():
    scores = torch.tensor([0.3, 1.0, 0.1, 0.5, 0.2, 0.0, 0.4, 0.25], dtype=torch.float64)
    alive = torch.ones(8, dtype=torch.bool)
    alive[5] = False
    u = make_units("g", scores, alive, unit_widths(7, 3))  # 7 survivors, unit 3 -> widths (4, 7)
    assert u.widths == (4, 7)
    assert u.order.tolist() == [2, 4, 7, 0, 6, 3, 1]  # ascending; masked channel 5 absent
    top = u.kept(units=1)
    assert top.tolist() == [0, 1, 3, 6] and 1 in top.tolist()  # the score-1 filter is in the top unit
    assert u.kept(7).tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert np.allclose(u.values, [1.0 + 0.5 + 0.4 + 0.3, 1.0 + 0.5 + 0.4 + 0.3 + 0.25 + 0.2 + 0.1])
    assert np.allclose(u.unit_values, [2.2, 0.55])
    assert not u.mask(4, 8)[5]
    with pytest.raises(ValueError):
        u.kept(5)


def test_group_units_use_plan_choices_and_update_masks_never_revive(tiny):
    model, plan = tiny
    masks = {"inner": torch.arange(32) < 24}
    scores = SPLampImportance().scores(model, plan, masks)
    u = group_units(plan.group("inner"), scores["inner"], masks)
    assert u.widths == (8, 16, 24)
    new = update_masks(plan, scores, masks, {"inner": 16, "res": 32})
    assert int(new["inner"].sum()) == 16 and not bool((new["inner"] & ~masks["inner"]).any())
    top = int(torch.argmax(scores["inner"]))
    assert bool(new["inner"][top])


# ----------------------------------------------------------------------------------- knapsack


def _brute_force(values, int_weights, cap):
    best = -math.inf
    for combo in itertools.product(*[range(len(v)) for v in values]):
        if sum(int(w[k]) for w, k in zip(int_weights, combo)) <= cap:
            best = max(best, sum(v[k] for v, k in zip(values, combo)))
    return best


def test_knapsack_dp_equals_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    for trial in range(200):
        m = int(rng.integers(1, 5))
        values = [np.cumsum(rng.uniform(0, 1, int(rng.integers(1, 6)))) for _ in range(m)]
        weights = [np.sort(rng.uniform(0.1, 5.0, len(v))) if trial % 2 else rng.uniform(0.1, 5.0, len(v))
                   for v in values]
        lo, hi = sum(w.min() for w in weights), sum(w.max() for w in weights)
        capacity = float(rng.uniform(lo, hi + 0.5))
        resolution = int(rng.choice([2, 10, 200]))  # coarse grids make rounding matter
        sol = solve_mckp(values, weights, capacity, resolution=resolution)
        real = sum(w[k] for w, k in zip(weights, sol.choice))
        assert real <= capacity + 1e-12  # feasible for the real weights
        assert sol.value == pytest.approx(sum(v[k] for v, k in zip(values, sol.choice)))
        if hi <= capacity:  # everything fits: the best option of every class
            assert sol.value == pytest.approx(sum(v.max() for v in values))
            continue
        inst = integerise(weights, capacity, resolution=resolution)
        assert sol.value == pytest.approx(_brute_force(values, inst.weights, inst.capacity), abs=1e-12)
        assert sum(int(w[k]) for w, k in zip(inst.weights, sol.choice)) <= inst.capacity


def test_integer_dp_on_exact_integers():
    values = [[1.0, 5.0, 6.0], [2.0, 3.0], [0.0, 4.0]]
    weights = [[0, 3, 4], [0, 1], [0, 3]]
    choice = solve_integer_mckp(values, weights, 6)
    assert sum(values[j][k] for j, k in enumerate(choice)) == _brute_force(values, weights, 6) == 11.0


def test_knapsack_rounding_loss_is_bounded():
    """The DP rounds weights up and the capacity down by at most one step delta each: its answer fits
    the real capacity and is worth at least the exact optimum of a capacity (M + 1) * delta smaller."""
    rng = np.random.default_rng(1)
    classes, options = 6, 5
    values = [np.sort(rng.uniform(0, 1, options)) for _ in range(classes)]
    weights = [np.cumsum(rng.uniform(0.1, 1, options)) for _ in range(classes)]
    capacity = 0.5 * sum(w.max() for w in weights)
    inst = integerise(weights, capacity)
    assert inst.delta * classes <= capacity * 0.005 + 1e-12

    def best(cap: float) -> float:  # brute force over all 5**6 choices
        top = -math.inf
        for pick in itertools.product(range(options), repeat=classes):
            if sum(weights[j][k] for j, k in enumerate(pick)) <= cap:
                top = max(top, sum(values[j][k] for j, k in enumerate(pick)))
        return top

    sol = solve_mckp(values, weights, capacity)
    real_weight = sum(weights[j][k] for j, k in enumerate(sol.choice))
    assert real_weight <= capacity + 1e-9 and sol.weight == pytest.approx(real_weight)
    assert sol.value == pytest.approx(sum(values[j][k] for j, k in enumerate(sol.choice)))
    assert sol.value >= best(capacity - (classes + 1) * sol.delta) - 1e-9
    assert sol.value <= best(capacity) + 1e-9


def test_infeasible_budget_names_the_minimum():
    with pytest.raises(BudgetError, match=r"minimum reachable 3 ms"):
        solve_mckp([[1.0, 2.0], [1.0]], [[1.0, 2.0], [2.0]], 2.5)


# ------------------------------------------------------------------------------ latency model


def test_latency_model_predicts_sums_and_freezes_c_in(tiny):
    _, plan = tiny
    table = DictLatencyTable.from_function(plan.configs(), macs_staircase_ms)
    lm = LatencyModel(plan, table, fixed_ms=0.25, fixed_source="test")
    dense = {"res": 32, "inner": 32}
    costs = lm.layer_costs(dense)
    assert lm.dense_ms() == pytest.approx(sum(costs.values()) + 0.25)
    assert lm.min_latency() == pytest.approx(lm.predict({"res": 8, "inner": 8}))
    widths, const = lm.option_weights({"res": 32, "inner": 24}, {"res": [8, 16, 32], "inner": [8, 24]})
    conv = lambda l, a, b: macs_staircase_ms(plan.layer_config(l, {"res": a, "inner": b}))
    l1, l2, l3, fc = plan.layers
    assert widths["res"][0] == pytest.approx(conv(l1, 8, 24) + conv(l3, 8, 24))  # conv3 at frozen c_in 24
    assert widths["inner"][1] == pytest.approx(conv(l2, 32, 24))  # conv2 at frozen c_in 32
    assert const == pytest.approx(0.25 + macs_staircase_ms(plan.layer_config(fc, {"res": 32})))
    assert lm.delta_ms(dense, "inner", 8) == pytest.approx(lm.predict({"res": 32, "inner": 8}) - lm.predict(dense))
    calibrated = lm.with_measured_dense(lm.dense_ms() + 1.0)
    assert calibrated.fixed_ms == pytest.approx(1.25) and calibrated.dense_ms() == pytest.approx(lm.dense_ms() + 1.0)
    assert fixed_part(1.0, 2.0) == 0.0


def test_latency_model_raises_on_missing_configs(tiny):
    _, plan = tiny
    table = DictLatencyTable({})
    with pytest.raises(MissingConfigsError) as exc:
        LatencyModel(plan, table).dense_ms()
    assert len(exc.value.missing) == 4  # every missing config named at once


# ------------------------------------------------------------------------------ width choice


def test_choose_widths_fits_and_respects_units(tiny):
    model, plan = tiny
    table = DictLatencyTable.from_function(plan.configs(), macs_staircase_ms)
    lm = LatencyModel(plan, table, fixed_ms=0.01)
    scores = SPLampImportance().scores(model, plan)
    lo, hi = lm.min_latency(), lm.dense_ms()
    for frac in (0.9, 0.5, 0.1):
        budget = lo + frac * (hi - lo)
        res = choose_widths(plan, lm, scores, None, budget)
        assert res.predicted_ms <= budget
        assert all(res.widths[g.name] in g.choices for g in plan.groups)
        assert res.solver == "dp" and res.solver_s >= 0
    with pytest.raises(BudgetError, match=f"{lm.min_latency():.4g} ms"):
        choose_widths(plan, lm, scores, None, 0.5 * lm.min_latency())


def test_uniform_policy_takes_the_largest_ratio_that_fits(tiny):
    model, plan = tiny
    plan = tiny_resnet_plan(width=32, inner=16)
    table = DictLatencyTable.from_function(plan.configs(), macs_staircase_ms)
    lm = LatencyModel(plan, table)
    scores = SPLampImportance().scores(TinyResNet(32, 16), plan)
    budget = 0.5 * lm.dense_ms()
    res = choose_widths(plan, lm, scores, None, budget, policy="uniform")
    assert res.predicted_ms <= budget
    r = float(res.notes[0].split()[-1])
    for g in plan.groups:  # one ratio, nearest allowed choice at or above it
        assert res.widths[g.name] == min(c for c in g.choices if c >= r * g.width - 1e-9)
    bigger = sorted({c / g.width for g in plan.groups for c in g.choices if c / g.width > r})
    if bigger:
        w = {g.name: min(c for c in g.choices if c >= bigger[0] * g.width - 1e-9) for g in plan.groups}
        assert lm.predict(w) > budget


def test_exact_is_at_least_dp_and_both_fit_the_true_model():
    rng = np.random.default_rng(7)
    for trial in range(12):
        plan = random_chain_plan(rng, n_groups=int(rng.integers(2, 4)))
        monotone = bool(trial % 2)
        table = random_table(plan, rng, monotone=monotone)
        lm = LatencyModel(plan, table, fixed_ms=0.05)
        scores = {g.name: torch.from_numpy(rng.uniform(0.01, 1, g.width)) for g in plan.groups}
        names = [g.name for g in plan.groups]
        every = [lm.predict(dict(zip(names, combo)))
                 for combo in itertools.product(*[plan.group(n).choices for n in names])]
        budget = float(rng.uniform(min(every), max(every)))
        ex = choose_widths(plan, lm, scores, None, budget, solver="exact", time_limit_s=20)
        assert ex.predicted_ms <= budget * (1 + 1e-9) and ex.optimal
        try:
            dp = choose_widths(plan, lm, scores, None, budget, solver="dp")
        except BudgetError:
            # frozen c_in may miss a point off the narrow end only on a table that is not monotone
            assert not monotone and lm.min_latency() > budget
            continue
        assert dp.predicted_ms <= budget * (1 + 1e-9)
        assert ex.value >= dp.value - 1e-6 * max(1.0, abs(dp.value))
        assert ex.estimate_ms == pytest.approx(ex.predicted_ms)
        # the exact model is optimal: brute force over all widths agrees
        units = {g.name: group_units(g, scores[g.name]) for g in plan.groups}
        best = max(
            sum(units[n].values[units[n].widths.index(w)] for n, w in zip(names, combo))
            for combo in itertools.product(*[plan.group(n).choices for n in names])
            if lm.predict(dict(zip(names, combo))) <= budget
        )
        assert ex.value == pytest.approx(best, rel=1e-6)


def test_coupled_problem_latency_equals_the_model():
    rng = np.random.default_rng(3)
    plan = random_chain_plan(rng, n_groups=3)
    lm = LatencyModel(plan, random_table(plan, rng), fixed_ms=0.1)
    options = {g.name: list(g.choices) for g in plan.groups}
    prob = build_coupled_problem(lm, lm.full_widths(), options, {g: np.zeros(len(o)) for g, o in options.items()})
    for _ in range(10):
        choice = {g: int(rng.integers(len(o))) for g, o in options.items()}
        widths = {g: options[g][k] for g, k in choice.items()}
        assert prob.latency(choice) == pytest.approx(lm.predict(widths))
    with pytest.raises(BudgetError):
        solve_coupled_milp(prob, 0.5 * lm.min_latency())


def test_repair_fixes_an_underestimating_solution():
    rng = np.random.default_rng(11)
    plan = random_chain_plan(rng, n_groups=3, depthwise=False)
    lm = LatencyModel(plan, random_table(plan, rng, monotone=True))
    scores = {g.name: torch.from_numpy(rng.uniform(0.01, 1, g.width)) for g in plan.groups}
    units = {g.name: group_units(g, scores[g.name]) for g in plan.groups}
    start = lm.full_widths()
    budget = 0.5 * (lm.min_latency() + lm.predict(start))
    assert lm.predict(start) > budget
    widths, steps = repair(lm, units, start, budget)
    assert lm.predict(widths) <= budget and steps >= 1


# -------------------------------------------------------------------------- schedule, budgets


def test_exponential_schedule_decreases_to_the_budget():
    c = exponential_schedule(10.0, 4.0, 5)
    assert len(c) == 5 and c[-1] == 4.0 and c[0] < 10.0
    assert all(a > b for a, b in zip(c, c[1:]))
    ratios = [b / a for a, b in zip(c, c[1:])]
    assert np.allclose(ratios, ratios[0])  # a constant fraction per step
    assert exponential_schedule(10.0, 4.0, 1) == [4.0]
    assert exponential_schedule(4.0, 10.0, 3) == [10.0] * 3
    with pytest.raises(BudgetError):
        exponential_schedule(10.0, 4.0, 0)


@pytest.mark.parametrize("text, expected", [
    ("0.5", 5.0), (0.25, 2.5), ("1", 10.0), ("50%", 5.0), ("12ms", 12.0), ("12 ms", 12.0),
    ("800us", 0.8), ("0.002s", 2.0), ("2x", 5.0), ("1.5e1ms", 15.0),
])
def test_parse_budget_accepts(text, expected):
    assert parse_budget(text, 10.0) == pytest.approx(expected)


@pytest.mark.parametrize("text, match", [
    ("fast", "cannot read"), ("", "cannot read"), ("-1", "cannot read"), ("0", "positive"), ("0ms", "positive"),
    ("1.5", "at most 1"), ("150%", "at most 100%"), ("0.5x", "at least 1x"), ("12 parsecs", "cannot read"),
])
def test_parse_budget_rejects(text, match):
    with pytest.raises(BudgetError, match=match):
        parse_budget(text, 10.0)


def test_parse_budget_needs_a_dense_latency():
    with pytest.raises(BudgetError, match="dense latency"):
        parse_budget("0.5", 0.0)


def test_slack_refill_never_loses_value_and_still_fits(tiny):
    model, plan = tiny
    lm = LatencyModel(plan, DictLatencyTable.from_function(plan.configs(), macs_staircase_ms))
    scores = SPLampImportance().scores(model, plan)
    for frac in (0.3, 0.6):
        budget = lm.min_latency() + frac * (lm.dense_ms() - lm.min_latency())
        one = choose_widths(plan, lm, scores, None, budget, refine=0)
        refilled = choose_widths(plan, lm, scores, None, budget)
        assert one.predicted_ms <= budget and refilled.predicted_ms <= budget
        assert refilled.value >= one.value


def test_exact_falls_back_to_dp_when_it_gives_up(tiny, monkeypatch):
    import fleetprune.pruner.solve as solve_mod
    from fleetprune.pruner.exact import SolverLimitError

    def give_up(*args, **kwargs):
        raise SolverLimitError("no feasible answer within the time limit")

    monkeypatch.setattr(solve_mod, "solve_coupled_milp", give_up)
    model, plan = tiny
    lm = LatencyModel(plan, DictLatencyTable.from_function(plan.configs(), macs_staircase_ms))
    budget = 0.5 * (lm.min_latency() + lm.dense_ms())
    res = choose_widths(plan, lm, SPLampImportance().scores(model, plan), None, budget, solver="exact")
    assert res.solver == "dp" and res.predicted_ms <= budget and "used dp" in res.notes[-1]


def test_dp_is_fast_on_a_resnet50_sized_instance():
    import time

    rng = np.random.default_rng(0)
    values = [np.cumsum(rng.uniform(0, 1, 32)) for _ in range(50)]
    weights = [np.cumsum(rng.uniform(0.001, 0.01, 32)) for _ in range(50)]
    capacity = 0.5 * sum(w.max() for w in weights)
    inst = integerise(weights, capacity)
    start = time.perf_counter()
    sol = solve_mckp(values, weights, capacity)
    elapsed = time.perf_counter() - start
    assert inst.capacity > 4000 and sol.weight <= capacity
    assert elapsed < 1.0  # about 20 ms on an idle core; loose for shared CI machines
