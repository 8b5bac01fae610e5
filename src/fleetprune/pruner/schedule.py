"""Budgets: the progressive exponential schedule (method.md §6) and parsing of ``--budget``."""

from __future__ import annotations

import logging
import math
import re

from fleetprune.errors import BudgetError

log = logging.getLogger(__name__)

_BUDGET_HELP = ("write a fraction of the dense latency (0.5 or 50%), an absolute latency (12ms, 800us), "
                "or a speed-up (2x)")


def exponential_schedule(dense_ms: float, budget_ms: float, steps: int) -> list[float]:
    """FORCE/HALP budgets ``C_t = L0^(1 - t/K) * L*^(t/K)`` for t = 1..K.

    Each step removes the same fraction of the remaining latency and ``C_K`` is the budget
    exactly. A budget at or above the dense latency gives K copies of the budget (nothing to prune).

    Raises:
        BudgetError: a non-positive latency or ``steps < 1``.
    """
    if steps < 1:
        raise BudgetError(f"the number of pruning steps must be at least 1, got {steps}")
    for name, value in (("dense latency", dense_ms), ("budget", budget_ms)):
        if not (math.isfinite(value) and value > 0):
            raise BudgetError(f"the {name} must be a positive number of ms, got {value}")
    if budget_ms >= dense_ms:
        log.info("budget %.4g ms is not below the dense %.4g ms: nothing to prune", budget_ms, dense_ms)
        return [float(budget_ms)] * steps
    out = [dense_ms ** (1 - t / steps) * budget_ms ** (t / steps) for t in range(1, steps + 1)]
    out[-1] = float(budget_ms)  # exact, free of the float powers' rounding
    return out


def parse_budget(text: str | float, dense_ms: float) -> float:
    """A budget in ms from user text, relative budgets scaled by ``dense_ms``.

    Accepted: a fraction in (0, 1] (``0.5``), a percentage in (0, 100] (``50%``), an absolute time
    (``12ms``, ``12 ms``, ``800us``, ``0.01s``) or a speed-up of at least 1 (``2x``).

    Raises:
        BudgetError: unparsable text, a non-positive or non-finite number, a fraction above 1, a
            speed-up below 1, or a non-positive dense latency.
    """
    if not (isinstance(dense_ms, (int, float)) and math.isfinite(dense_ms) and dense_ms > 0):
        raise BudgetError(f"the dense latency must be a positive number of ms to scale a budget, got {dense_ms}")
    raw = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)(ms|us|µs|s|%|x)?", raw)
    if not m:
        raise BudgetError(f"cannot read the budget {text!r}; {_BUDGET_HELP}")
    value, unit = float(m.group(1)), m.group(2)
    if not (math.isfinite(value) and value > 0):
        raise BudgetError(f"the budget {text!r} must be positive; {_BUDGET_HELP}")
    if unit is None:
        if value > 1:
            raise BudgetError(f"a budget without a unit is a fraction of the dense latency and must be at most 1, "
                              f"got {text!r}; for milliseconds write {value:g}ms")
        return value * dense_ms
    if unit == "%":
        if value > 100:
            raise BudgetError(f"a percentage budget must be at most 100%, got {text!r}")
        return value / 100 * dense_ms
    if unit == "x":
        if value < 1:
            raise BudgetError(f"a speed-up budget must be at least 1x, got {text!r}")
        return dense_ms / value
    return value * {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}[unit]
