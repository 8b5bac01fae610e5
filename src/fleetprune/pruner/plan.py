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
* Ops (``Plan.ops``, :func:`plan_ops`): everything else whose cost moves with the widths is a row of
  its own, found in the model's torch.fx graph without any per-model list: residual adds (with the
  ReLU after them), pools, activations no conv row holds, unabsorbed batch norms, squeeze-excitation
  blocks (one row; their two 1x1 convs are ``Plan.absorbed``), channel concats. An op no row can
  price raises ``ModelError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from fleetprune.errors import FleetpruneError, ModelError
from fleetprune.tables.config import DTYPES, MEMORY_FORMATS, SAME_CHANNEL_OPS, SE_ACTS, LayerConfig

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
    ops: list[PlannedLayer] = field(default_factory=list)
    absorbed: tuple[str, ...] = ()
    _group_index: dict[str, ChannelGroup] = field(default_factory=dict, init=False, repr=False, compare=False)
    _layer_index: dict[str, PlannedLayer] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._group_index = {g.name: g for g in self.groups}
        self._layer_index = {layer.name: layer for layer in [*self.layers, *self.ops]}

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
        if layer.base.op in SAME_CHANNEL_OPS:
            return layer.base.with_channels(cin, cin)
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
        if layer.base.op in SAME_CHANNEL_OPS:
            return {(c, c) for c in cins}
        return {(ci, co) for ci in cins for co in couts}

    def layer_configs(self, layer: PlannedLayer | str) -> list[LayerConfig]:
        """Every configuration one layer can take over the choices of its groups, sorted."""
        layer = self.layer(layer) if isinstance(layer, str) else layer
        return [layer.base.with_channels(ci, co) for ci, co in sorted(self._pairs(layer))]

    def priced(self, ops: bool = True) -> list[PlannedLayer]:
        """What the latency model sums: with ``ops``, every layer whose cost no op row holds, then the
        op rows; without, the layers alone (how a table without op rows prices the network)."""
        if not ops:
            return list(self.layers)
        absorbed = set(self.absorbed)
        return [layer for layer in self.layers if layer.name not in absorbed] + list(self.ops)

    def configs(self) -> list[LayerConfig]:
        """Every configuration any layer or op can take, deduplicated across layers, sorted.

        The layers an op row absorbs (a squeeze-excitation's two 1x1 convs) stay in: a table without
        op rows prices the network from them.
        """
        # Repeated blocks share a dense config, so pool their (cin, cout) pairs before building.
        by_base: dict[LayerConfig, set[tuple[int, int]]] = {}
        for layer in [*self.layers, *self.ops]:
            by_base.setdefault(layer.base, set()).update(self._pairs(layer))
        seen = {base.with_channels(ci, co) for base, pairs in by_base.items() for ci, co in pairs}
        return sorted(seen)

    def summary(self) -> dict[str, int]:
        """Counts for reports: layers, ops, groups, prunable groups, configs (of layers and ops) with and
        without dedup, and the configs of layers alone (what a table before op rows needed)."""
        return {
            "layers": len(self.layers),
            "ops": len(self.ops),
            "groups": len(self.groups),
            "prunable_groups": len(self.prunable_groups()),
            "configs": len(self.configs()),
            "configs_without_dedup": sum(len(self._pairs(layer)) for layer in [*self.layers, *self.ops]),
            "layer_configs": len({c for layer in self.layers for c in self.layer_configs(layer)}),
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
            "ops": [op.to_dict() for op in self.ops],
            "absorbed": list(self.absorbed),
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
            ops=[PlannedLayer.from_dict(op) for op in d.get("ops", ())], absorbed=tuple(d.get("absorbed", ())),
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
    ops, absorbed = plan_ops(model, example_input, planned, groups, dtype=dtype, memory_format=memory_format)
    plan = Plan(groups=groups, layers=planned, input_shape=tuple(example_input.shape), round_to=round_to,
                max_choices=max_choices, dtype=dtype, memory_format=memory_format, ops=ops, absorbed=tuple(absorbed))
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


# ---------------------------------------------------------------------------------------------
# ops: everything between the convs and linears whose cost moves with the widths


_FREE_MODULES = (nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten)
_ACT_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
    nn.SiLU: "silu", nn.GELU: "gelu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
}
_ACT_FUNCTIONS = {"relu": "relu", "relu_": "relu", "relu6": "relu6", "hardswish": "hardswish",
                  "hardsigmoid": "hardsigmoid", "silu": "silu", "gelu": "gelu", "sigmoid": "sigmoid",
                  "sigmoid_": "sigmoid", "tanh": "tanh"}
