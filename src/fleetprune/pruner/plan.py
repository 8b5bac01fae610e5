"""The plan: a model's prunable channel groups, their width choices, and every layer configuration.

A plan is what the pruner knows about a network before it prunes anything. Channel coupling comes
from Torch-Pruning's dependency graph (every conv that writes into one residual stage lands in one
group); input sizes come from the same traced forward. The plan is plain data (JSON) so a variant
can store it and the profiler can be told which configurations to measure without the model.

Rules decided here (method.md §3; docs/internals.md restates them):

* Units: ``unit = round_to * 2**j`` with the smallest ``j`` such that ``width // unit <=
  max_choices``; power-of-two multiples keep wide groups on the hardware staircase.
* Choices: with ``K = width // unit``, the top (mandatory) unit absorbs the remainder
  (method.md §3.2), so the choices are ``width - (K-1)*unit, ..., width - unit, width``; at least
  one unit is always kept. ``K <= 1`` leaves the single choice ``(width,)``. Units for the scorer
  are the differences of consecutive choices (the first choice is the mandatory unit).
* Fixed width (``prunable=False``, with a ``reason``): a group whose channels reach the model output
  (the classifier), that a grouped (non-depthwise) conv reads or writes, that a GroupNorm with
  ``1 < num_groups < C`` or a multi-dim LayerNorm normalises, that some layer reads only in part
  (split/slice), whose layer output is split across several groups, whose depthwise conv reads the
  model input, or that has one choice only.
* Grouped convs: Torch-Pruning would remove channels unevenly across the conv's groups, so both
  the group it reads and the group it writes are fixed (ResNeXt/RegNet keep only their stages).
* A layer refers only to prunable groups: ``in_group``/``out_group`` ``None`` means that side is
  fixed. A layer whose input is a concat of groups or a flatten of one keeps the exact recipe in
  ``in_parts`` (group, multiplier) + ``in_fixed``; ``in_group`` is set only when the input is
  exactly one prunable group, so use :meth:`Plan.layer_config` for channel counts.
* Every conv is planned with ``act='relu'`` (conv + folded BN + activation as deployed); the few
  convs without a following ReLU (conv2 before the add, downsample) differ by one elementwise op.
  Linears get ``act='none'``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fleetprune.errors import FleetpruneError, ModelError
from fleetprune.tables.config import DTYPES, MEMORY_FORMATS, LayerConfig

log = logging.getLogger(__name__)

PLAN_VERSION = 1

# Modules allowed to own parameters: the layers Torch-Pruning prunes correctly and we can price or
# that carry no cost of their own. Anything else with weights would be pruned blindly.
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_ALLOWED_WEIGHTED = (nn.Conv2d, nn.Linear, nn.PReLU) + _NORMS


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be kept or removed together, and the widths the pruner may choose.

    Attributes:
        name: stable name, the first member in ``model.named_modules()`` order.
        width: the dense width.
        unit: channels per unit (a multiple of ``round_to``; ``width`` when fixed).
        choices: the widths the pruner may keep, ascending; ``(width,)`` when fixed.
        members: conv/linear modules whose OUTPUT channels are this group (a dwconv is also a
            consumer). Their batch norms are recorded per layer (``PlannedLayer.bn``).
        consumers: conv/linear modules whose INPUT channels read this group.
        prunable: whether the pruner may change the width (``len(choices) > 1``).
        reason: why the width is fixed; empty for a prunable group.
    """

    name: str
    width: int
    unit: int
    choices: tuple[int, ...]
    members: tuple[str, ...]
    consumers: tuple[str, ...]
    prunable: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ChannelGroup":
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=str(d["name"]), width=int(d["width"]), unit=int(d["unit"]),
            choices=tuple(int(c) for c in d["choices"]), members=tuple(d["members"]),
            consumers=tuple(d["consumers"]), prunable=bool(d["prunable"]), reason=str(d.get("reason", "")),
        )


