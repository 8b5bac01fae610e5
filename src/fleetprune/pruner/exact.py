"""``--solver exact``: the c_in/c_out coupling modeled exactly as a MILP (method.md §5.4).

Binary ``x[G,k]`` picks option k of class G (exactly one per class). A layer whose latency depends
on two or more classes (its input group(s) and its output group) contributes a *factor*: continuous
``y[k_1..k_n]`` in [0, 1] over the option combinations of those classes, standing for the product
``x[G_1,k_1] * ... * x[G_n,k_n]``. Instead of the spec's ``y <= x`` rows plus ``sum y = 1`` we
write the marginals ``sum over the other axes of y = x[G_i, k_i]`` for every class i and option
k_i: for one-hot x this forces the same unique y (so the model is still exact), it needs
``sum_i K_i`` rows instead of ``n * prod_i K_i``, and its LP relaxation is tighter. Layers with the
same set of classes share one factor (their cost tensors are summed), so for a ResNet the size is
the spec's sum over connected class pairs of K_A * K_G; a concat of several groups makes a factor
of higher order. HiGHS solves it through ``scipy.optimize.milp``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from fleetprune.errors import BudgetError

log = logging.getLogger(__name__)


class SolverLimitError(BudgetError):
    """The exact solver cannot answer within its limits (time, problem size); the DP still can."""


@dataclass
class CoupledProblem:
    """The width problem with exact latency coupling.

    Attributes:
        classes: class (group) names, in a fixed order.
        options: per class, the option widths (ascending).
        values: per class, the option values (aligned with ``options``).
        unary: per class, latency that depends on that class alone (ms per option): layers whose
            other side is fixed, and depthwise layers (in and out both the class).
        factors: ``(class_1, ..., class_n) -> cost tensor`` (ms, one axis per class, n >= 2),
            summed over the layers that depend on exactly those classes.
        constant: latency of layers touching no class, plus the model's fixed part (ms).
    """

    classes: list[str]
    options: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    unary: dict[str, np.ndarray] = field(default_factory=dict)
    factors: dict[tuple[str, ...], np.ndarray] = field(default_factory=dict)
    constant: float = 0.0

    def latency(self, choice: Mapping[str, int]) -> float:
        """Modeled latency (ms) of a choice of option indices; equals the latency model's prediction."""
        total = self.constant
        for g in self.classes:
            total += float(self.unary[g][choice[g]])
        for key, cost in self.factors.items():
            total += float(cost[tuple(choice[g] for g in key)])
        return total

    def value(self, choice: Mapping[str, int]) -> float:
        """Summed option value of a choice."""
        return float(sum(self.values[g][choice[g]] for g in self.classes))

    @property
    def n_factor_variables(self) -> int:
        """How many y variables the MILP has."""
        return int(sum(c.size for c in self.factors.values()))


@dataclass(frozen=True)
class ExactSolution:
    """The MILP's answer: option index per class, its value and modeled latency, and solve status."""

    choice: dict[str, int]
    value: float
    latency_ms: float
    optimal: bool
    status: str
    solve_s: float


def build_coupled_problem(
    latency_model: Any,
    current: Mapping[str, int],
    options: Mapping[str, Sequence[int]],
    values: Mapping[str, Sequence[float]],
    *,
    max_factor_size: int = 200_000,
) -> CoupledProblem:
    """Assemble the exact problem from a :class:`~fleetprune.pruner.latency.LatencyModel`.

    Groups that are not in ``options`` stay at their ``current`` width.

    Raises:
        SolverLimitError: one layer's factor (a concat of many pruned groups) would exceed
            ``max_factor_size`` variables; use the DP solver for such a model.
    """
    classes = list(options)
    opts = {g: np.asarray(options[g], dtype=np.int64) for g in classes}
    prob = CoupledProblem(
        classes=classes,
        options=opts,
        values={g: np.asarray(values[g], dtype=np.float64) for g in classes},
        unary={g: np.zeros(len(opts[g])) for g in classes},
        constant=float(latency_model.fixed_ms),
    )
    for layer in latency_model.layers:
        key = tuple(g for g in latency_model.depends_on(layer) if g in opts)
        size = int(np.prod([len(opts[g]) for g in key])) if key else 1
        if size > max_factor_size:
            raise SolverLimitError(
                f"the exact solver would need {size} variables for layer {layer.name} (it reads {len(key)} pruned "
                "groups at once); use --solver dp for this model"
            )
        order = sorted(range(len(key)), key=lambda i: classes.index(key[i]))
        key = tuple(key[i] for i in order)  # canonical class order, so layers with one class set share a factor
        cost = latency_model.cost_tensor(layer, key, options, current)
        if not key:
            prob.constant += float(cost)
        elif len(key) == 1:
            prob.unary[key[0]] += cost
        else:
            prob.factors[key] = prob.factors.get(key, 0.0) + cost
    return prob


