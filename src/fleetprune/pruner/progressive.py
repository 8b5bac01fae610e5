"""The K-step progressive prune (method.md §5.5, §6): masks between steps, export at the end.

Each step t scores the surviving channels (SP-LAMP or a baseline), asks the solver for the widths
that keep the most score under the budget C_t of the exponential schedule (c_in frozen at the
current widths), and masks the channels it drops. Masking zeroes a dropped channel's conv weight
and bias and its batch norm's gamma, beta, running mean and running variance, as HALP does, so the
channel outputs exactly zero and physically removing it later changes nothing. Masks only shrink:
a masked channel is never revived, scores are recomputed on the survivors only, and a fine-tune
hook between steps runs with the masks re-applied after every optimizer step.

The pruner never times anything: every latency here is a table prediction.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from fleetprune.errors import BudgetError
from fleetprune.pruner.schedule import exponential_schedule
from fleetprune.pruner.scores import check_finite, check_finite_weights, make_importance
from fleetprune.pruner.solve import choose_widths
from fleetprune.pruner.units import update_masks

log = logging.getLogger(__name__)

__all__ = [
    "FinetuneHook",
    "StepRecord",
    "ProgressiveResult",
    "apply_masks",
    "masks_enforced",
    "mask_widths",
    "progressive_prune",
    "METHODS",
]

FinetuneHook = Callable[[nn.Module, int], None]
"""``finetune(model, step)``: trains the masked model between steps (step counts from 1)."""

Masks = dict[str, torch.Tensor]


@dataclass
class StepRecord:
    """What one pruning step asked for and got (latencies in ms, predicted from the table)."""

    step: int
    target_ms: float
    predicted_ms: float
    solver_time_s: float
    widths: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "step": self.step,
            "target_ms": self.target_ms,
            "predicted_ms": self.predicted_ms,
            "solver_time_s": self.solver_time_s,
            "widths": dict(self.widths),
        }


@dataclass
class ProgressiveResult:
    """The outcome of :func:`progressive_prune`.

    Attributes:
        masks: kept-channel mask per prunable group (dense length, True = kept).
        widths: final kept width of every group (unprunable groups at their dense width).
        dense_ms: predicted latency of the dense model (the schedule's L_0).
        budget_ms: the final target L*.
        predicted_ms: predicted latency at the final widths.
        steps: one record per step.
    """

    masks: Masks
    widths: dict[str, int]
    dense_ms: float
    budget_ms: float
    predicted_ms: float
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def solver_time_s(self) -> float:
        """Total solver time over all steps."""
        return float(sum(s.solver_time_s for s in self.steps))

    def keep_indices(self) -> dict[str, list[int]]:
        """The kept channel indices of every masked group, for physical removal."""
        return {g: m.nonzero().flatten().tolist() for g, m in self.masks.items()}


def mask_widths(plan: Any, masks: Mapping[str, torch.Tensor] | None) -> dict[str, int]:
    """Current width of every group: its surviving count, or its dense width when unmasked."""
    masks = masks or {}
    return {g.name: int(masks[g.name].sum()) if g.name in masks else int(g.width) for g in plan.groups}


@torch.no_grad()
def apply_masks(model: nn.Module, plan: Any, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero every masked channel of every group's writers (conv/linear weight and bias, BN state).

    The writers are the group's members and every planned layer whose out_group is the group; their
    batch norms come from the plan. Afterwards a masked channel's output is exactly zero.
    """
    layers = {layer.name: layer for layer in plan.layers}
    for group in plan.groups:
        mask = masks.get(group.name)
        if mask is None or bool(mask.all()):
            continue
        writers = list(dict.fromkeys([*group.members, *(l.name for l in plan.layers if l.out_group == group.name)]))
        for name in writers:
            module = model.get_submodule(name)
            drop = ~mask.to(device=module.weight.device)
            weight = module.weight
            if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
                weight.data[:, drop] = 0  # a transposed conv keeps out-channels in dim 1
            else:
                weight.data[drop] = 0
            if getattr(module, "bias", None) is not None:
                module.bias.data[drop] = 0
            bn_name = getattr(layers.get(name), "bn", None)
            if bn_name:
                bn = model.get_submodule(bn_name)
                for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                    if tensor is not None:
                        tensor.data[drop.to(tensor.device)] = 0


@contextlib.contextmanager
def masks_enforced(model: nn.Module, plan: Any, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Re-apply ``masks`` after every optimizer step taken inside the block (any optimizer).

    Weight decay, momentum and BN's affine gradients would otherwise move masked channels off zero.
    Uses torch's global optimizer step post-hook, so a fine-tune hook needs no pruner-specific code.
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(lambda *_: apply_masks(model, plan, masks))
    try:
        yield
    finally:
        handle.remove()
        apply_masks(model, plan, masks)


METHODS = ("sp_lamp", "l1", "random", "uniform")
"""Channel selection methods: an importance with the knapsack, or ``uniform`` (one keep ratio for
every group, channels ranked by SP-LAMP inside each group)."""


def _importance_and_policy(method: str, importance_kwargs: Mapping[str, Any] | None) -> tuple[Any, str]:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "uniform":
        return make_importance("sp_lamp", **dict(importance_kwargs or {})), "uniform"
    return make_importance(method, **dict(importance_kwargs or {})), "knapsack"


def progressive_prune(
    model: nn.Module,
    plan: Any,
    latency: Any,
    budget_ms: float,
    steps: int,
    *,
    method: str = "sp_lamp",
    solver: str = "dp",
    finetune: FinetuneHook | None = None,
    importance_kwargs: Mapping[str, Any] | None = None,
) -> ProgressiveResult:
    """Prune ``model`` in place (by masking) to a predicted latency of at most ``budget_ms``.

    Args:
        model: the dense network the plan was built from; its masked weights are zeroed in place.
        plan: its channel plan.
        latency: a ``LatencyModel`` over the device's table (predictions include its fixed part).
        budget_ms: the final latency target L* in ms (whole network, fixed part included).
        steps: K, the number of progressive steps (1 = one-shot).
        method: ``sp_lamp``, ``l1`` or ``random`` (an importance with the knapsack) or ``uniform``.
        solver: ``dp`` (multiple-choice knapsack, frozen c_in, verify and repair) or ``exact`` (MILP).
        finetune: ``finetune(model, step)`` called after each step with masks enforced; None = no
            training between steps.
        importance_kwargs: options of the importance (``fold_bn``, ``coupled_reduce``, ...).

    Returns:
        The masks, final widths and the per-step record.

    Raises:
        BudgetError: ``steps < 1``, or the budget is below the smallest latency the plan can reach.
    """
    if steps < 1:
        raise BudgetError(f"the number of pruning steps must be at least 1, got {steps}")
    importance, policy = _importance_and_policy(method, importance_kwargs)
    check_finite_weights(model)
    dense_ms = float(latency.dense_ms())
    minimum = float(latency.min_latency())
    if budget_ms < minimum:
        raise BudgetError(
            f"budget {budget_ms:.4g} ms is below the smallest latency this model can reach on "
            f"{getattr(latency, 'device_key', 'this device')}: {minimum:.4g} ms (every group at its "
            f"narrowest width; dense is {dense_ms:.4g} ms); ask for at least {minimum:.4g} ms"
        )
    targets = [float(c) for c in exponential_schedule(dense_ms, budget_ms, steps)]
    masks: Masks = {g.name: torch.ones(g.width, dtype=torch.bool) for g in plan.groups if g.prunable}
    records: list[StepRecord] = []
    was_training = model.training
    for t, target in enumerate(targets, start=1):
        model.eval()
        scores = importance.scores(model, plan, masks)
        check_finite(scores)
        choice = choose_widths(plan, latency, scores, masks, target, solver=solver, policy=policy)
        masks = update_masks(plan, scores, masks, choice.widths)
        apply_masks(model, plan, masks)
        now = mask_widths(plan, masks)
        predicted = float(latency.predict(now))
        records.append(StepRecord(t, target, predicted, float(choice.total_s), now))
        log.info("step %d/%d: target %.4g ms, predicted %.4g ms, solver %.3f s%s", t, steps, target, predicted,
                 choice.total_s, "".join(f"; {n}" for n in choice.notes))
        if finetune is not None:
            model.train()
            with masks_enforced(model, plan, masks):
                finetune(model, t)
    model.train(was_training)
    final = records[-1]
    return ProgressiveResult(
        masks=masks,
        widths=final.widths,
        dense_ms=dense_ms,
        budget_ms=float(budget_ms),
        predicted_ms=final.predicted_ms,
        steps=records,
    )