@dataclass(frozen=True)
class PlannedLayer:
    """One conv or linear of the model, its dense configuration and the groups it connects.

    Attributes:
        name: module name.
        base: the configuration at dense widths.
        in_group: the prunable group that is this layer's whole input, or ``None`` (fixed input,
            e.g. the RGB stem, or a composite input: see ``in_parts``).
        out_group: the prunable group of its output channels, or ``None`` (fixed, e.g. classifier).
        bn: the BatchNorm that directly follows it (for BN folding), or ``None``.
        in_parts: every prunable group in the input as (group, multiplier): c_in =
            ``in_fixed + sum(multiplier * width)``. Multiplier 1 per concat part, H*W for a flatten.
        in_fixed: input channels that no pruning changes.
    """

    name: str
    base: LayerConfig
    in_group: str | None
    out_group: str | None
    bn: str | None
    in_parts: tuple[tuple[str, int], ...] = ()
    in_fixed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["in_parts"] = [list(p) for p in self.in_parts]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PlannedLayer":
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=str(d["name"]), base=LayerConfig(**d["base"]), in_group=d["in_group"],
            out_group=d["out_group"], bn=d["bn"],
            in_parts=tuple((str(g), int(m)) for g, m in d.get("in_parts", ())), in_fixed=int(d.get("in_fixed", 0)),
        )


