"""Budgets: the progressive exponential schedule (method.md §6) and parsing of ``--budget``."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Budget:
    """A parsed ``--budget``: a share of the dense latency (fractions, percentages and speed-ups) or
    an absolute time.

    A relative budget is checked as a ratio (variant against dense, measured in the same rounds),
    an absolute one against the variant's measured time alone.

    Attributes:
        text: what the user wrote.
        fraction: the share of dense for a relative budget, else None.
        ms: the time for an absolute budget, else None.
    """

    text: str
    fraction: float | None = None
    ms: float | None = None

    @property
    def relative(self) -> bool:
        """Whether the budget is a share of the dense latency."""
        return self.fraction is not None

    def of(self, dense_ms: float) -> float:
        """The budget in ms against a dense latency of ``dense_ms`` (an absolute budget ignores it).

        Raises:
            BudgetError: a relative budget with a dense latency that is not a positive number.
        """
        if self.fraction is None:
            return float(self.ms)  # type: ignore[arg-type]
        if not (isinstance(dense_ms, (int, float)) and math.isfinite(dense_ms) and dense_ms > 0):
            raise BudgetError(f"the dense latency must be a positive number of ms to scale a budget, got {dense_ms}")
        return self.fraction * dense_ms

    def share(self, measured_ms: float, dense_measured_ms: float) -> float:
        """``measured / budget``: the variant's latency as a share of what the budget allows, with a
        relative budget taken of the dense latency measured beside it (1.0 is exactly on budget)."""
        return measured_ms / self.of(dense_measured_ms)


def read_budget(text: str | float) -> Budget:
    """Parse ``--budget``.

    Accepted: a fraction in (0, 1] (``0.5``), a percentage in (0, 100] (``50%``), an absolute time
    (``12ms``, ``12 ms``, ``800us``, ``0.01s``) or a speed-up of at least 1 (``2x``).

    Raises:
        BudgetError: unparsable text, a non-positive or non-finite number, a fraction above 1 or a
            speed-up below 1.
    """
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
        return Budget(str(text), fraction=value)
    if unit == "%":
        if value > 100:
            raise BudgetError(f"a percentage budget must be at most 100%, got {text!r}")
        return Budget(str(text), fraction=value / 100)
    if unit == "x":
        if value < 1:
            raise BudgetError(f"a speed-up budget must be at least 1x, got {text!r}")
        return Budget(str(text), fraction=1.0 / value)
    return Budget(str(text), ms=value * {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}[unit])


def parse_budget(text: str | float, dense_ms: float) -> float:
    """A budget in ms from user text, relative budgets scaled by ``dense_ms`` (:func:`read_budget`).

    Raises:
        BudgetError: unparsable text (see :func:`read_budget`) or a non-positive dense latency.
    """
    if not (isinstance(dense_ms, (int, float)) and math.isfinite(dense_ms) and dense_ms > 0):
        raise BudgetError(f"the dense latency must be a positive number of ms to scale a budget, got {dense_ms}")
    return read_budget(text).of(dense_ms)
