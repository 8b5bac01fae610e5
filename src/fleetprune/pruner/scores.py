"""Channel importance: SP-LAMP (method.md §2) and the baselines behind one interface.

Every importance maps each prunable channel group of a :class:`~fleetprune.pruner.plan.Plan` to a
float64 CPU tensor of length ``group.width`` (the dense width, indexed by channel). Only surviving
channels are scored: a masked channel gets 0.0 and takes part in no ranking or denominator, so
consumers must always rank with the same masks (see :mod:`fleetprune.pruner.units`).

Masks are ``dict[group_name, torch.BoolTensor]`` of length ``group.width`` with True = surviving;
a group that is absent from the dict (or ``masks=None``) is fully alive.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from fleetprune.errors import ModelError

log = logging.getLogger(__name__)

Masks = Mapping[str, torch.Tensor]
Scores = dict[str, torch.Tensor]

IMPORTANCES = ("sp_lamp", "l1", "random")
COUPLED_REDUCES = ("balanced", "concat", "per_layer")


@runtime_checkable
class Importance(Protocol):
    """Scores the surviving channels of every prunable group of a plan."""

    name: str

    def scores(self, model: nn.Module, plan: Any, masks: Masks | None = None) -> Scores:
        """Return ``{group name: float64 tensor of length group.width}``; masked channels are 0."""
        ...


def alive_mask(group: Any, masks: Masks | None) -> torch.Tensor:
    """The surviving-channel mask of ``group`` (all True when the group has no mask yet)."""
    if masks is None or group.name not in masks:
        return torch.ones(group.width, dtype=torch.bool)
    mask = torch.as_tensor(masks[group.name]).detach().to("cpu", torch.bool).flatten()
    if mask.numel() != group.width:
        raise ValueError(f"mask of group {group.name!r} has {mask.numel()} entries, group width is {group.width}")
    if not bool(mask.any()):
        raise ValueError(f"mask of group {group.name!r} keeps no channel")
    return mask


def lamp_normalise(energy: torch.Tensor) -> torch.Tensor:
    """LAMP over one vector: ``s_c = e_c / sum of e over c and every higher-ranked channel``.

    Ranking is a stable ascending sort, so ties go to the higher channel index. The top channel
    scores exactly 1. Channels whose whole tail has zero energy score 0 (except the top one), which
    keeps the scores finite for all-zero filters.
    """
    e = energy.to(torch.float64)
    order = torch.sort(e, stable=True).indices
    sorted_e = e[order]
    tail = torch.flip(torch.cumsum(torch.flip(sorted_e, [0]), 0), [0])
    s_sorted = torch.where(tail > 0, sorted_e / torch.where(tail > 0, tail, torch.ones_like(tail)), torch.zeros_like(tail))
    s_sorted[-1] = 1.0
    out = torch.empty_like(e)
    out[order] = s_sorted
    return out


def _layers_by_name(plan: Any) -> dict[str, Any]:
    return {layer.name: layer for layer in plan.layers}


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ModelError(f"the plan names module {name!r}, which the model does not have; rebuild the plan "
                         "from this model") from exc


def _bn_scale(model: nn.Module, bn_name: str | None, n: int) -> torch.Tensor | None:
    """Per-channel factor gamma / sqrt(var + eps) that folding multiplies each filter by."""
    if not bn_name:
        return None
    bn = _module(model, bn_name)
    gamma = bn.weight.detach().to("cpu", torch.float64) if getattr(bn, "weight", None) is not None else None
    var = getattr(bn, "running_var", None)
    if var is not None:
        scale = 1.0 / torch.sqrt(var.detach().to("cpu", torch.float64) + float(bn.eps))
        if gamma is not None:
            scale = scale * gamma
    elif gamma is not None:
        scale = gamma  # no running stats: only the affine scale can be folded
    else:
        return None
    if scale.numel() != n:
        raise ModelError(f"batch norm {bn_name!r} has {scale.numel()} channels, its conv has {n}; rebuild the plan")
    return scale


def _out_rows(module: nn.Module, name: str, width: int) -> torch.Tensor:
    """The module's weight as (out_channels, everything else), float64 on the CPU."""
    w = getattr(module, "weight", None)
    if w is None or not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        raise ModelError(f"module {name!r} ({type(module).__name__}) is not a conv or linear layer; "
                         "the pruner cannot score it")
    w = w.detach().to("cpu", torch.float64)
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        w = w.transpose(0, 1)
    w = w.flatten(1)
    if w.shape[0] != width:
        raise ModelError(f"module {name!r} has {w.shape[0]} output channels but its group has width {width}; "
                         "rebuild the plan from this model")
    return w


