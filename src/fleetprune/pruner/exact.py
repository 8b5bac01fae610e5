"""``--solver exact``: the c_in/c_out coupling modeled exactly as a MILP (method.md §5.4).

Binary ``x[G,k]`` picks option k of class G (exactly one per class). For every pair of distinct
classes (A, G) that some layer connects (A produces its input, G its output), continuous
``y[A,G,k,k']`` in [0, 1] stand for the product ``x[A,k] * x[G,k']``. Instead of the spec's
``y <= x`` rows plus ``sum y = 1`` we write the marginals ``sum_k' y[k,k'] = x[A,k]`` and
``sum_k y[k,k'] = x[G,k']``: for one-hot x this forces the same unique y (so the model is still
exact), it needs K_A + K_G rows instead of 2 K_A K_G, and its LP relaxation is tighter. Layers
sharing a class pair share their y variables (their cost matrices are summed), so the size is
sum over connected pairs of K_A * K_G. HiGHS solves it through ``scipy.optimize.milp``.
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


@dataclass
class CoupledProblem:
    """The width problem with exact pairwise latency.

    Attributes:
        classes: class (group) names, in a fixed order.
        options: per class, the option widths (ascending).
        values: per class, the option values (aligned with ``options``).
        unary: per class, latency that depends on that class alone (ms per option): layers whose
            other side is fixed, and depthwise layers (in and out both the class).
        pairs: ``(in_class, out_class) -> cost[k_in, k_out]`` (ms), summed over the layers that
            connect them.
        constant: latency of layers touching no class, plus the model's fixed part (ms).
    """

    classes: list[str]
    options: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    unary: dict[str, np.ndarray] = field(default_factory=dict)
    pairs: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    constant: float = 0.0

    def latency(self, choice: Mapping[str, int]) -> float:
        """Modeled latency (ms) of a choice of option indices; equals the latency model's prediction."""
        total = self.constant
        for g in self.classes:
            total += float(self.unary[g][choice[g]])
        for (a, g), cost in self.pairs.items():
            total += float(cost[choice[a], choice[g]])
        return total

    def value(self, choice: Mapping[str, int]) -> float:
        """Summed option value of a choice."""
        return float(sum(self.values[g][choice[g]] for g in self.classes))

    @property
    def n_pair_variables(self) -> int:
        """How many y variables the MILP has."""
        return int(sum(c.size for c in self.pairs.values()))


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
) -> CoupledProblem:
    """Assemble the exact problem from a :class:`~fleetprune.pruner.latency.LatencyModel`.

    Groups that are not in ``options`` stay at their ``current`` width.
    """
    full = latency_model.full_widths(current)
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
        a, g = layer.in_group, layer.out_group
        a_cls = a is not None and a in opts
        g_cls = g is not None and g in opts
        a_fixed = None if a is None else [full[a]]
        g_fixed = None if g is None else [full[g]]
        if a_cls and g_cls and a == g:  # depthwise: one width on both sides
            prob.unary[g] += np.array([latency_model.layer_ms(layer, int(w), int(w)) for w in opts[g]])
        elif a_cls and g_cls:
            cost = latency_model.pair_costs(layer, opts[a], opts[g])
            prob.pairs[(a, g)] = prob.pairs.get((a, g), 0.0) + cost
        elif g_cls:
            prob.unary[g] += latency_model.pair_costs(layer, a_fixed, opts[g])[0]
        elif a_cls:
            prob.unary[a] += latency_model.pair_costs(layer, opts[a], g_fixed)[:, 0]
        else:
            prob.constant += float(latency_model.pair_costs(layer, a_fixed, g_fixed)[0, 0])
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
        BudgetError: the problem is infeasible (the budget is below the minimum latency), or no
            feasible solution was found within the time limit.
    """
    classes = problem.classes
    x_off, n = {}, 0
    for g in classes:
        x_off[g] = n
        n += len(problem.options[g])
    n_x = n
    y_off = {}
    for key, cost in problem.pairs.items():
        y_off[key] = n
        n += cost.size

    c = np.zeros(n)
    budget_row = np.zeros(n)
    for g in classes:
        k = len(problem.options[g])
        c[x_off[g]:x_off[g] + k] = -problem.values[g]
        budget_row[x_off[g]:x_off[g] + k] = problem.unary[g]
    for key, cost in problem.pairs.items():
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
    for (a, g), cost in problem.pairs.items():
        ka, kg = cost.shape
        base = y_off[(a, g)]
        grid = base + np.arange(ka * kg).reshape(ka, kg)
        for i in range(ka):  # sum_k' y[i,k'] = x[a,i]
            add_row(np.append(grid[i], x_off[a] + i), np.append(np.ones(kg), -1.0), 0.0, 0.0)
        for j in range(kg):  # sum_k y[k,j] = x[g,j]
            add_row(np.append(grid[:, j], x_off[g] + j), np.append(np.ones(ka), -1.0), 0.0, 0.0)
    nz = np.flatnonzero(budget_row)
    add_row(nz, budget_row[nz], -np.inf, budget_ms - problem.constant)

    a_mat = sparse.csr_array((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))), shape=(r, n))
    integrality = np.zeros(n)
    integrality[:n_x] = 1
    log.debug("MILP: %d binaries, %d pair variables, %d rows", n_x, n - n_x, r)
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
        raise BudgetError(
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