# Functions and methods that cost nothing in inference (views, shape queries, eval-mode identities).
_FREE_CALLS = {"getitem", "getattr", "size", "dim", "_assert", "eq", "floordiv", "flatten", "view", "reshape",
               "transpose", "permute", "swapaxes", "unsqueeze", "squeeze", "chunk", "split", "dropout",
               "stochastic_depth", "identity", "type_as", "to", "float", "detach", "expand"}
_ADD_CALLS = {"add", "add_", "iadd"}


@dataclass
class _Recipe:
    """How a tensor's channel count follows the widths: ``fixed + sum(mult * width(group))``.

    ``None`` parts mean the channels are not a function of the plan's groups (a slice, a shuffle's
    view): the op is priced at its dense size (the groups feeding it are fixed anyway).
    """

    parts: tuple[tuple[str, int], ...]
    fixed: int


def _call_name(node: Any) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _tensor_shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _arg(node: Any, index: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


class _OpPlanner:
    """Walks the torch.fx graph of a model and prices every width-dependent op that is not a layer."""

    def __init__(self, gm: Any, layers: dict[str, PlannedLayer], prunable: set[str], batch: int, dtype: str,
                 memory_format: str):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.layers = layers
        self.prunable = prunable
        self.batch, self.dtype, self.memory_format = batch, dtype, memory_format
        self.recipes: dict[Any, _Recipe | None] = {}
        self.ops: list[PlannedLayer] = []
        self.absorbed: list[str] = []
        self.fused_into: dict[Any, str] = {}  # an add whose ReLU its row holds

    # -- helpers ------------------------------------------------------------------------------
    def kind(self, node: Any) -> str:
        if node.op == "call_module":
            return type(self.modules[node.target]).__name__
        return _call_name(node)

    def label(self, node: Any) -> str:
        return str(node.target) if node.op == "call_module" else node.name

    def fail(self, node: Any, why: str) -> None:
        raise ModelError(
            f"cannot price op {self.kind(node)!r} at {self.label(node)!r} ({why}); fleetprune prices convs, linears, "
            "residual adds, max/avg/adaptive-avg pools, ReLU/ReLU6/Hardswish/Hardsigmoid/SiLU/GELU/sigmoid/tanh, "
            "batch norm, squeeze-excitation blocks and channel concats: replace the op, or prune a model without it"
        )

    def recipe(self, node: Any) -> _Recipe | None:
        return self.recipes.get(node) if hasattr(node, "op") else None

    def tensor_inputs(self, node: Any) -> list[Any]:
        return [a for a in node.all_input_nodes if _tensor_shape(a) is not None]

    def add_op(self, node: Any, config: LayerConfig, recipe: _Recipe | None, *, out_group: str | None = None,
               name: str | None = None) -> None:
        parts = tuple((g, m) for g, m in recipe.parts if g in self.prunable) if recipe else ()
        fixed = config.cin - sum(m * self.group_width[g] for g, m in parts)
        in_group = parts[0][0] if len(parts) == 1 and parts[0][1] == 1 and fixed == 0 else None
        if config.op != "se":
            out_group = in_group
        self.ops.append(PlannedLayer(name=name or self.label(node), base=config, in_group=in_group,
                                     out_group=out_group, bn=None, in_parts=parts, in_fixed=fixed))

    def config(self, op: str, shape: tuple[int, ...] | None, node: Any, **kw: Any) -> LayerConfig:
        if shape is None:
            self.fail(node, "its input is not a tensor of known shape")
        if len(shape) == 4:
            _, c, h, w = shape
        elif len(shape) == 2:
            (_, c), h, w = shape, 1, 1
        else:
            self.fail(node, f"its input has shape {shape}; ops are priced on (N, C, H, W) or (N, C) tensors")
        kw.setdefault("act", "none")
        return LayerConfig(op=op, cin=c, cout=kw.pop("cout", c), in_h=h, in_w=w, batch=self.batch, dtype=self.dtype,
                           memory_format=self.memory_format, **kw)

    # -- the walk -------------------------------------------------------------------------------
    def run(self, group_width: dict[str, int]) -> None:
        self.group_width = group_width
        nodes = list(self.gm.graph.nodes)
        for node in nodes:
            if node.op == "placeholder":
                shape = _tensor_shape(node)
                self.recipes[node] = _Recipe((), shape[1]) if shape and len(shape) > 1 else None
            elif node.op in ("call_module", "call_function", "call_method"):
                self.visit(node)

    def visit(self, node: Any) -> None:
        """Record the channel recipe of ``node``'s output and add its op row if it costs anything."""
        shape = _tensor_shape(node)
        inputs = self.tensor_inputs(node)
        first = inputs[0] if inputs else None
        through = self.recipe(first) if first is not None else None
        kind = self.kind(node)
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                layer = self.layers.get(node.target)
                if layer is None:  # not planned (does not run for this input): nothing to price
                    self.recipes[node] = None
                elif layer.out_group is not None:
                    self.recipes[node] = _Recipe(((layer.out_group, 1),), 0)
                else:
                    self.recipes[node] = _Recipe((), layer.base.cout)
                return
            self.recipes[node] = through
            if isinstance(m, _FREE_MODULES):
                return
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if first is not None and self._is_layer(first):
                    return  # folded into the conv before it, as deployed
                self.add_op(node, self.config("bn", _tensor_shape(first), node), through)
            elif type(m) in _ACT_MODULES:
                self.activation(node, _ACT_MODULES[type(m)], first, through)
            elif isinstance(m, nn.MaxPool2d) or isinstance(m, nn.AvgPool2d):
                self.pool(node, "maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool", first, through,
                          m.kernel_size, m.stride, m.padding, getattr(m, "dilation", 1), m.ceil_mode)
            elif isinstance(m, nn.AdaptiveAvgPool2d):
                self.adaptive(node, first, through, m.output_size)
            else:
                self.fail(node, f"{type(m).__name__} is not an op fleetprune can time")
            return
        name = _call_name(node)
        if shape is None and name not in _ADD_CALLS:
            self.recipes[node] = None
            return  # shape queries, asserts: no tensor, no cost
        if name in ("flatten", "view", "reshape") and first is not None:
            self.recipes[node] = self.reshaped(first, shape)
            return
        if name in _FREE_CALLS:
            self.recipes[node] = through if name in ("dropout", "stochastic_depth", "identity", "to", "type_as",
                                                     "float", "detach") else None
            if name == "getitem" and through is not None and shape == _tensor_shape(first):
                self.recipes[node] = through
            return
        self.recipes[node] = through
        if name in _ADD_CALLS:
            self.add(node, inputs)
        elif name in _ACT_FUNCTIONS:
            self.activation(node, _ACT_FUNCTIONS[name], first, through)
        elif name == "contiguous":
            if len(shape) > 4:  # a channel shuffle's (N, groups, C/groups, H, W) view
                shape = (shape[0], math.prod(shape[1:-2]), shape[-2], shape[-1])
            self.add_op(node, self.config("act", shape, node, act="copy"), None)
            self.recipes[node] = None
        elif name == "cat":
            self.concat(node, inputs, shape)
        elif name == "mul":
            self.mul(node, inputs)
        elif name in ("max_pool2d", "avg_pool2d"):
            k = _arg(node, 1, "kernel_size")
            s = _arg(node, 2, "stride") or k
            p = _arg(node, 3, "padding", 0)
            if name == "max_pool2d":
                d, ceil = _arg(node, 4, "dilation", 1), _arg(node, 5, "ceil_mode", False)
            else:
                d, ceil = 1, _arg(node, 4, "ceil_mode", False)
            self.pool(node, "maxpool" if name == "max_pool2d" else "avgpool", first, through, k, s, p, d, ceil)
        elif name == "adaptive_avg_pool2d":
            self.adaptive(node, first, through, _arg(node, 1, "output_size"))
        elif name == "mean":
            dims = _arg(node, 1, "dim")
            dims = tuple(int(d) % 4 for d in (dims if isinstance(dims, (list, tuple)) else (dims,)))
            if first is None or len(_tensor_shape(first) or ()) != 4 or set(dims) != {2, 3}:
                self.fail(node, "only a mean over the two spatial dims (a global average pool) is priced")
            self.adaptive(node, first, through, 1)
        else:
            self.fail(node, "no table row prices it")

    def _is_layer(self, node: Any) -> bool:
        return node.op == "call_module" and isinstance(self.modules[node.target], (nn.Conv2d, nn.Linear))

    def _is_folded_bn(self, node: Any) -> bool:
        return (node.op == "call_module" and isinstance(self.modules[node.target], nn.modules.batchnorm._BatchNorm)
                and self.tensor_inputs(node) and self._is_layer(self.tensor_inputs(node)[0]))

    def activation(self, node: Any, act: str, first: Any, through: _Recipe | None) -> None:
        """An ``act`` row, unless it is a ReLU that a conv row or the residual add before it holds."""
        if act == "relu" and first is not None:
            conv = first if self._is_layer(first) else None
            if conv is None and self._is_folded_bn(first):
                conv = self.tensor_inputs(first)[0]
            if conv is not None and isinstance(self.modules[conv.target], nn.Conv2d) and len(first.users) == 1:
                return  # a conv row holds its ReLU (conv + folded BN + ReLU)
            if first in self.fused_into and len(first.users) == 1:
                return  # fused into the residual add before it
        self.add_op(node, self.config("act", _tensor_shape(first), node, act=act), through)

    def pool(self, node: Any, op: str, first: Any, through: _Recipe | None, k: Any, s: Any, p: Any, d: Any,
             ceil: bool) -> None:
        kh, kw = _pair(k)
        sh, sw = _pair(s if s else k)
        ph, pw = _pair(p)
        dh, dw = _pair(d)
        if dh != dw:
            self.fail(node, f"dilation {d} differs between the axes")
        shape = _tensor_shape(first) if first is not None else None
        if shape is None or len(shape) != 4:
            self.fail(node, f"its input has shape {shape}")
        self.add_op(node, self.config(op + ("_ceil" if ceil else ""), shape, node, kh=kh, kw=kw, sh=sh, sw=sw,
                                      ph=ph, pw=pw, dilation=dh if op == "maxpool" else 1), through)

    def adaptive(self, node: Any, first: Any, through: _Recipe | None, size: Any) -> None:
        shape = _tensor_shape(first) if first is not None else None
        if shape is None or len(shape) != 4:
            self.fail(node, f"its input has shape {shape}")
        out = _tensor_shape(node)
        oh, ow = (out[2], out[3]) if out is not None and len(out) == 4 else (1, 1)
        self.add_op(node, self.config("adaptive_avgpool", shape, node, kh=oh, kw=ow), through)

    def add(self, node: Any, inputs: list[Any]) -> None:
        """A residual add row; a ReLU that is its only user is fused into it."""
        shape = _tensor_shape(node)
        if len(inputs) != 2 or shape is None or any(_tensor_shape(a) != shape for a in inputs):
            self.fail(node, "only the sum of two tensors of the same shape (a residual add) is priced")
        act = "none"
        users = list(node.users)
        if len(users) == 1:
            u = users[0]
            is_relu = (u.op == "call_module" and isinstance(self.modules[u.target], nn.ReLU)) or \
                (u.op != "call_module" and _call_name(u) in ("relu", "relu_"))
            if is_relu:
                act = "relu"
                self.fused_into[node] = "add"
        rec = self.recipe(inputs[0]) or self.recipe(inputs[1])
        self.recipes[node] = rec
        self.add_op(node, self.config("add", shape, node, act=act), rec)

    def concat(self, node: Any, inputs: list[Any], shape: tuple[int, ...] | None) -> None:
        """A channel concat row; its recipe is the sum of its inputs'."""
        dim = _arg(node, 1, "dim", 0)
        if shape is None or len(shape) not in (2, 4) or int(dim) % len(shape) != 1:
            self.fail(node, "only a concat along the channel dim is priced")
        recs = [self.recipe(a) for a in inputs]
        rec = None if any(r is None for r in recs) else _Recipe(
            tuple(p for r in recs for p in r.parts), sum(r.fixed for r in recs))
        self.recipes[node] = rec
        self.add_op(node, self.config("concat", shape, node, groups=len(inputs)), rec)

    def mul(self, node: Any, inputs: list[Any]) -> None:
        se = self.squeeze_excitation(node, inputs)
        if se is None:
            self.fail(node, "a product is priced only as the scale of a squeeze-excitation block")

    def squeeze_excitation(self, node: Any, inputs: list[Any]) -> bool | None:
        """Match ``x * gate(conv(act(conv(pool(x)))))`` and price it as one ``se`` row."""
        if len(inputs) != 2:
            return None
        shapes = [_tensor_shape(a) for a in inputs]
        for gi in (0, 1):
            x, gate = inputs[1 - gi], inputs[gi]
            xs, gs = shapes[1 - gi], shapes[gi]
            if len(xs) != 4 or gs != (xs[0], xs[1], 1, 1):
                continue
            chain, cur = [], gate
            while cur is not x and len(chain) < 8:
                chain.append(cur)
                ins = self.tensor_inputs(cur)
                if len(ins) != 1:
                    break
                cur = ins[0]
            if cur is not x:
                continue
            kinds = [self.kind(c) for c in reversed(chain)]  # pool, conv, act, conv, gate
            convs = [c for c in chain if self._is_layer(c)]
            acts = [self._act_of(c) for c in reversed(chain) if not self._is_layer(c)]
            if len(chain) != 5 or len(convs) != 2 or None in acts[1:]:
                continue
            if kinds[0] not in ("AdaptiveAvgPool2d", "adaptive_avg_pool2d", "mean"):
                continue
            inner, gate_act = acts[1], acts[2]
            if f"{inner}-{gate_act}" not in SE_ACTS:
                continue
            fc1 = self.layers.get(str(list(reversed(chain))[1].target))
            if fc1 is None:
                continue
            cfg = self.config("se", xs, node, cout=fc1.base.cout, act=f"{inner}-{gate_act}")
            # the SE's own ops are in this row: leave the pool's and activations' rows out
            for c in chain:
                if not self._is_layer(c):
                    self.ops = [o for o in self.ops if o.name != self.label(c)]
            self.absorbed.extend(str(c.target) for c in reversed(chain) if self._is_layer(c))
            self.add_op(node, cfg, self.recipe(x), out_group=fc1.out_group)
            self.recipes[node] = self.recipe(x)
            return True
        return None

    def _act_of(self, node: Any) -> str | None:
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, nn.AdaptiveAvgPool2d):
                return "pool"
            return _ACT_MODULES.get(type(m))
        name = _call_name(node)
        if name in ("adaptive_avg_pool2d", "mean"):
            return "pool"
        return _ACT_FUNCTIONS.get(name)

    def reshaped(self, first: Any, shape: tuple[int, ...] | None) -> _Recipe | None:
        """The recipe after a flatten/view to ``(N, F)``: times H*W from a feature map, kept from ``(N, C, 1, 1)``."""
        rec, before = self.recipe(first), _tensor_shape(first)
        if rec is None or shape is None or before is None or len(shape) != 2:
            return None
        if len(before) == 4 and shape[1] == before[1] * before[2] * before[3]:
            hw = before[2] * before[3]
            return _Recipe(tuple((g, m * hw) for g, m in rec.parts), rec.fixed * hw)
        if len(before) >= 2 and shape[1] == before[1] and all(s == 1 for s in before[2:]):
            return rec
        return None


