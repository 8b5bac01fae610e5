"""One pruning step's width choice (method.md §5.5): classes, options, solve, verify, repair.

Options of a prunable group are the plan's width choices that fit its surviving channels; their
values are SP-LAMP (or baseline) unit prefix sums (:mod:`fleetprune.pruner.units`). Width policies:

* ``knapsack`` (default) with ``solver='dp'``: the multiple-choice knapsack over weights with c_in
  frozen at the current widths (HALP), then verified against the full latency model and repaired;
  with ``solver='exact'``: the MILP with exact c_in/c_out coupling (:mod:`~fleetprune.pruner.exact`).
* ``uniform``: one keep ratio r for every group (the nearest allowed choice at or above r times the
  dense width), the largest r that meets the budget.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from fleetprune.errors import BudgetError
from fleetprune.pruner.exact import SolverLimitError, build_coupled_problem, solve_coupled_milp
from fleetprune.pruner.knapsack import DEFAULT_RESOLUTION, solve_mckp
from fleetprune.pruner.scores import alive_mask
from fleetprune.pruner.units import GroupUnits, group_units

log = logging.getLogger(__name__)

SOLVERS = ("dp", "exact")
POLICIES = ("knapsack", "uniform")
# Predictions are sums of a few hundred floats; allow their rounding when comparing with a budget.
_TOL = 1e-9


@dataclass
class WidthChoice:
    """The outcome of one width choice.

    Attributes:
        widths: the new width of every group (non-prunable groups at their current width).
        predicted_ms: the latency model's prediction at ``widths`` (fixed part included).
        budget_ms: the budget it was chosen for.
        estimate_ms: the solver's own estimate before verification (frozen c_in for ``dp``).
        value: summed option value (kept importance) over the prunable groups.
        policy: ``knapsack`` or ``uniform``; solver: ``dp``, ``exact`` or ``uniform``.
        solver_s: seconds spent inside the solver; total_s: the whole call.
        repair_steps: units the repair dropped after verification.
        optimal: for ``exact``, whether HiGHS proved optimality; else None.
        notes: anything the caller may want to log (fallbacks).
    """

    widths: dict[str, int]
    predicted_ms: float
    budget_ms: float
    estimate_ms: float
    value: float
    policy: str
    solver: str
    solver_s: float
    total_s: float = 0.0
    repair_steps: int = 0
    optimal: bool | None = None
    notes: list[str] = field(default_factory=list)


def _budget_error(budget_ms: float, minimum_ms: float, dense_ms: float | None = None) -> BudgetError:
    dense = f"; dense is {dense_ms:.4g} ms" if dense_ms is not None else ""
    return BudgetError(
        f"the latency budget {budget_ms:.4g} ms is below the minimum reachable {minimum_ms:.4g} ms (every group at "
        f"its narrowest allowed width{dense}); ask for at least {minimum_ms:.4g} ms or build the plan with a finer "
        "width grid"
    )


def current_widths_from(plan: Any, masks: Mapping[str, torch.Tensor] | None,
                        current_widths: Mapping[str, int] | None = None) -> dict[str, int]:
    """The width of every group now: survivors of each mask, else ``current_widths``, else dense."""
    out = {g.name: int(g.width) for g in plan.groups}
    if current_widths:
        out.update({k: int(v) for k, v in current_widths.items()})
    for g in plan.groups:
        if masks is not None and g.name in masks:
            n = int(alive_mask(g, masks).sum())
            if current_widths and g.name in current_widths and int(current_widths[g.name]) != n:
                raise ValueError(f"group {g.name!r}: current width {current_widths[g.name]} but its mask keeps {n}")
            out[g.name] = n
    return out


def choose_widths(
    plan: Any,
    latency_model: Any,
    scores: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None,
    budget_ms: float,
    *,
    current_widths: Mapping[str, int] | None = None,
    solver: str = "dp",
    policy: str = "knapsack",
    resolution: int = DEFAULT_RESOLUTION,
    time_limit_s: float = 60.0,
    refine: int = 8,
) -> WidthChoice:
    """Choose every prunable group's width for one step so the modeled latency is <= ``budget_ms``.

    Args:
        plan: the channel plan.
        latency_model: a :class:`~fleetprune.pruner.latency.LatencyModel` (fixed part included).
        scores: ``{group: dense-length scores}`` from an importance (masked entries ignored).
        masks: current survivors per group (None or absent = all alive).
        budget_ms: this step's target C_t for the whole network (ms).
        current_widths: widths of groups without a mask (defaults to dense); must agree with masks.
        solver: ``dp`` (MCKP, frozen c_in, then verify and repair) or ``exact`` (MILP).
        policy: ``knapsack`` or ``uniform``.
        resolution: DP grid, ``delta = budget / (resolution * n_classes)``.
        time_limit_s: the exact solver's limit; without a feasible answer by then it falls back to DP.
        refine: for ``dp``, at most this many extra DP solves that bisect an extra capacity when the
            verified latency leaves budget unused (frozen c_in is conservative); 0 = HALP's single
            solve.

    Raises:
        BudgetError: the budget is below the minimum reachable latency (the message gives it).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not (np.isfinite(budget_ms) and budget_ms > 0):
        raise BudgetError(f"the latency budget must be a positive number of ms, got {budget_ms}")
    t0 = time.perf_counter()
    current = current_widths_from(plan, masks, current_widths)
    units: dict[str, GroupUnits] = {
        g.name: group_units(g, scores[g.name], masks) for g in plan.groups if g.prunable
    }
    options = {g: list(u.widths) for g, u in units.items()}
    try:
        if policy == "uniform":
            result = _uniform(plan, latency_model, units, current, budget_ms)
        elif solver == "exact":
            result = _exact(latency_model, units, current, budget_ms, time_limit_s, resolution)
        else:
            result = _dp(latency_model, units, current, budget_ms, resolution, refine)
    except BudgetError:
        # Restate every infeasibility with the whole-network numbers the user can act on.
        narrow = dict(current)
        narrow.update({g: o[0] for g, o in options.items()})
        raise _budget_error(budget_ms, latency_model.predict(narrow),
                            latency_model.predict(latency_model.full_widths(None))) from None
    result.total_s = time.perf_counter() - t0
    log.debug("widths for %.4g ms: predicted %.4g ms (solver estimate %.4g), value %.4f, %s %.3f s, %d repairs",
              budget_ms, result.predicted_ms, result.estimate_ms, result.value, result.solver, result.solver_s,
              result.repair_steps)
    return result