def _reads_only(layer: Any, group: Any) -> bool:
    """Whether a consumer's whole input is this one group (not a concat with others)."""
    if layer is None:
        return True
    parts = getattr(layer, "in_parts", None)
    if parts is not None and len(parts) > 0:
        return len(parts) == 1 and parts[0][0] == group.name and not getattr(layer, "in_fixed", 0)
    return layer.in_group == group.name


def _in_columns(module: nn.Module, name: str, group: Any, layer: Any) -> torch.Tensor | None:
    """A consumer's weight as (width, everything else): the slice that reads each input channel.

    None when the consumer reads a concat of several groups: the plan does not record where in
    the concat this group sits, so its slice is left out rather than guessed.
    """
    width = group.width
    w = getattr(module, "weight", None)
    if w is None or not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        raise ModelError(f"consumer {name!r} ({type(module).__name__}) is not a conv or linear layer")
    if not _reads_only(layer, group):
        log.debug("consumer %s reads a concat; its input slices are left out of group %s", name, group.name)
        return None
    w = w.detach().to("cpu", torch.float64)
    if isinstance(module, nn.Linear):
        if w.shape[1] % width:
            raise ModelError(f"linear {name!r} reads {w.shape[1]} features, not a multiple of width {width}")
        # a flatten before the linear maps channel c to a contiguous block of in_features
        return w.reshape(w.shape[0], width, -1).transpose(0, 1).flatten(1)
    if module.transposed:
        w = w.transpose(0, 1)
    groups = module.groups
    if groups == 1:
        cols = w.transpose(0, 1).flatten(1)
    else:
        # grouped conv: input channel c lives in group c // (cin/groups) at column c % (cin/groups)
        out_per_group = w.shape[0] // groups
        cin_per_group = w.shape[1]
        w = w.reshape(groups, out_per_group, cin_per_group, -1)
        cols = w.permute(0, 2, 1, 3).reshape(groups * cin_per_group, -1)
    if cols.shape[0] != width:
        raise ModelError(f"consumer {name!r} reads {cols.shape[0]} channels but its group has width {width}; "
                         "rebuild the plan from this model")
    return cols


