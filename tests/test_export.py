"""Physical channel removal with Torch-Pruning: widths as planned, same outputs as the masked model."""

from __future__ import annotations

import copy

import pytest
import torch

from fleetprune import models
from fleetprune.errors import ModelError
from fleetprune.pruner.export import module_widths, remove_channels, shrink_to_widths
from fleetprune.pruner.plan import build_plan
from fleetprune.pruner.progressive import apply_masks, mask_widths

from prune_models import TinyConcat, TinyGrouped, TinyLinearHead, randomise


def _build(name: str):
    torch.manual_seed(0)
    if name == "resnet20":
        model, x = models.create("resnet20"), torch.randn(2, 3, 32, 32)
    elif name == "vgg_chain":
        model, x = models.create("vgg_chain"), torch.randn(2, 3, 32, 32)
    elif name == "mobilenet_v2":
        model, x = models.create("mobilenet_v2", num_classes=10), torch.randn(2, 3, 32, 32)
    else:
        model = {"concat": TinyConcat, "linear_head": TinyLinearHead, "grouped": TinyGrouped}[name]()
        x = torch.randn(2, 3, 16, 16)
    return randomise(model), x


def _random_masks(plan, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random subset of every prunable group, at a random allowed width below the dense one."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for group in plan.groups:
        if not group.prunable:
            continue
        width = group.choices[int(torch.randint(0, len(group.choices) - 1, (1,), generator=g))]
        keep = torch.randperm(group.width, generator=g)[:width]
        mask = torch.zeros(group.width, dtype=torch.bool)
        mask[keep] = True
        masks[group.name] = mask
    return masks


CASES = ["resnet20", "mobilenet_v2", "concat", "vgg_chain", "linear_head", "grouped"]


@pytest.mark.parametrize("name", CASES)
def test_physical_removal_matches_the_masked_model(name):
    model, x = _build(name)
    plan = build_plan(model, x)
    assert plan.prunable_groups(), "the case must have something to prune"
    masks = _random_masks(plan)
    apply_masks(model, plan, masks)
    with torch.no_grad():
        masked_out = model(x)
    pruned = remove_channels(copy.deepcopy(model), plan, masks, x)
    want = mask_widths(plan, masks)
    assert module_widths(pruned, plan) == want
    with torch.no_grad():
        pruned_out = pruned(x)
    assert pruned_out.shape == masked_out.shape
    torch.testing.assert_close(pruned_out, masked_out, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_unprunable_group_keeps_its_width():
    model, x = _build("grouped")
    plan = build_plan(model, x)
    fixed = [g for g in plan.groups if not g.prunable]
    assert any(g.name == "grouped.0" or "grouped.0" in g.members for g in fixed)
    pruned = remove_channels(copy.deepcopy(model), plan, _random_masks(plan, 1), x)
    widths = module_widths(pruned, plan)
    for g in fixed:
        assert widths[g.name] == g.width
    assert pruned.grouped[0].in_channels == 32 and pruned.grouped[0].out_channels == 32


def test_shrink_to_widths_builds_the_architecture_for_a_state_dict():
    model, x = _build("resnet20")
    plan = build_plan(model, x)
    masks = _random_masks(plan, 2)
    apply_masks(model, plan, masks)
    pruned = remove_channels(copy.deepcopy(model), plan, masks, x)
    widths = module_widths(pruned, plan)
    fresh = shrink_to_widths(models.create("resnet20"), plan, widths, x)
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), pruned(x))


def test_widths_outside_the_group_are_refused():
    model, x = _build("vgg_chain")
    plan = build_plan(model, x)
    group = plan.prunable_groups()[0]
    with pytest.raises(ModelError, match=group.name):
        shrink_to_widths(model, plan, {group.name: group.width + 1}, x)
    with pytest.raises(ModelError, match="no-such-group"):
        shrink_to_widths(model, plan, {"no-such-group": 8}, x)


def test_removing_twice_is_refused():
    model, x = _build("vgg_chain")
    plan = build_plan(model, x)
    masks = _random_masks(plan, 3)
    remove_channels(model, plan, masks, x)
    with pytest.raises(ModelError, match="pruned already"):
        remove_channels(model, plan, masks, x)


def test_check_widths_names_every_layer_that_disagrees():
    from fleetprune.pruner.export import check_widths

    model, x = _build("concat")
    plan = build_plan(model, x)
    check_widths(model, plan, plan.dense_widths())
    wrong = {**plan.dense_widths(), "a.0": 16}
    with pytest.raises(ModelError) as err:
        check_widths(model, plan, wrong)
    assert "a.0: 32 output channels, plan says 16" in str(err.value)
    assert "mix.0: 80 input channels, plan says 64" in str(err.value)  # the concat reader
