"""The latency model over a table (method.md §1, §4.4, §4.5): L(w) = sum_l T_l(w_in, w_out) + L_fixed.

The pruner never times anything. ``fixed_ms`` is whatever the caller says the layers do not cover
(for instance a measured dense end-to-end number minus the modeled layer sum, see
:func:`fixed_part`); every budget is compared with the model including it.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

Widths = Mapping[str, int]
_warned: set[str] = set()


def fixed_part(measured_dense_ms: float, modeled_dense_ms: float) -> float:
    """The part of a measured dense latency that the per-layer model misses, clamped at 0.

    Negative differences (layers summed in isolation overestimate the fused network) are clamped
    rather than carried, so the model never predicts below its own layer sum.
    """
    return max(0.0, float(measured_dense_ms) - float(modeled_dense_ms))


def input_groups(layer: Any) -> tuple[str, ...]:
    """The groups a layer's input channel count depends on (several for a concat).

    Uses ``layer.in_parts`` when the plan records it, else ``layer.in_group``.
    """
    parts = getattr(layer, "in_parts", None)
    if parts:
        return tuple(dict.fromkeys(g for g, _ in parts))
    return (layer.in_group,) if layer.in_group is not None else ()


def layer_groups(layer: Any) -> tuple[str, ...]:
    """Every group a layer's latency depends on: its input groups, then its output group."""
    out = (layer.out_group,) if layer.out_group is not None else ()
    return tuple(dict.fromkeys(input_groups(layer) + out))


def fit_kind(op: str) -> str:
    """The op kind a per-kind correction fits one factor for (a pool's ``_ceil`` variant is its pool)."""
    return op.removesuffix("_ceil")


def table_covers_ops(table: Any, ops: Sequence[Any] = ()) -> bool:
    """Whether ``table`` prices op rows: its ``covers_ops`` where it has one (a ``LatencyTable``), else
    whether it holds the dense configuration of any of ``ops`` (synthetic tables in tests)."""
    covers = getattr(table, "covers_ops", None)
    if covers is not None:
        return bool(covers)
    for op in ops:
        base = op.base
        try:
            if base in table if hasattr(table, "__contains__") else table.lookup(base) is not None:
                return True
        except Exception:  # noqa: BLE001 - a miss of any kind means "not covered"
            continue
    return False


def ops_note(table: Any, ops: Sequence[Any]) -> str:
    """What a model says when its table has no op rows: priced as before, and what to profile."""
    kinds = sorted({op.base.op for op in ops})
    key = getattr(table, "device_key", "") or "DEVICE"
    root = getattr(table, "root", None) or "ROOT"
    return (f"the table of {key} has no rows of {', '.join(kinds)} (schema 2, or profiled before fleetprune priced "
            f"them): the network is priced from its convs and linears alone, as before; run `fleetprune profile "
            f"MODEL --tables {root} --devices {key}` with the setting you prune at to measure them")


