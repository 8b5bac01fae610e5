"""One device's prune from start to variant: closed loop, progressive prune, channel removal, final check.

:func:`prune_for_device` is what ``fleetprune prune`` does per device once every input is checked:

1. where the device can be measured (a ``measure`` callable) and ``verify_rounds > 0``, the closed
   loop (:func:`~fleetprune.pruner.calibrate.close_loop`) prunes dry copies without fine-tuning,
   measures each beside the dense model and corrects the table-space target until the budget holds;
2. the progressive prune at that target, with fine-tuning between steps when asked (without it, the
   dry run of the chosen round is the result: its masks applied to a copy of the dense model);
3. physical channel removal, and the final variant measured once more beside the dense model;
4. the report (every round, the verdict, the latency model and where it came from).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from fleetprune.deploy import fold_batchnorm
from fleetprune.pruner.calibrate import Measure, Network, Settled, Verification, close_loop, finish
from fleetprune.pruner.export import module_widths, remove_channels
from fleetprune.pruner.progressive import FinetuneHook, ProgressiveResult, apply_masks, progressive_prune
from fleetprune.pruner.schedule import Budget
from fleetprune.pruner.variant import example_input

log = logging.getLogger(__name__)

PREDICTED_ONLY = "predicted only"


@dataclass
class DevicePrune:
    """What one device's prune produced: the pruned network (eval mode), its deployable folded copy,
    the progressive record and how its budget was checked."""

    model: nn.Module
    deploy: nn.Module
    folded: bool
    result: ProgressiveResult
    verification: Verification
    widths: dict[str, int]
    budget_ms: float

    @property
    def measured_ms(self) -> float | None:
        r = self.verification.standing
        return None if r is None else r.measured_ms


def prune_for_device(
    dense: nn.Module,
    plan: Any,
    settled: Settled,
    budget: Budget,
    *,
    steps: int,
    method: str = "sp_lamp",
    solver: str = "dp",
    finetune: FinetuneHook | None = None,
    importance_kwargs: Mapping[str, Any] | None = None,
    measure: Measure | None = None,
    verify_rounds: int = 4,
    unreachable_note: str = "",
) -> DevicePrune:
    """Prune a copy of ``dense`` for one device (see the module docstring); ``dense`` is not changed.

    Args:
        settled: the device's latency model (:func:`~fleetprune.pruner.calibrate.settle`).
        budget: the parsed budget.
        measure: measures networks side by side on the device; None for a device nobody can reach.
        verify_rounds: closed-loop rounds (0: prune open-loop, then measure the final variant).
        unreachable_note: why there is no ``measure`` (goes into the report).
    """
    lm = settled.model
    dense_widths = lm.full_widths()
    dry: dict[float, ProgressiveResult] = {}  # masks and record of each dry run (no model copies held)

    def solve(target: float) -> tuple[dict[str, int], float]:
        res = progressive_prune(copy.deepcopy(dense), plan, lm, target, steps, method=method, solver=solver,
                                importance_kwargs=importance_kwargs)
        dry[target] = res
        return res.widths, res.predicted_ms

    checked = measure
    if measure is not None and verify_rounds > 0:
        verification = close_loop(solve, checked, budget, lm, rounds=verify_rounds,
                                  dense_measured_ms=settled.dense_measured_ms)
        if verification.status == PREDICTED_ONLY:  # the device went away mid-way: open loop from here
            checked = None
    else:
        note = unreachable_note if measure is None else "closed loop off (--verify-rounds 0)"
        verification = Verification(PREDICTED_ONLY, budget.of(lm.dense_ms()), note=note)
    target = verification.target_ms
    if finetune is None and target in dry:  # without fine-tuning, the dry run at this target is the result
        result = dry[target]
        model = copy.deepcopy(dense)
        apply_masks(model, plan, result.masks)
    else:
        model = copy.deepcopy(dense)
        result = progressive_prune(model, plan, lm, target, steps, method=method, solver=solver, finetune=finetune,
                                   importance_kwargs=importance_kwargs)
    dry.clear()
    model.eval()
    remove_channels(model, plan, result.keep_indices(), example_input(plan.input_shape[1:], 1, "nchw"))
    widths = module_widths(model, plan)
    if checked is not None:
        final = Network(widths, {k: v.detach().cpu() for k, v in model.state_dict().items()})
        finish(verification, checked, budget, dense_widths, final, result.predicted_ms)
    deploy, folded = fold_batchnorm(model)
    return DevicePrune(model, deploy, folded, result, verification, widths, budget.of(lm.dense_ms()))


def device_report(outcome: DevicePrune, settled: Settled, *, device_key: str, model_name: str, method: str,
                  importance: Mapping[str, Any], solver: str, steps: int, budget: Budget, setting: Mapping[str, Any],
                  protocol_statistic: str | None) -> dict[str, Any]:
    """The ``report.json`` of one variant (keys in docs/internals.md)."""
    lm, v, res = settled.model, outcome.verification, outcome.result
    measured = outcome.measured_ms
    return {
        "device_key": device_key, "model": model_name, "method": method, "importance": dict(importance),
        "solver": solver, "steps_k": steps, "budget": budget.text, "budget_relative": budget.relative,
        "budget_ms": outcome.budget_ms, **setting,
        "dense_ms": lm.dense_ms(), "dense_predicted_ms": lm.dense_ms(), **settled.to_dict(),
        "predicted_ms": res.predicted_ms, "target_ms": v.target_ms, "measured_ms": measured,
        "measured_error": None if measured is None else (res.predicted_ms - measured) / measured,
        "measured_as": ("batch norms folded into the convs (torch.fx), eval mode" if outcome.folded
                        else "as given, eval mode") if measured is not None else None,
        "measured_statistic": protocol_statistic if measured is not None else None,
        "verification": v.to_dict(), "verdict": v.verdict,
        "solver_time_s": res.solver_time_s, "widths": outcome.widths, "dense_widths": lm.full_widths(),
        "steps": [s.to_dict() for s in res.steps],
    }
