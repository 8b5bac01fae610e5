"""The K-step loop: masks only shrink, fine-tuning cannot revive them, budgets are met, export agrees."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fleetprune import models
from fleetprune.errors import BudgetError
from fleetprune.pruner.export import module_widths, remove_channels
from fleetprune.pruner.latency import LatencyModel
from fleetprune.pruner.plan import build_plan
from fleetprune.pruner.progressive import apply_masks, mask_widths, masks_enforced, progressive_prune

from prune_models import TinyConcat, TinyLinearHead, randomise
from pruner_fakes import DictLatencyTable, macs_staircase_ms


def _setup(model: nn.Module, x: torch.Tensor, round_to: int = 8):
    model = randomise(model)
    plan = build_plan(model, x, round_to=round_to)
    table = DictLatencyTable.from_function(plan.configs(), macs_staircase_ms)
    return model, plan, LatencyModel(plan, table)


def _zero_channels(model: nn.Module, plan) -> dict[str, set[int]]:
    """Per group, the channels whose first member's filter is all zero."""
    out = {}
    for g in plan.prunable_groups():
        w = model.get_submodule(g.members[0]).weight.detach().flatten(1)
        out[g.name] = set((w.abs().sum(1) == 0).nonzero().flatten().tolist())
    return out


class NoisyTrainer:
    """A fine-tune hook that moves every weight (masked ones too) with SGD + momentum + weight decay."""

    def __init__(self, plan):
        self.plan = plan
        self.calls: list[int] = []
        self.zero_sets: list[dict[str, set[int]]] = []

    def __call__(self, model: nn.Module, step: int) -> None:
        self.calls.append(step)
        self.zero_sets.append(_zero_channels(model, self.plan))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        g = torch.Generator().manual_seed(step)
        for _ in range(3):
            opt.zero_grad()
            loss = model(torch.randn(4, 3, 16, 16, generator=g)).pow(2).mean()
            for p in model.parameters():  # gradients on every entry, as an unmasked optimizer sees them
                loss = loss + 1e-3 * (p * torch.randn(p.shape, generator=g)).sum()
            loss.backward()
            opt.step()
            # masks were re-applied by the optimizer hook right after the step
            assert _zero_channels(model, self.plan) == self.zero_sets[-1]


def test_masks_only_shrink_and_survive_fine_tuning():
    torch.manual_seed(0)
    model, plan, lm = _setup(TinyConcat(), torch.randn(1, 3, 16, 16))
    hook = NoisyTrainer(plan)
    result = progressive_prune(model, plan, lm, 0.4 * lm.dense_ms(), 4, finetune=hook)
    assert hook.calls == [1, 2, 3, 4]
    for before, after in zip(hook.zero_sets, hook.zero_sets[1:]):
        for g in before:
            assert before[g] <= after[g], "a masked channel came back"
    assert _zero_channels(model, plan) == {g: set((~m).nonzero().flatten().tolist()) for g, m in result.masks.items()}
    for a, b in zip(result.steps, result.steps[1:]):
        assert all(b.widths[g] <= a.widths[g] for g in a.widths)
    assert result.predicted_ms <= 0.4 * lm.dense_ms() + 1e-12
    assert result.widths == mask_widths(plan, result.masks)


@pytest.mark.parametrize("method", ["sp_lamp", "l1", "random", "uniform"])
def test_every_method_meets_the_budget_and_exports(method):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    model, plan, lm = _setup(TinyLinearHead(), x)
    budget = 0.6 * lm.dense_ms()
    result = progressive_prune(model, plan, lm, budget, 3, method=method)
    assert result.predicted_ms <= budget + 1e-12
    assert result.predicted_ms == pytest.approx(lm.predict(result.widths))
    model.eval()
    with torch.no_grad():
        masked = model(x)
    pruned = remove_channels(copy.deepcopy(model), plan, result.keep_indices(), x)
    assert module_widths(pruned, plan) == result.widths
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked, rtol=1e-4, atol=1e-5)


def test_exact_solver_runs_the_same_loop():
    torch.manual_seed(2)
    model, plan, lm = _setup(TinyConcat(), torch.randn(1, 3, 16, 16))
    budget = 0.5 * lm.dense_ms()
    result = progressive_prune(model, plan, lm, budget, 2, solver="exact")
    assert result.predicted_ms <= budget * (1 + 1e-9)


def test_schedule_targets_follow_the_exponential_schedule():
    torch.manual_seed(3)
    model, plan, lm = _setup(models.create("resnet20"), torch.randn(1, 3, 32, 32))
    l0, budget, k = lm.dense_ms(), 0.5 * lm.dense_ms(), 4
    result = progressive_prune(model, plan, lm, budget, k)
    assert result.dense_ms == pytest.approx(l0)
    for t, s in enumerate(result.steps, start=1):
        assert s.target_ms == pytest.approx(l0 ** (1 - t / k) * budget ** (t / k))
        assert s.predicted_ms <= s.target_ms * (1 + 1e-9)


def test_a_budget_below_the_minimum_says_the_minimum():
    torch.manual_seed(4)
    model, plan, lm = _setup(TinyConcat(), torch.randn(1, 3, 16, 16))
    minimum = lm.min_latency()
    with pytest.raises(BudgetError, match=f"{minimum:.4g} ms"):
        progressive_prune(model, plan, lm, 0.5 * minimum, 2)


def test_masked_channels_output_exactly_zero():
    torch.manual_seed(5)
    model, plan, _ = _setup(TinyConcat(), torch.randn(1, 3, 16, 16))
    group = plan.group("a.0")
    mask = torch.ones(group.width, dtype=torch.bool)
    mask[::2] = False
    apply_masks(model, plan, {group.name: mask})
    with torch.no_grad():
        y = model.a(model.stem(torch.randn(2, 3, 16, 16)))
    assert torch.all(y[:, ~mask] == 0) and torch.any(y[:, mask] != 0)


def test_masks_enforced_removes_its_hook():
    torch.manual_seed(6)
    model, plan, _ = _setup(TinyConcat(), torch.randn(1, 3, 16, 16))
    g = plan.group("b.0")
    mask = torch.zeros(g.width, dtype=torch.bool)
    mask[:8] = True
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with masks_enforced(model, plan, {g.name: mask}):
        pass
    model.b[0].weight.grad = torch.ones_like(model.b[0].weight)
    opt.step()  # outside the block: nothing re-masks
    assert torch.all(model.b[0].weight[~mask] != 0)