def solve_coupled_milp(
    problem: CoupledProblem,
    budget_ms: float,
    *,
    time_limit_s: float = 60.0,
    mip_rel_gap: float = 1e-6,
) -> ExactSolution:
    """Maximise the summed value subject to the exact modeled latency <= ``budget_ms``.

    Returns the best solution HiGHS found; ``optimal`` is False when the time limit stopped it.

    Raises:
        BudgetError: the problem is infeasible (the budget is below the minimum latency).
        SolverLimitError: no feasible solution was found within the time limit.
    """
    classes = problem.classes
    x_off, n = {}, 0
    for g in classes:
        x_off[g] = n
        n += len(problem.options[g])
    n_x = n
    y_off = {}
    for key, cost in problem.factors.items():
        y_off[key] = n
        n += cost.size

    c = np.zeros(n)
    budget_row = np.zeros(n)
    for g in classes:
        k = len(problem.options[g])
        c[x_off[g]:x_off[g] + k] = -problem.values[g]
        budget_row[x_off[g]:x_off[g] + k] = problem.unary[g]
    for key, cost in problem.factors.items():
        budget_row[y_off[key]:y_off[key] + cost.size] = cost.ravel()

    rows, cols, data, lo, hi = [], [], [], [], []
    r = 0

    def add_row(col_idx: np.ndarray, coef: np.ndarray, lb: float, ub: float) -> None:
        nonlocal r
        rows.append(np.full(len(col_idx), r))
        cols.append(np.asarray(col_idx))
        data.append(np.asarray(coef, dtype=np.float64))
        lo.append(lb)
        hi.append(ub)
        r += 1

    for g in classes:  # exactly one option per class
        k = len(problem.options[g])
        add_row(np.arange(x_off[g], x_off[g] + k), np.ones(k), 1.0, 1.0)
    for key, cost in problem.factors.items():
        grid = y_off[key] + np.arange(cost.size).reshape(cost.shape)
        for axis, g in enumerate(key):  # marginal of y along each class equals that class's x
            for k in range(cost.shape[axis]):
                cells = np.take(grid, k, axis=axis).ravel()
                add_row(np.append(cells, x_off[g] + k), np.append(np.ones(cells.size), -1.0), 0.0, 0.0)
    nz = np.flatnonzero(budget_row)
    add_row(nz, budget_row[nz], -np.inf, budget_ms - problem.constant)

    a_mat = sparse.csr_array((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))), shape=(r, n))
    integrality = np.zeros(n)
    integrality[:n_x] = 1
    log.debug("MILP: %d binaries, %d factor variables, %d rows", n_x, n - n_x, r)
    start = time.perf_counter()
    res = milp(
        c,
        constraints=LinearConstraint(a_mat, np.asarray(lo), np.asarray(hi)),
        integrality=integrality,
        bounds=Bounds(0.0, 1.0),
        options={"time_limit": float(time_limit_s), "mip_rel_gap": float(mip_rel_gap), "disp": False},
    )
    elapsed = time.perf_counter() - start
    if res.x is None:
        if res.status == 2:
            raise BudgetError(f"the exact solver finds no width choice within {budget_ms:.4g} ms; raise the budget")
        raise SolverLimitError(
            f"the exact solver found no feasible width choice within its {time_limit_s:g} s time limit "
            f"({res.message}); raise the time limit or use --solver dp"
        )
    choice = {g: int(np.argmax(res.x[x_off[g]:x_off[g] + len(problem.options[g])])) for g in classes}
    return ExactSolution(
        choice=choice,
        value=problem.value(choice),
        latency_ms=problem.latency(choice),
        optimal=res.status == 0,
        status=str(res.message),
        solve_s=elapsed,
    )