class LatencyModel:
    """Predicted latency of a network from a plan and a latency table.

    A layer's latency depends on the widths of :func:`layer_groups` (its input groups, so a concat
    or flatten of groups is priced exactly, and its output group); every other group is irrelevant
    to it. Lookups are cached by (layer, those widths).

    Args:
        plan: the channel-group plan (``plan.layers``, ``plan.groups``, ``plan.layer_config``,
            ``plan.dense_widths``).
        table: anything with ``lookup(config) -> ms`` (a :class:`LatencyTable`); ``lookup_many``
            is used when present so a miss names every missing configuration at once.
        fixed_ms: a constant added to every prediction (unmodeled ops, see :func:`fixed_part`). It may
            be negative: the intercept of a fitted line ``a * layer_sum + b`` (a table scaled by a)
            is below zero where layers run slower in the network than alone (weights streamed from
            memory), so that line, not a clamp, is what matches the measurements.
        fixed_source: where ``fixed_ms`` came from, for reports.
        ops: whether to sum the plan's op rows (residual adds, pools, activations, squeeze-excitation,
            concat); None (default): when the table holds op rows (:func:`table_covers_ops`). Without
            them the network is priced from its convs and linears alone, as tables before schema 3
            did, and :attr:`ops_note` says so.

    Attributes:
        layers: what is summed: the plan's layers (less those an op row absorbs) and its ops, or the
            layers alone; every entry has its channel groups, so the knapsack sees an op's cost too.
        ops_priced: whether the op rows are in the sum.
        ops_note: empty, or why the plan's ops are not priced (and how to price them).
    """

    def __init__(self, plan: Any, table: Any, fixed_ms: float = 0.0, fixed_source: str = "none",
                 ops: bool | None = None):
        if not np.isfinite(fixed_ms):
            raise ValueError(f"fixed_ms must be a finite number, got {fixed_ms}")
        self.plan = plan
        self.table = table
        self.fixed_ms = float(fixed_ms)
        self.fixed_source = fixed_source
        plan_ops = list(getattr(plan, "ops", ()) or ())
        self.ops_priced = bool(plan_ops) and (table_covers_ops(table, plan_ops) if ops is None else bool(ops))
        self.ops_note = "" if self.ops_priced or not plan_ops else ops_note(table, plan_ops)
        if self.ops_note and self.ops_note not in _warned:
            _warned.add(self.ops_note)  # once per table and kinds: settle builds several models of one table
            log.warning("%s", self.ops_note)
        self.layers = list(plan.priced(self.ops_priced)) if hasattr(plan, "priced") else list(plan.layers)
        self._groups = {g.name: g for g in plan.groups}
        self._dense = dict(plan.dense_widths())
        self._deps = {layer.name: layer_groups(layer) for layer in self.layers}
        self._cache: dict[tuple[str, tuple[int, ...]], float] = {}
        self._by_group: dict[str, list[Any]] = {}
        for layer in self.layers:
            for g in self._deps[layer.name]:
                self._by_group.setdefault(g, []).append(layer)

    # ----------------------------------------------------------------------------------- lookups
    def with_measured_dense(self, measured_dense_ms: float, source: str = "measured dense") -> "LatencyModel":
        """A copy whose ``fixed_ms`` is the measured dense latency minus the modeled layer sum."""
        model = LatencyModel(self.plan, self.table, fixed_part(measured_dense_ms, self.layer_sum(self._dense)), source,
                             ops=self.ops_priced)
        model._cache = self._cache
        return model

    def depends_on(self, layer: Any) -> tuple[str, ...]:
        """The groups whose widths set this layer's configuration."""
        return self._deps[layer.name]

    def layers_touching(self, group: str) -> list[Any]:
        """Layers whose configuration changes with ``group``'s width."""
        return list(self._by_group.get(group, []))

    def _key(self, layer: Any, widths: Widths) -> tuple[str, tuple[int, ...]]:
        return (layer.name, tuple(int(widths[g]) for g in self._deps[layer.name]))

    def _ensure_keys(self, pending: Iterable[tuple[Any, tuple[int, ...]]]) -> None:
        """Look up every (layer, widths of its groups) not yet cached, in one table call."""
        todo: dict[tuple[str, tuple[int, ...]], Any] = {}
        for layer, ws in pending:
            key = (layer.name, ws)
            if key not in self._cache and key not in todo:
                todo[key] = self.plan.layer_config(layer, {**self._dense, **dict(zip(self._deps[layer.name], ws))})
        if not todo:
            return
        configs = list(todo.values())
        if hasattr(self.table, "lookup_many"):
            values = np.asarray(self.table.lookup_many(configs), dtype=np.float64)
        else:
            values = np.array([self.table.lookup(c) for c in configs], dtype=np.float64)
        self._cache.update(zip(todo.keys(), values.tolist()))

    def _ensure(self, items: Iterable[tuple[Any, Widths]]) -> None:
        self._ensure_keys((layer, self._key(layer, widths)[1]) for layer, widths in items)

    def layer_ms(self, layer: Any, widths: Widths) -> float:
        """T_l with the groups at ``widths`` (only the groups the layer depends on are read)."""
        try:
            key = self._key(layer, widths)
        except KeyError:  # a partial dict: the omitted groups are dense
            widths = self.full_widths(widths)
            key = self._key(layer, widths)
        if key not in self._cache:
            self._ensure([(layer, widths)])
        return self._cache[key]

    def full_widths(self, widths: Widths | None = None) -> dict[str, int]:
        """``widths`` completed with the dense width of every group it omits."""
        out = dict(self._dense)
        if widths:
            out.update({k: int(v) for k, v in widths.items()})
        return out

    # ----------------------------------------------------------------------------- predictions
    def layer_costs(self, widths: Widths | None = None) -> dict[str, float]:
        """Per-layer latency (ms) at ``widths`` (dense for omitted groups)."""
        full = self.full_widths(widths)
        self._ensure((layer, full) for layer in self.layers)
        return {layer.name: self._cache[self._key(layer, full)] for layer in self.layers}

    def kind_sums(self, widths: Widths | None = None) -> dict[str, float]:
        """The layer sum at ``widths`` split by op kind (:func:`fit_kind`): what a per-kind correction scales."""
        out: dict[str, float] = {}
        names = {layer.name: layer for layer in self.layers}
        for name, ms in self.layer_costs(widths).items():
            kind = fit_kind(names[name].base.op)
            out[kind] = out.get(kind, 0.0) + ms
        return out

    def layer_sum(self, widths: Widths | None = None) -> float:
        """Sum of the layer latencies at ``widths``, without ``fixed_ms``."""
        return float(sum(self.layer_costs(widths).values()))

    def predict(self, widths: Widths | None = None) -> float:
        """Modeled network latency (ms) at ``widths``, ``fixed_ms`` included."""
        return self.layer_sum(widths) + self.fixed_ms

    def dense_ms(self) -> float:
        """Modeled latency of the dense network."""
        return self.predict(self._dense)

    def min_widths(self, current: Widths | None = None) -> dict[str, int]:
        """The fastest widths the table knows of (never above ``current``), found by coordinate descent.

        Starts with every prunable group at its smallest choice and moves one group at a time to the
        choice that lowers the predicted latency most, until no move helps. On a monotone table
        that is the narrowest network; on a table that is not (a wider conv can run faster on some
        kernels), the narrowest network is not the fastest, and refusing a budget because the
        narrowest is too slow would refuse a reachable one.
        """
        full = self.full_widths(current)
        options = {name: [c for c in g.choices if c <= full[name]] or [full[name]]
                   for name, g in self._groups.items() if g.prunable}
        widths = dict(full)
        widths.update({name: min(opts) for name, opts in options.items()})
        for _ in range(4 * max(1, len(options))):
            improved = False
            for name, opts in options.items():
                if len(opts) < 2:
                    continue
                here = widths[name]
                costs = {w: self.delta_ms(widths, name, w) for w in opts}
                best = min(opts, key=lambda w: (costs[w], w))
                if costs[best] < -1e-12 and best != here:
                    widths[name] = best
                    improved = True
            if not improved:
                break
        return widths

    def narrowest_widths(self, current: Widths | None = None) -> dict[str, int]:
        """Every prunable group at its smallest choice (never above its current width)."""
        full = self.full_widths(current)
        for name, g in self._groups.items():
            if g.prunable:
                fits = [c for c in g.choices if c <= full[name]]
                full[name] = min(fits) if fits else full[name]
        return full

    def min_latency(self, current: Widths | None = None) -> float:
        """The smallest reachable modeled latency (at :meth:`min_widths`)."""
        return self.predict(self.min_widths(current))

    def delta_ms(self, widths: Widths, group: str, new_width: int) -> float:
        """Change in predicted latency when only ``group`` moves to ``new_width``."""
        full = self.full_widths(widths)
        moved = dict(full)
        moved[group] = int(new_width)
        layers = self._by_group.get(group, [])
        return sum(self.layer_ms(layer, moved) for layer in layers) - sum(self.layer_ms(layer, full) for layer in layers)

    # ------------------------------------------------------------------- knapsack option weights
    def option_weights(
        self, current: Widths, options: Mapping[str, Sequence[int]]
    ) -> tuple[dict[str, np.ndarray], float]:
        """Per-class option weights with c_in frozen at the current widths (HALP, method §4.4).

        For class G and option width w the weight is the sum over layers with ``out_group == G`` of
        their latency with G at w and every input group at its current width (a depthwise layer,
        which reads G, thus sees w on both sides). Layers whose output is fixed or belongs to a
        group that is not a class go into the constant at the current widths, with ``fixed_ms``.

        Returns:
            ``({class: weights aligned with options[class]}, constant_ms)``.
        """
        full = self.full_widths(current)
        pending: list[tuple[Any, tuple[int, ...]]] = []
        owner: list[tuple[str | None, int]] = []
        for layer in self.layers:
            deps = self._deps[layer.name]
            base = tuple(int(full[d]) for d in deps)
            g = layer.out_group
            if g is not None and g in options:
                for i, w in enumerate(options[g]):
                    pending.append((layer, tuple(int(w) if d == g else b for d, b in zip(deps, base))))
                    owner.append((g, i))
            else:
                pending.append((layer, base))
                owner.append((None, 0))
        self._ensure_keys(pending)
        weights = {g: np.zeros(len(opts), dtype=np.float64) for g, opts in options.items()}
        constant = self.fixed_ms
        cache = self._cache
        for (layer, ws), (g, i) in zip(pending, owner):
            ms = cache[(layer.name, ws)]
            if g is None:
                constant += ms
            else:
                weights[g][i] += ms
        return weights, constant

    def cost_tensor(self, layer: Any, classes: Sequence[str], options: Mapping[str, Sequence[int]],
                    current: Widths) -> np.ndarray:
        """T_l over every combination of the options of ``classes`` (other groups at ``current``).

        Returns an array with one axis per class, in the order given.
        """
        full = self.full_widths(current)
        grids = [list(options[c]) for c in classes]
        combos = [dict(zip(classes, ws)) for ws in itertools.product(*grids)]
        items = [(layer, {**full, **combo}) for combo in combos]
        self._ensure(items)
        flat = np.array([self._cache[self._key(layer, w)] for _, w in items], dtype=np.float64)
        return flat.reshape([len(g) for g in grids]) if grids else flat.reshape(())
