"""The multiple-choice (group) knapsack of method.md §5.1, solved by DP over integerised latency.

Exactly one option is chosen per class. Weights are real latencies (ms); each is shifted by its
class minimum and rounded *up* to a multiple of ``delta`` while the capacity is rounded *down*, so
every DP answer is feasible for the real weights. The unused budget this costs is at most
``M * delta``; the default ``delta = capacity / (resolution * M)`` bounds it by ``1/resolution`` of
the capacity (0.5% at the default 200).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fleetprune.errors import BudgetError

log = logging.getLogger(__name__)

DEFAULT_RESOLUTION = 200


@dataclass(frozen=True)
class Integerised:
    """A knapsack instance on integer weights.

    Attributes:
        weights: per class, integer weights ``ceil((w - min_w) / delta)`` (so the lightest option is 0).
        capacity: ``floor((capacity - sum of class minima) / delta)``.
        offset: the sum of the class minima (real ms), taken off the capacity.
        delta: ms per integer unit.
    """

    weights: list[np.ndarray]
    capacity: int
    offset: float
    delta: float


@dataclass(frozen=True)
class MCKPSolution:
    """The chosen option index of every class, with its total value and real total weight."""

    choice: list[int]
    value: float
    weight: float
    delta: float
    capacity_units: int


def _check(values: Sequence[Sequence[float]], weights: Sequence[Sequence[float]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if len(values) != len(weights) or not values:
        raise ValueError(f"need one value and one weight list per class, got {len(values)} and {len(weights)}")
    vals = [np.asarray(v, dtype=np.float64) for v in values]
    wts = [np.asarray(w, dtype=np.float64) for w in weights]
    for j, (v, w) in enumerate(zip(vals, wts)):
        if v.ndim != 1 or v.shape != w.shape or v.size == 0:
            raise ValueError(f"class {j}: values and weights must be equal-length non-empty vectors")
        if not (np.isfinite(v).all() and np.isfinite(w).all()):
            raise ValueError(f"class {j}: values and weights must be finite")
    return vals, wts


def minimum_weight(weights: Sequence[Sequence[float]]) -> float:
    """The lightest reachable total: every class at its lightest option."""
    return float(sum(np.min(np.asarray(w, dtype=np.float64)) for w in weights))


def integerise(weights: Sequence[Sequence[float]], capacity: float, delta: float | None = None,
               resolution: int = DEFAULT_RESOLUTION) -> Integerised:
    """Round weights up and the capacity down onto a grid of ``delta`` ms (see the module doc)."""
    wts = [np.asarray(w, dtype=np.float64) for w in weights]
    offset = minimum_weight(wts)
    if delta is None:
        scale = capacity if capacity > 0 else max(float(np.ptp(w)) for w in wts)
        delta = (scale if scale > 0 else 1.0) / (resolution * len(wts))
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    iw = []
    for w in wts:
        q = np.ceil((w - w.min()) / delta)
        q = q + (q * delta < (w - w.min()))  # guard the ceil against float rounding down
        iw.append(q.astype(np.int64))
    slack = capacity - offset
    cap = math.floor(slack / delta) if slack >= 0 else -1
    if cap >= 0 and cap * delta > slack:
        cap -= 1
    return Integerised(weights=iw, capacity=cap, offset=offset, delta=float(delta))


def solve_mckp(
    values: Sequence[Sequence[float]],
    weights: Sequence[Sequence[float]],
    capacity: float,
    *,
    delta: float | None = None,
    resolution: int = DEFAULT_RESOLUTION,
) -> MCKPSolution:
    """Maximise the summed value choosing exactly one option per class, total weight <= capacity.

    Args:
        values: per class, the value of each option (any real numbers).
        weights: per class, the real weight (ms) of each option.
        capacity: the budget for the summed weights (ms).
        delta: ms per integer unit; default ``capacity / (resolution * n_classes)``.
        resolution: see ``delta``.

    Raises:
        BudgetError: even the lightest option of every class exceeds ``capacity``; the message
            gives that minimum.
    """
    vals, wts = _check(values, weights)
    minimum = minimum_weight(wts)
    if minimum > capacity:
        raise BudgetError(
            f"the latency budget ({capacity:.4g} ms for the pruned layers) is below the minimum reachable "
            f"{minimum:.4g} ms (every group at its smallest width); raise the budget to at least that"
        )
    # Everything fits: take the most valuable option of every class, no DP needed.
    if sum(float(w.max()) for w in wts) <= capacity:
        choice = [_best_heaviest_free(v, w) for v, w in zip(vals, wts)]
        return _solution(vals, wts, choice, delta or 0.0, -1)
    inst = integerise(wts, capacity, delta, resolution)
    choice = _dp(vals, inst.weights, inst.capacity)
    return _solution(vals, wts, choice, inst.delta, inst.capacity)


def _best_heaviest_free(v: np.ndarray, w: np.ndarray) -> int:
    # among the options of maximal value, the lightest
    best = np.flatnonzero(v == v.max())
    return int(best[np.argmin(w[best])])


def _solution(vals: list[np.ndarray], wts: list[np.ndarray], choice: list[int], delta: float, cap: int) -> MCKPSolution:
    return MCKPSolution(
        choice=choice,
        value=float(sum(v[k] for v, k in zip(vals, choice))),
        weight=float(sum(w[k] for w, k in zip(wts, choice))),
        delta=delta,
        capacity_units=cap,
    )


def _pareto(v: np.ndarray, w: np.ndarray, cap: int) -> np.ndarray:
    """Indices of the options worth trying: within capacity, and no lighter option is as valuable."""
    idx = np.flatnonzero(w <= cap)
    idx = idx[np.lexsort((-v[idx], w[idx]))]  # by weight, then best value first
    keep, best = [], -np.inf
    for i in idx:
        if v[i] > best:
            keep.append(i)
            best = v[i]
    return np.asarray(keep, dtype=np.int64)


def solve_integer_mckp(values: Sequence[Sequence[float]], int_weights: Sequence[Sequence[int]], capacity: int) -> list[int]:
    """The DP on already-integer weights (non-negative); returns the chosen option per class."""
    vals = [np.asarray(v, dtype=np.float64) for v in values]
    iw = [np.asarray(w, dtype=np.int64) for w in int_weights]
    if capacity < 0 or any((w < 0).any() for w in iw):
        raise ValueError("integer weights and capacity must be >= 0")
    if sum(int(w.min()) for w in iw) > capacity:
        raise BudgetError(f"integer capacity {capacity} is below the minimum {sum(int(w.min()) for w in iw)}")
    return _dp(vals, iw, capacity)


def _dp(vals: list[np.ndarray], iw: list[np.ndarray], cap: int) -> list[int]:
    """f_j(b) = max_k f_{j-1}(b - w_jk) + v_jk over capacities b = 0..cap, vectorised over b.

    Only the f tables are stored; the backtrack re-finds the maximising option by recomputing the
    same float sums (bit-identical), which saves an argmax array and keeps the forward pass to
    one add and one maximum per option.
    """
    n = cap + 1
    m = len(vals)
    f = np.empty((m + 1, n), dtype=np.float64)
    f[0] = 0.0  # f_0(b) = 0: "at most b" capacity semantics
    cand = np.empty(n, dtype=np.float64)
    kept = []
    for j in range(m):
        v, w = vals[j], iw[j]
        opts = _pareto(v, w, cap)
        kept.append(opts)
        row = f[j + 1]
        row.fill(-np.inf)
        prev = f[j]
        for k in opts:
            wk = int(w[k])
            seg = cand[: n - wk]
            np.add(prev[: n - wk], v[k], out=seg)
            np.maximum(row[wk:], seg, out=row[wk:])
    if not np.isfinite(f[m, cap]):
        raise BudgetError("no combination of options fits the capacity")
    choice = [0] * m
    b = cap
    for j in range(m - 1, -1, -1):
        target = f[j + 1, b]
        for k in kept[j]:
            wk = int(iw[j][k])
            if wk <= b and f[j, b - wk] + vals[j][k] == target:
                choice[j] = int(k)
                b -= wk
                break
        else:  # pragma: no cover - the forward pass guarantees a match
            raise RuntimeError("knapsack backtrack found no matching option")
    return choice