@dataclass
class Plan:
    """Groups and layers of one model at one input shape, dtype and memory format."""

    groups: list[ChannelGroup]
    layers: list[PlannedLayer]
    input_shape: tuple[int, ...]
    round_to: int
    max_choices: int
    dtype: str
    memory_format: str
    _group_index: dict[str, ChannelGroup] = field(default_factory=dict, init=False, repr=False, compare=False)
    _layer_index: dict[str, PlannedLayer] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._group_index = {g.name: g for g in self.groups}
        self._layer_index = {layer.name: layer for layer in self.layers}

    # -- lookups -------------------------------------------------------------------------------
    def group(self, name: str) -> ChannelGroup:
        """The group called ``name`` (KeyError naming the known groups otherwise)."""
        try:
            return self._group_index[name]
        except KeyError:
            raise KeyError(f"no channel group {name!r}; groups: {', '.join(self._group_index)}") from None

    def layer(self, name: str) -> PlannedLayer:
        """The planned layer called ``name``."""
        try:
            return self._layer_index[name]
        except KeyError:
            raise KeyError(f"no planned layer {name!r}") from None

    def prunable_groups(self) -> list[ChannelGroup]:
        """Groups whose width the pruner may change."""
        return [g for g in self.groups if g.prunable]

    def layers_writing(self, group: str) -> list[PlannedLayer]:
        """Layers whose output channels are ``group`` (its producers in the latency model)."""
        return [layer for layer in self.layers if layer.out_group == group]

    def layers_reading(self, group: str) -> list[PlannedLayer]:
        """Layers whose input contains ``group`` (concat and flatten readers included)."""
        return [layer for layer in self.layers if any(g == group for g, _ in layer.in_parts)]

    def dense_widths(self) -> dict[str, int]:
        """Dense width of every group, by name."""
        return {g.name: g.width for g in self.groups}

    # -- configurations ------------------------------------------------------------------------
    def _width(self, widths: Mapping[str, int], name: str) -> int:
        g = self.group(name)
        w = int(widths.get(name, g.width))
        if not 1 <= w <= g.width:
            raise ValueError(f"width {w} for group {name!r} is outside 1..{g.width}")
        return w

    def layer_config(self, layer: PlannedLayer | str, widths: Mapping[str, int]) -> LayerConfig:
        """The configuration of ``layer`` when groups have ``widths`` (missing groups stay dense)."""
        layer = self.layer(layer) if isinstance(layer, str) else layer
        cin = layer.in_fixed + sum(m * self._width(widths, g) for g, m in layer.in_parts)
        cout = self._width(widths, layer.out_group) if layer.out_group is not None else layer.base.cout
        if layer.base.op == "dwconv":
            cin = cout
        return layer.base.with_channels(cin, cout)

    def _pairs(self, layer: PlannedLayer) -> set[tuple[int, int]]:
        couts = self.group(layer.out_group).choices if layer.out_group is not None else (layer.base.cout,)
        if layer.base.op == "dwconv":
            return {(c, c) for c in couts}
        cins = {layer.in_fixed}
        for g, m in layer.in_parts:
            cins = {s + m * c for s in cins for c in self.group(g).choices}
        return {(ci, co) for ci in cins for co in couts}

    def layer_configs(self, layer: PlannedLayer | str) -> list[LayerConfig]:
        """Every configuration one layer can take over the choices of its groups, sorted."""
        layer = self.layer(layer) if isinstance(layer, str) else layer
        return [layer.base.with_channels(ci, co) for ci, co in sorted(self._pairs(layer))]

    def configs(self) -> list[LayerConfig]:
        """Every configuration any layer can take, deduplicated across layers, sorted."""
        # Repeated blocks share a dense config, so pool their (cin, cout) pairs before building.
        by_base: dict[LayerConfig, set[tuple[int, int]]] = {}
        for layer in self.layers:
            by_base.setdefault(layer.base, set()).update(self._pairs(layer))
        seen = {base.with_channels(ci, co) for base, pairs in by_base.items() for ci, co in pairs}
        return sorted(seen)

    def summary(self) -> dict[str, int]:
        """Counts for reports: layers, groups, prunable groups, configs with and without dedup."""
        return {
            "layers": len(self.layers),
            "groups": len(self.groups),
            "prunable_groups": len(self.prunable_groups()),
            "configs": len(self.configs()),
            "configs_without_dedup": sum(len(self._pairs(layer)) for layer in self.layers),
        }

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``version`` guards future format changes)."""
        return {
            "version": PLAN_VERSION,
            "input_shape": list(self.input_shape),
            "round_to": self.round_to,
            "max_choices": self.max_choices,
            "dtype": self.dtype,
            "memory_format": self.memory_format,
            "groups": [g.to_dict() for g in self.groups],
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_json(self, indent: int | None = None) -> str:
        """The plan as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`."""
        version = int(d.get("version", 0))
        if version > PLAN_VERSION:
            raise ModelError(f"plan format version {version} is newer than this fleetprune ({PLAN_VERSION}); upgrade fleetprune")
        return cls(
            groups=[ChannelGroup.from_dict(g) for g in d["groups"]],
            layers=[PlannedLayer.from_dict(layer) for layer in d["layers"]],
            input_shape=tuple(int(s) for s in d["input_shape"]),
            round_to=int(d["round_to"]), max_choices=int(d["max_choices"]),
            dtype=str(d["dtype"]), memory_format=str(d["memory_format"]),
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------------
# choices


def unit_and_choices(width: int, round_to: int, max_choices: int) -> tuple[int, tuple[int, ...]]:
    """Unit size and ascending width choices of a group (see the module docstring for the rule)."""
    unit = round_to
    while width // unit > max_choices:
        unit *= 2
    k = width // unit
    if k <= 1:
        return width, (width,)
    return unit, tuple(width - i * unit for i in range(k - 1, -1, -1))


# ---------------------------------------------------------------------------------------------
# building


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_grouped(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m)


def _check_supported(model: nn.Module) -> None:
    for name, m in model.named_modules():
        label = name or type(model).__name__
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.Conv2d):
            raise ModelError(
                f"layer {label!r} is a {type(m).__name__}; fleetprune plans Conv2d and Linear layers only "
                "(replace it, or prune a model without it)"
            )
        own = [p for p, _ in m.named_parameters(recurse=False)]
        if own and not isinstance(m, _ALLOWED_WEIGHTED):
            raise ModelError(
                f"layer {label!r} ({type(m).__name__}) owns parameters {own} that Torch-Pruning cannot prune "
                "safely; fleetprune supports Conv2d, Linear, BatchNorm, LayerNorm, GroupNorm, InstanceNorm and PReLU"
            )


def _padding(m: nn.Conv2d, label: str) -> tuple[int, int]:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return 0, 0
        pads = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ModelError(f"layer {label!r} uses padding='same' with asymmetric padding, which a layer config cannot express")
            pads.append(total // 2)
        return pads[0], pads[1]
    return int(m.padding[0]), int(m.padding[1])


def _base_config(m: nn.Module, label: str, in_shape: tuple[int, ...], dtype: str, memory_format: str) -> LayerConfig:
    if isinstance(m, nn.Linear):
        rows = 1
        for s in in_shape[:-1]:
            rows *= int(s)
        return LayerConfig(
            op="linear", cin=m.in_features, cout=m.out_features, batch=max(rows, 1),
            dtype=dtype, memory_format=memory_format, act="none",
        )
    if m.dilation[0] != m.dilation[1]:
        raise ModelError(f"layer {label!r} has dilation {m.dilation}; only equal dilation in both axes is supported")
    batch = int(in_shape[0]) if len(in_shape) == 4 else 1
    ph, pw = _padding(m, label)
    return LayerConfig(
        op="dwconv" if _is_depthwise(m) else "conv", cin=m.in_channels, cout=m.out_channels,
        kh=m.kernel_size[0], kw=m.kernel_size[1], sh=m.stride[0], sw=m.stride[1], ph=ph, pw=pw,
        dilation=m.dilation[0], groups=m.groups, in_h=int(in_shape[-2]), in_w=int(in_shape[-1]),
        batch=batch, dtype=dtype, memory_format=memory_format, act="relu",
    )


@dataclass
class _RawGroup:
    width: int
    writes: dict[nn.Module, int]  # conv/linear -> output channels it has in this group
    reads: dict[nn.Module, int]   # conv/linear -> input channels it reads from this group
    reasons: list[str]
    name: str = ""
    unit: int = 0
    choices: tuple[int, ...] = ()


def _flatten_outputs(out: Any) -> Iterable[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, Mapping):
        for v in out.values():
            yield from _flatten_outputs(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from _flatten_outputs(v)


def build_plan(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    round_to: int = 16,
    max_choices: int = 32,
    dtype: str = "fp32",
    memory_format: str = "nchw",
) -> Plan:
    """Find a model's channel groups, their width choices and every layer's configuration.

    Args:
        model: any ``nn.Module`` built from Conv2d/Linear/norm layers (not modified; its
            train/eval mode is restored).
        example_input: one input batch; its batch size and spatial size go into the configs.
        round_to: channel alignment of units (16 by default; 8 for fp16/bf16 on GPUs).
        max_choices: most width choices a group may have; wider groups use larger units.
        dtype: dtype label of the configurations (``fp32``, ``fp16``, ``bf16``).
        memory_format: memory format label (``nchw`` or ``nhwc``).

    Raises:
        ModelError: an unsupported layer (named), a shared layer, or a model that does not trace.
    """
    import torch_pruning as tp

    if round_to < 1 or max_choices < 1:
        raise ValueError(f"round_to and max_choices must be >= 1, got {round_to}, {max_choices}")
    if dtype not in DTYPES or memory_format not in MEMORY_FORMATS:
        raise ValueError(f"dtype must be one of {DTYPES} and memory_format one of {MEMORY_FORMATS}")
    _check_supported(model)
    names = {m: n for n, m in model.named_modules()}

    in_shapes: dict[nn.Module, tuple[int, ...]] = {}
    calls: dict[nn.Module, int] = {}

    def record(m: nn.Module, args: tuple, _out: Any) -> None:
        calls[m] = calls.get(m, 0) + 1
        if args and isinstance(args[0], torch.Tensor):
            in_shapes[m] = tuple(args[0].shape)

    out_fns: set[Any] = set()

    def forward(m: nn.Module, x: Any) -> Any:
        out = m(x)
        out_fns.update(t.grad_fn for t in _flatten_outputs(out) if t.grad_fn is not None)
        return out

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, forward_fn=forward, verbose=False
            )
    except FleetpruneError:
        raise
    except Exception as exc:  # a model TP cannot trace: name the model, keep the cause
        raise ModelError(
            f"Torch-Pruning cannot build the dependency graph of {type(model).__name__} for input "
            f"{tuple(example_input.shape)} ({type(exc).__name__}: {exc}); try the model's usual input size"
        ) from exc
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    for m, n in calls.items():
        if n > 1:
            raise ModelError(f"layer {names[m]!r} runs {n} times in one forward; shared layers cannot be pruned per use")
    for m in calls:
        if m not in graph.module2node:
            raise ModelError(f"layer {names[m]!r} runs but its output never reaches the model output; remove the dead branch")
    for m in (m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in calls):
        log.debug("layer %s does not run for this input; it is left out of the plan", names[m])

    raw = _collect_groups(graph, out_fns, names)
    _resolve(raw, calls, graph, names)
    order = {m: i for i, m in enumerate(names)}
    layers_of = [m for m in names if m in calls]
    groups = _name_groups(raw, order, names, round_to, max_choices)

    # Which prunable group (if any) holds each layer's output, and what its input is made of.
    out_group: dict[nn.Module, _RawGroup] = {}
    for g in raw:
        if g.choices and len(g.choices) > 1:
            for m, n in g.writes.items():
                if n == _out_channels(m):
                    out_group[m] = g
    planned = []
    for m in layers_of:
        label = names[m]
        base = _base_config(m, label, in_shapes[m], dtype, memory_format)
        parts = [(g.name, g.reads[m] // g.width) for g in raw if m in g.reads and len(g.choices) > 1]
        fixed = base.cin - sum(g.reads[m] for g in raw if m in g.reads and len(g.choices) > 1)
        og = out_group.get(m)
        in_group = parts[0][0] if len(parts) == 1 and parts[0][1] == 1 and fixed == 0 else None
        planned.append(PlannedLayer(
            name=label, base=base, in_group=in_group, out_group=og.name if og else None,
            bn=_following_bn(graph, m, names), in_parts=tuple(parts), in_fixed=fixed,
        ))
    plan = Plan(groups=groups, layers=planned, input_shape=tuple(example_input.shape), round_to=round_to,
                max_choices=max_choices, dtype=dtype, memory_format=memory_format)
    if log.isEnabledFor(logging.INFO):
        log.info("plan for %s: %s", type(model).__name__, plan.summary())
    return plan


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _collect_groups(graph: Any, out_fns: set[Any], names: dict[nn.Module, str]) -> list[_RawGroup]:
    """Torch-Pruning's groups, reduced to which convs/linears write and read how many channels."""
    raw = []
    for tp_group in graph.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
        root = tp_group[0].dep.target.module
        g = _RawGroup(width=_out_channels(root), writes={}, reads={}, reasons=[])
        for dep, idxs in tp_group:
            node, m = dep.target, dep.target.module
            writes_here = True
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                pruner = graph.get_pruner_of_module(m)
                dw = _is_depthwise(m)
                writes_here = dw or dep.handler == pruner.prune_out_channels
                if writes_here:
                    g.writes[m] = len(idxs)
                if dw or dep.handler == pruner.prune_in_channels:
                    g.reads[m] = len(idxs)
                if dw and not node.inputs:
                    g.reasons.append(f"depthwise conv {names[m]} reads the model input")
                if _is_grouped(m):
                    g.reasons.append(f"grouped conv {names[m]} (groups={m.groups}) needs channels removed evenly per group")
            elif isinstance(m, nn.GroupNorm) and 1 < m.num_groups < m.num_channels:
                g.reasons.append(f"GroupNorm {names.get(m, m)} has {m.num_groups} groups")
            elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) > 1:
                # Torch-Pruning cuts the last normalised dim, which is not the channel dim here.
                g.reasons.append(f"LayerNorm {names.get(m, m)} normalises {tuple(m.normalized_shape)}")
            if writes_here and node.grad_fn in out_fns:
                g.reasons.append("its channels are a model output")
        raw.append(g)
    return raw


def _resolve(raw: list[_RawGroup], calls: dict[nn.Module, int], graph: Any, names: dict[nn.Module, str]) -> None:
    """Fix groups whose width does not map cleanly onto the layers that write or read them."""
    for m in calls:
        writers = [g for g in raw if m in g.writes]
        if len(writers) != 1 or writers[0].writes[m] != _out_channels(m):
            for g in writers:
                g.reasons.append(f"the output of {names[m]} is split over {len(writers)} groups")
    for g in raw:
        for m, n in g.reads.items():
            if n % g.width:
                g.reasons.append(f"{names[m]} reads only {n} of its {g.width} channels (split or slice)")


def _name_groups(
    raw: list[_RawGroup], order: dict[nn.Module, int], names: dict[nn.Module, str], round_to: int, max_choices: int
) -> list[ChannelGroup]:
    for g in raw:
        if g.reasons:
            g.unit, g.choices = g.width, (g.width,)
        else:
            g.unit, g.choices = unit_and_choices(g.width, round_to, max_choices)
            if len(g.choices) == 1:
                g.reasons.append(f"width {g.width} is a single unit at round_to={round_to}")
    raw.sort(key=lambda g: min(order[m] for m in g.writes))
    taken: set[str] = set()
    groups = []
    for g in raw:
        members = sorted(g.writes, key=order.__getitem__)
        name = names[members[0]]
        k = 2
        while name in taken:
            name, k = f"{names[members[0]]}#{k}", k + 1
        taken.add(name)
        g.name = name
        reason = "; ".join(dict.fromkeys(g.reasons))
        groups.append(ChannelGroup(
            name=name, width=g.width, unit=g.unit, choices=g.choices,
            members=tuple(names[m] for m in members),
            consumers=tuple(names[m] for m in sorted(g.reads, key=order.__getitem__)),
            prunable=not reason, reason=reason,
        ))
        if reason:
            log.debug("group %s (width %d) is fixed: %s", name, g.width, reason)
    return groups


def _following_bn(graph: Any, m: nn.Module, names: dict[nn.Module, str]) -> str | None:
    """The BatchNorm fed directly by ``m`` with matching channels (for BN folding in scores)."""
    bns = [
        n.module for n in graph.module2node[m].outputs
        if isinstance(n.module, nn.modules.batchnorm._BatchNorm) and n.module.num_features == _out_channels(m)
    ]
    return names[bns[0]] if len(bns) == 1 else None
