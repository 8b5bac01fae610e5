"""Physical channel removal: turn a masked network into a smaller one.

Torch-Pruning's DependencyGraph does the surgery. For every channel group of the plan we prune the
out-channels of one root member; the graph propagates the cut to the coupled convs, batch norms,
depthwise convs, concatenations and consumers. Afterwards every member's width is checked against
the widths the plan asked for, and the network is run once, so a coupling that the plan and the
graph see differently fails here instead of in deployment.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from fleetprune.deploy import fold_batchnorm  # re-exported: deploy.py is the one place that folds
from fleetprune.errors import ModelError

log = logging.getLogger(__name__)

__all__ = ["remove_channels", "shrink_to_widths", "module_widths", "check_widths", "fold_batchnorm"]


def _tp():
    # Imported lazily: torch_pruning is only needed for the surgery, and importing it costs ~1 s.
    import torch_pruning

    return torch_pruning


def _out_channels(module: nn.Module) -> int | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    return None


def _is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _root_member(model: nn.Module, members: Sequence[str]) -> nn.Module:
    """The module whose out-channels we cut; a depthwise conv only if nothing else writes the group."""
    modules = dict(model.named_modules())
    found = [modules[m] for m in members if m in modules]
    if not found:
        raise ModelError(f"none of the channel group's members {list(members)} is a module of the model")
    for module in found:
        if not _is_depthwise(module):
            return module
    return found[0]


def _output_shape(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(_output_shape(o) for o in out)
    if isinstance(out, Mapping):
        return {k: _output_shape(v) for k, v in out.items()}
    return None


def module_widths(model: nn.Module, plan: Any) -> dict[str, int]:
    """The current out-channel count of every group, read from its members' modules."""
    modules = dict(model.named_modules())
    widths: dict[str, int] = {}
    for group in plan.groups:
        for name in group.members:
            width = _out_channels(modules[name]) if name in modules else None
            if width is not None:
                widths[group.name] = width
                break
    return widths


def check_widths(model: nn.Module, plan: Any, widths: Mapping[str, int]) -> None:
    """Raise ModelError unless every group's writers and every layer's input have the planned widths."""
    modules = dict(model.named_modules())
    wrong: list[str] = []
    for group in plan.groups:
        want = int(widths.get(group.name, group.width))
        for name in group.members:
            have = _out_channels(modules[name]) if name in modules else None
            if have is not None and have != want:
                wrong.append(f"{name}: {have} output channels, plan says {want} (group {group.name})")
    full = {g.name: int(widths.get(g.name, g.width)) for g in plan.groups}
    for layer in plan.layers:
        if layer.name not in modules:
            continue
        module = modules[layer.name]
        # layer_config prices concat and flatten readers exactly, so every reader is checked
        want = int(plan.layer_config(layer, full).cin)
        have = (
            int(module.in_channels)
            if isinstance(module, nn.modules.conv._ConvNd)
            else int(module.in_features) if isinstance(module, nn.Linear) else None
        )
        if have is not None and have != want:
            wrong.append(f"{layer.name}: {have} input channels, plan says {want}")
    if wrong:
        raise ModelError(
            "physical pruning gave widths that differ from the plan; the channel coupling of this "
            "model is not what the plan assumed:\n  " + "\n  ".join(wrong)
        )


def remove_channels(
    model: nn.Module,
    plan: Any,
    keep: Mapping[str, Sequence[int] | torch.Tensor],
    example_input: torch.Tensor,
) -> nn.Module:
    """Physically remove every channel not in ``keep`` (in place) and return the model.

    Args:
        model: the network at the plan's dense widths (masked or not).
        plan: the channel plan the indices refer to (``plan.groups``, ``plan.layers``).
        keep: per group name, the channel indices to keep (a bool mask or an index list); groups not
            named keep every channel.
        example_input: one input batch, used to trace the dependency graph and to test-run the result.

    Returns:
        The same model object, now smaller.

    Raises:
        ModelError: when the surgery gives widths other than planned or the pruned model fails to run.
    """
    tp = _tp()
    model.eval()
    with torch.no_grad():
        before = _output_shape(model(example_input))
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    targets: dict[str, int] = {}
    for group in plan.groups:
        width = int(group.width)
        targets[group.name] = width
        if group.name not in keep:
            continue
        kept = keep[group.name]
        if isinstance(kept, torch.Tensor) and kept.dtype == torch.bool:
            kept_idx = kept.nonzero().flatten().tolist()
        else:
            kept_idx = sorted(int(i) for i in (kept.tolist() if isinstance(kept, torch.Tensor) else kept))
        kept_set = set(kept_idx)
        if not kept_set:
            raise ModelError(f"group {group.name}: cannot remove every channel")
        remove = [i for i in range(width) if i not in kept_set]
        targets[group.name] = len(kept_set)
        if not remove:
            continue
        if not group.prunable:
            raise ModelError(f"group {group.name} is not prunable but {len(remove)} channels were to be removed")
        root = _root_member(model, group.members)
        have = _out_channels(root)
        if have != width:
            raise ModelError(
                f"group {group.name}: its member has {have} channels but the plan says {width}; "
                "was the model pruned already?"
            )
        fn = dg.get_pruner_of_module(root).prune_out_channels
        pruning_group = dg.get_pruning_group(root, fn, idxs=remove)
        pruning_group.prune()
        log.debug("group %s: %d -> %d channels", group.name, width, len(kept_set))
    check_widths(model, plan, targets)
    try:
        with torch.no_grad():
            after = _output_shape(model(example_input))
    except Exception as exc:  # the surgery produced an inconsistent network
        raise ModelError(f"the physically pruned model does not run: {exc}") from exc
    if after != before:
        raise ModelError(f"physical pruning changed the output shape from {before} to {after}")
    return model


def shrink_to_widths(
    model: nn.Module, plan: Any, widths: Mapping[str, int], example_input: torch.Tensor
) -> nn.Module:
    """Cut a dense model down to ``widths`` by keeping the first w channels of every group (in place).

    The weights that survive are meaningless; the point is the architecture, into which a pruned
    variant's state_dict is then loaded (architecture as data, no pickled modules).
    """
    keep: dict[str, list[int]] = {}
    for group in plan.groups:
        if group.name in widths:
            want = int(widths[group.name])
            if not 1 <= want <= group.width:
                raise ModelError(f"group {group.name}: width {want} is outside 1..{group.width}")
            keep[group.name] = list(range(want))
    unknown = sorted(set(widths) - {g.name for g in plan.groups})
    if unknown:
        raise ModelError(f"widths name groups the plan does not have: {unknown}")
    return remove_channels(model, plan, keep, example_input)