def _value(units: Mapping[str, GroupUnits], widths: Mapping[str, int]) -> float:
    return float(sum(u.values[u.widths.index(widths[g])] for g, u in units.items()))


def _dp(latency_model: Any, units: Mapping[str, GroupUnits], current: dict[str, int], budget_ms: float,
        resolution: int, refine: int = 0) -> WidthChoice:
    names = list(units)
    options = {g: list(units[g].widths) for g in names}
    notes: list[str] = []
    weights, constant = latency_model.option_weights(current, options)
    frozen_min = constant + sum(float(weights[g].min()) for g in names)
    if frozen_min > budget_ms * (1 + _TOL):
        # Frozen c_in overestimates when consumers shrink too; freeze at the narrowest widths instead
        # (optimistic) and let the repair restore feasibility against the true model.
        narrow = dict(current)
        narrow.update({g: o[0] for g, o in options.items()})
        weights, constant = latency_model.option_weights(narrow, options)
        notes.append("frozen-c_in weights exceed the budget at every choice; solved with c_in at the narrowest widths")
        log.info(notes[-1])
    delta = budget_ms / (resolution * max(len(names), 1))
    values = [units[g].values for g in names]
    wlist = [weights[g] for g in names]
    solver_s = 0.0

    def solve(extra: float) -> tuple[dict[str, int], float]:
        nonlocal solver_s
        start = time.perf_counter()
        sol = solve_mckp(values, wlist, budget_ms - constant + extra, delta=delta)
        solver_s += time.perf_counter() - start
        w = dict(current)
        w.update({g: options[g][k] for g, k in zip(names, sol.choice)})
        return w, constant + sol.weight

    widths, estimate = solve(0.0)
    widths, steps = repair(latency_model, units, widths, budget_ms)
    predicted = latency_model.predict(widths)
    if refine > 0 and predicted < budget_ms * (1 - 1 / resolution):
        # Frozen c_in overestimates (consumers shrink too), leaving budget unused; bisect an extra
        # capacity and keep the most valuable answer that truly fits (method §5.3).
        best, best_value, before = widths, _value(units, widths), predicted
        lo, hi = 0.0, constant + sum(float(w.max()) for w in wlist) - budget_ms
        rounds = 0
        while rounds < refine and hi - lo > delta and predicted < budget_ms * (1 - 1 / resolution):
            mid = 0.5 * (lo + hi)
            cand, _ = solve(mid)
            rounds += 1
            if latency_model.predict(cand) <= budget_ms * (1 + _TOL):
                lo = mid
                if _value(units, cand) > best_value:
                    best, best_value, predicted = cand, _value(units, cand), latency_model.predict(cand)
            else:
                hi = mid
        widths = best
        notes.append(f"slack refill: {rounds} extra solves, predicted {before:.4g} -> {predicted:.4g} ms")
    return WidthChoice(widths=widths, predicted_ms=predicted, budget_ms=budget_ms,
                       estimate_ms=estimate, value=_value(units, widths), policy="knapsack", solver="dp",
                       solver_s=solver_s, repair_steps=steps, notes=notes)