class SPLampImportance:
    """SP-LAMP: LAMP lifted to filters on BN-folded squared-L2 energy, one LAMP per member conv.

    Args:
        fold_bn: fold each member's batch norm into its filters first (method §2.2); False gives
            naive structured LAMP on raw weights.
        coupled_reduce: ``per_layer`` (default) runs LAMP on every member conv (each conv has its
            own score-1 filter) and sums the members' scores per channel, so a coupled set of m convs
            (a ResNet stage's residual stream) weighs like m layers in the knapsack; ``balanced``
            (method.md §2.3) divides each member's energies by its surviving total, sums, and runs
            one LAMP, so the whole set weighs like one layer; ``concat`` sums raw energies, one LAMP.
            ``per_layer`` is the default because ``balanced`` lets the knapsack squeeze residual
            streams to the minimum: CIFAR ResNet-20 at 25% of dense latency, 36.1% top-1 with
            ``balanced`` vs 50.4% with ``per_layer`` (BENCHMARKS.md).
        include_consumers: also add the energy of the input slices of the group's consumers.
    """

    name = "sp_lamp"

    def __init__(self, fold_bn: bool = True, coupled_reduce: str = "per_layer", include_consumers: bool = False):
        if coupled_reduce not in COUPLED_REDUCES:
            raise ValueError(f"coupled_reduce must be one of {COUPLED_REDUCES}, got {coupled_reduce!r}")
        self.fold_bn = fold_bn
        self.coupled_reduce = coupled_reduce
        self.include_consumers = include_consumers

    def member_energies(self, model: nn.Module, plan: Any, group: Any) -> list[torch.Tensor]:
        """Per-channel energy vectors (length ``group.width``) of every member (and consumer)."""
        layers = _layers_by_name(plan)
        energies = []
        for name in group.members:
            rows = _out_rows(_module(model, name), name, group.width)
            if self.fold_bn:
                layer = layers.get(name)
                scale = _bn_scale(model, getattr(layer, "bn", None), group.width)
                if scale is not None:
                    rows = rows * scale[:, None]
            energies.append(rows.pow(2).sum(1))
        if self.include_consumers:
            for name in group.consumers:
                if name in group.members:
                    continue  # a depthwise conv is both; count its filters once
                module = _module(model, name)
                rows = _in_columns(module, name, group, layers.get(name))
                if rows is None:
                    continue
                if self.fold_bn and isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
                    # the consumer's BN scales its output rows; fold it before slicing by input
                    scale = _bn_scale(model, getattr(layers.get(name), "bn", None), module.out_channels)
                    if scale is not None:
                        w = _out_rows(module, name, module.out_channels) * scale[:, None]
                        w = w.reshape(module.out_channels, group.width, -1)
                        rows = w.transpose(0, 1).flatten(1)
                energies.append(rows.pow(2).sum(1))
        return energies

    def group_scores(self, model: nn.Module, plan: Any, group: Any, alive: torch.Tensor) -> torch.Tensor:
        """SP-LAMP scores of one group (dense length; masked channels 0)."""
        total = torch.zeros(int(alive.sum()), dtype=torch.float64)
        for e in self.member_energies(model, plan, group):
            e = e[alive]
            if self.coupled_reduce == "per_layer":
                if float(e.sum()) > 0.0:  # an all-zero member carries no ranking information
                    total += lamp_normalise(e)
                continue
            if self.coupled_reduce == "balanced":
                denom = float(e.sum())
                if denom <= 0.0:
                    continue  # an all-zero member carries no ranking information
                e = e / denom
            total += e
        out = torch.zeros(group.width, dtype=torch.float64)
        out[alive] = total if self.coupled_reduce == "per_layer" else lamp_normalise(total)
        return out

    @torch.no_grad()
    def scores(self, model: nn.Module, plan: Any, masks: Masks | None = None) -> Scores:
        """SP-LAMP score of every surviving channel of every prunable group."""
        return {g.name: self.group_scores(model, plan, g, alive_mask(g, masks)) for g in plan.groups if g.prunable}


class L1Importance:
    """Global group L1 magnitude as Torch-Pruning ranks it (``MagnitudeImportance(p=1,
    normalizer=None, group_reduction='mean')``): the mean over the group's entries of per-channel L1
    of the members' filters, the consumers' input slices and the BN scales. Not normalised per
    layer, so scores compare globally across groups. A consumer that reads a concat of several
    groups is left out (the plan does not say where in the concat the group sits).

    Args:
        include_consumers: add the consumers' input slices (Torch-Pruning does).
        include_bn: add |gamma| of each member's batch norm (Torch-Pruning does).
    """

    name = "l1"

    def __init__(self, include_consumers: bool = True, include_bn: bool = True):
        self.include_consumers = include_consumers
        self.include_bn = include_bn

    def group_scores(self, model: nn.Module, plan: Any, group: Any, alive: torch.Tensor) -> torch.Tensor:
        """Mean per-channel L1 of one group (dense length; masked channels 0)."""
        layers = _layers_by_name(plan)
        parts = []
        for name in group.members:
            parts.append(_out_rows(_module(model, name), name, group.width).abs().sum(1))
            bn_name = getattr(layers.get(name), "bn", None)
            if self.include_bn and bn_name:
                bn = _module(model, bn_name)
                if getattr(bn, "weight", None) is not None:
                    parts.append(bn.weight.detach().to("cpu", torch.float64).abs())
        if self.include_consumers:
            for name in group.consumers:
                if name not in group.members:
                    cols = _in_columns(_module(model, name), name, group, layers.get(name))
                    if cols is not None:
                        parts.append(cols.abs().sum(1))
        out = torch.stack(parts).mean(0)
        return torch.where(alive, out, torch.zeros_like(out))

    @torch.no_grad()
    def scores(self, model: nn.Module, plan: Any, masks: Masks | None = None) -> Scores:
        """Group L1 score of every surviving channel of every prunable group."""
        return {g.name: self.group_scores(model, plan, g, alive_mask(g, masks)) for g in plan.groups if g.prunable}