def plan_ops(model: nn.Module, example_input: torch.Tensor, layers: Sequence[PlannedLayer],
             groups: Sequence[ChannelGroup], *, dtype: str, memory_format: str) -> tuple[list[PlannedLayer], list[str]]:
    """The rows of every op that is not a conv or linear, from the model's torch.fx graph.

    Residual adds (a ReLU right after one is fused into its row), pools, activations a conv row does
    not already hold (it holds a ReLU), batch norms no conv absorbs, squeeze-excitation blocks (one
    row for pool, two 1x1 convs, activations and scale; the two convs are returned as absorbed) and
    channel concats. Views, shape queries and eval-mode identities cost nothing.

    Returns:
        ``(ops, absorbed)``: the op rows in graph order, and the layers whose cost an op row holds.

    Raises:
        ModelError: an op no row can price, named with its node.
    """
    from torch.fx import symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    was_training = model.training
    model.eval()
    try:
        gm = symbolic_trace(model)
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the same message
        raise ModelError(
            f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}), so the ops between its "
            "layers cannot be priced; make its forward traceable (no data-dependent control flow)"
        ) from exc
    finally:
        model.train(was_training)
    prunable = {g.name for g in groups if g.prunable}
    planner = _OpPlanner(gm, {layer.name: layer for layer in layers}, prunable, int(example_input.shape[0]), dtype,
                         memory_format)
    planner.run({g.name: g.width for g in groups})
    names = {layer.name for layer in layers}
    ops, seen = [], set(names)
    for op in planner.ops:
        name, k = op.name, 2
        while name in seen:
            name, k = f"{op.name}#{k}", k + 1
        seen.add(name)
        ops.append(dataclasses.replace(op, name=name) if name != op.name else op)
    return ops, planner.absorbed