def _exact(latency_model: Any, units: Mapping[str, GroupUnits], current: dict[str, int], budget_ms: float,
           time_limit_s: float, resolution: int) -> WidthChoice:
    options = {g: list(u.widths) for g, u in units.items()}
    try:
        problem = build_coupled_problem(latency_model, current, options, {g: u.values for g, u in units.items()})
        sol = solve_coupled_milp(problem, budget_ms, time_limit_s=time_limit_s)
    except SolverLimitError as exc:
        log.warning("exact solver: %s; falling back to the knapsack DP", exc)
        result = _dp(latency_model, units, current, budget_ms, resolution, refine=8)
        result.notes.append(f"exact solver gave up ({exc}); used dp")
        return result
    widths = dict(current)
    widths.update({g: options[g][k] for g, k in sol.choice.items()})
    widths, steps = repair(latency_model, units, widths, budget_ms)  # only float rounding can trigger it
    return WidthChoice(widths=widths, predicted_ms=latency_model.predict(widths), budget_ms=budget_ms,
                       estimate_ms=sol.latency_ms, value=_value(units, widths), policy="knapsack", solver="exact",
                       solver_s=sol.solve_s, repair_steps=steps, optimal=sol.optimal,
                       notes=[] if sol.optimal else [f"exact solver stopped early: {sol.status}"])


def repair(latency_model: Any, units: Mapping[str, GroupUnits], widths: Mapping[str, int],
           budget_ms: float) -> tuple[dict[str, int], int]:
    """Shrink groups until the modeled latency fits ``budget_ms``.

    Each round moves one group down to a narrower option, choosing the move with the least value
    lost per ms saved. Moves further than one unit are considered too, so a flat stretch of the
    latency staircase (one unit saves nothing) does not stall the repair.

    Returns:
        The repaired widths and the number of moves.

    Raises:
        BudgetError: no move saves latency and the budget is still exceeded.
    """
    widths = dict(widths)
    predicted = latency_model.predict(widths)
    steps = 0
    while predicted > budget_ms * (1 + _TOL):
        best: tuple[float, float, str, int] | None = None
        for g, u in units.items():
            i = u.widths.index(widths[g])
            for j in range(i - 1, -1, -1):
                saved = -latency_model.delta_ms(widths, g, u.widths[j])
                if saved <= 0:
                    continue
                ratio = (u.values[i] - u.values[j]) / saved
                if best is None or (ratio, -saved) < (best[0], -best[1]):
                    best = (ratio, saved, g, u.widths[j])
        if best is None:
            narrow = dict(widths)
            narrow.update({g: u.widths[0] for g, u in units.items()})
            minimum = latency_model.predict(narrow)
            if minimum <= budget_ms * (1 + _TOL):
                log.warning("repair stalled at %.4g ms; taking every group's narrowest width", predicted)
                return narrow, steps + 1
            raise BudgetError(f"repair cannot reach {budget_ms:.4g} ms; the narrowest widths give {minimum:.4g} ms")
        widths[best[2]] = best[3]
        predicted = latency_model.predict(widths)
        steps += 1
    return widths, steps


def _uniform(plan: Any, latency_model: Any, units: Mapping[str, GroupUnits], current: dict[str, int],
             budget_ms: float) -> WidthChoice:
    dense = {g.name: int(g.width) for g in plan.groups}

    def at(r: float) -> dict[str, int]:
        w = dict(current)
        for g, u in units.items():
            fits = [c for c in u.widths if c >= r * dense[g] - 1e-9]
            w[g] = fits[0] if fits else u.widths[-1]
        return w

    ratios = sorted({c / dense[g] for g, u in units.items() for c in u.widths})
    start = time.perf_counter()
    if latency_model.predict(at(ratios[0])) > budget_ms * (1 + _TOL):
        raise BudgetError("no uniform ratio fits the budget")
    # bisection for the largest ratio that fits, assuming latency grows with r ...
    lo, hi = 0, len(ratios) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if latency_model.predict(at(ratios[mid])) <= budget_ms * (1 + _TOL):
            lo = mid
        else:
            hi = mid - 1
    # ... and a downward scan in case a staircase made it non-monotone
    while lo > 0 and latency_model.predict(at(ratios[lo])) > budget_ms * (1 + _TOL):
        lo -= 1
    solver_s = time.perf_counter() - start
    widths = at(ratios[lo])
    predicted = latency_model.predict(widths)
    return WidthChoice(widths=widths, predicted_ms=predicted, budget_ms=budget_ms, estimate_ms=predicted,
                       value=_value(units, widths), policy="uniform", solver="uniform", solver_s=solver_s,
                       notes=[f"uniform keep ratio {ratios[lo]:.4f}"])