class RandomImportance:
    """Uniform random scores from a seeded generator (each call draws fresh, reproducibly)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    def scores(self, model: nn.Module, plan: Any, masks: Masks | None = None) -> Scores:
        """Random score in (0, 1) for every surviving channel of every prunable group."""
        out: Scores = {}
        for g in plan.groups:
            if not g.prunable:
                continue
            alive = alive_mask(g, masks)
            s = torch.rand(g.width, generator=self._gen, dtype=torch.float64)
            out[g.name] = torch.where(alive, s, torch.zeros_like(s))
        return out


def make_importance(name: str, **kwargs: Any) -> Importance:
    """Build an importance by name: ``sp_lamp`` (default method), ``l1`` or ``random``.

    Keyword arguments go to the class (``fold_bn``, ``coupled_reduce``, ``include_consumers``,
    ``include_bn``, ``seed``).
    """
    classes = {"sp_lamp": SPLampImportance, "l1": L1Importance, "random": RandomImportance}
    if name not in classes:
        raise ValueError(f"unknown importance {name!r}; choose one of {IMPORTANCES}")
    return classes[name](**kwargs)


def importance_options(method: str, importance_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The channel importance ``method`` uses with ``importance_kwargs``, as ``{"name": ..., option: value}``
    (defaults filled in: what report.json records). ``uniform`` ranks channels with SP-LAMP.

    Raises:
        FleetpruneError: options the importance does not take.
    """
    from fleetprune.errors import FleetpruneError

    name = "sp_lamp" if method == "uniform" else method
    try:
        imp = make_importance(name, **dict(importance_kwargs or {}))
    except (TypeError, ValueError) as exc:
        raise FleetpruneError(f"bad options {dict(importance_kwargs or {})} for method {method!r} ({exc}); "
                              "coupled_reduce, fold_bn and include_consumers are SP-LAMP (and uniform) options") from exc
    return {"name": name, **{k: v for k, v in vars(imp).items() if not k.startswith("_")}}


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model whose weights or batch-norm statistics hold NaN or inf: scores computed from
    them would be silently wrong (SP-LAMP's normalisation turns a NaN filter's group to zeros).

    Raises:
        ModelError: naming the bad tensors.
    """
    bad = [name for name, t in model.state_dict().items()
           if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ModelError(f"the model holds NaN or infinite values in {len(bad)} tensor(s): {', '.join(bad[:8])}"
                         f"{' ...' if len(bad) > 8 else ''}; check the checkpoint (--weights) or retrain")


def check_finite(scores: Scores) -> None:
    """Refuse scores that are not finite (weights holding NaN or inf): pruning on them would keep
    arbitrary channels and write a broken variant.

    Raises:
        ModelError: naming the groups.
    """
    bad = [g for g, s in scores.items() if not bool(torch.isfinite(s).all())]
    if bad:
        raise ModelError(f"channel scores are not finite in {len(bad)} group(s) ({', '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''}): the model's weights hold NaN or inf values; "
                         "check the checkpoint (--weights) or retrain")
