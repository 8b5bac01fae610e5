"""Calibration and closed-loop verification of the latency model against measured networks.

The table prices layers timed alone; a network runs them with its weights cold, adds residual
adds, pooling and per-op overhead. How the prediction becomes a budget that holds on the device:

1. :func:`settle` gives the latency model a line ``measured ~ a * layer_sum + b``: a validate
   correction stored in the table for this model and setting (fitted over many networks), else the
   line through the dense and the narrowest network measured side by side on the device, else the
   table alone (a device nobody can reach).
2. :func:`close_loop` builds the variant the knapsack chooses, measures it beside the dense model,
   and re-solves with a corrected table-space target (secant, or proportional where the secant has
   no slope) until the measured latency lands within :data:`WINDOW` of the budget or the rounds are
   spent.

The pruner never times anything: every measurement comes through a ``measure`` callable that the
caller passes (the profiler on this machine, or an actor pinned to the device type on a cluster).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fleetprune.errors import BudgetError, DeviceLostError
from fleetprune.pruner.latency import LatencyModel, fit_kind
from fleetprune.pruner.schedule import Budget

log = logging.getLogger(__name__)

WINDOW = (0.95, 1.00)
"""Measured latency / budget that counts as meeting a budget: not over it, and not more than 5% under
(accuracy given away)."""
GOAL = 0.975
"""Where the closed loop aims inside :data:`WINDOW`: its middle, so noise of a few percent stays inside."""
TWO_POINT_SLOPES = (0.5, 2.5)
"""The slopes a two-point line may have; outside them the points are taken as noise (offset used)."""
AGREE = 0.03
"""Two estimates of a variant's share must agree within this before a round is scored: the ratio of the
call's own side-by-side pair, and the ratio of each network's fastest measurement so far. They part
when a neighbour disturbs one network of a call (then the fastest figures are right) or the whole
call (then the pair is); measuring again settles which."""
CONFIRMS = 2
"""At most this many extra measurements of one network while the two estimates disagree."""
FLOOR_MARGIN = 0.90
"""A relative budget is refused only below this share of the measured floor (the fastest network's
share of dense): measurements of a few percent apart must never refuse a reachable budget."""

TABLE_ONLY = "table rows only"
FIXED_MEASURED = "end-to-end measurement of the dense model"
FIXED_TWO_POINT = "end-to-end measurements of the dense and the fastest network"
FIXED_CORRECTION = "fitted correction from fleetprune validate"
FIXED_PER_KIND = "per-kind correction from fleetprune validate"
PRICED_BY = ("per-kind correction", "line correction", "two-point line", "dense offset", "table only")
"""What ``Settled.priced_by`` (report.json's ``latency_model``) may say priced a variant."""
LATENCY_FITS = ("two-point", "offset")


@dataclass(frozen=True)
class Network:
    """One network to measure: a width plan, and the weights to load (None: the dense weights cut to it)."""

    widths: Mapping[str, int]
    state: Mapping[str, Any] | None = None


@dataclass
class Timing:
    """Networks measured in the same interleaved rounds on one device.

    Attributes:
        ms: each network's latency (the table protocol's statistic, best round), in order.
        where: where it ran, e.g. ``{"device_key": ..., "node_id": ..., "pid": ..., "via": "actor"}``.
    """

    ms: list[float]
    where: dict[str, Any] = field(default_factory=dict)


Measure = Callable[[Sequence[Network]], Timing]
"""Measures networks side by side on the device; raises :class:`DeviceLostError` when it went away."""


class ScaledTable:
    """A table whose every lookup is multiplied by ``a`` (the slope of a fitted line)."""

    def __init__(self, table: Any, a: float):
        self.table, self.a = table, float(a)
        self.device_key = getattr(table, "device_key", "")

    @property
    def covers_ops(self) -> bool | None:
        """The wrapped table's (None where it does not say: the latency model probes it)."""
        return getattr(self.table, "covers_ops", None)

    def __contains__(self, item: object) -> bool:
        try:
            self.table.lookup(item)
        except Exception:  # noqa: BLE001 - any miss
            return False
        return True

    def lookup(self, config: Any) -> float:
        return self.a * self.table.lookup(config)

    def lookup_many(self, configs: Any) -> np.ndarray:
        return self.a * np.asarray(self.table.lookup_many(configs), dtype=np.float64)


class KindScaledTable(ScaledTable):
    """A table whose lookups are scaled by a factor per op kind (a per-kind correction); a kind without
    a factor is scaled by ``a`` (the fit's prior, the line's slope)."""

    def __init__(self, table: Any, factors: Mapping[str, float], a: float):
        super().__init__(table, a)
        self.factors = {str(k): float(v) for k, v in factors.items()}

    def _factor(self, config: Any) -> float:
        return self.factors.get(fit_kind(config.op), self.a)

    def lookup(self, config: Any) -> float:
        return self._factor(config) * self.table.lookup(config)

    def lookup_many(self, configs: Any) -> np.ndarray:
        configs = list(configs)
        scale = np.array([self._factor(c) for c in configs], dtype=np.float64)
        return scale * np.asarray(self.table.lookup_many(configs), dtype=np.float64)


class Correction(tuple):
    """A stored validate correction: ``(a, b)`` of the line (unpacks and lists as before), and where the
    table carries one, ``per_kind`` = ``{"factors": {kind: f}, "b": c, ...}`` (the pruner prefers it)."""

    per_kind: dict[str, Any] | None

    def __new__(cls, a: float, b: float, per_kind: Mapping[str, Any] | None = None) -> "Correction":
        out = super().__new__(cls, (float(a), float(b)))
        out.per_kind = dict(per_kind) if per_kind else None
        return out


def _usable_per_kind(raw: Any) -> dict[str, Any] | None:
    """The per-kind fit of a stored correction if it is well formed (finite, non-negative factors)."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("factors"), Mapping):
        return None
    try:
        factors = {str(k): float(v) for k, v in raw["factors"].items()}
        b = float(raw["b"])
    except (KeyError, TypeError, ValueError):
        return None
    if not factors or not math.isfinite(b) or any(not math.isfinite(f) or f < 0 for f in factors.values()):
        return None
    return {**raw, "factors": factors, "b": b}


def two_point_line(dense_sum: float, dense_ms: float, narrow_sum: float, narrow_ms: float) -> tuple[float, float] | None:
    """``measured ~ a * layer_sum + b`` through the dense and the fastest network, or None when the two
    cannot give a trustworthy line (layer sums within 10% of each other, a slope outside
    :data:`TWO_POINT_SLOPES`, or a line that predicts a network at or below 0 ms)."""
    if dense_sum - narrow_sum <= 0.10 * dense_sum:
        return None
    a = (dense_ms - narrow_ms) / (dense_sum - narrow_sum)
    b = dense_ms - a * dense_sum
    if not TWO_POINT_SLOPES[0] <= a <= TWO_POINT_SLOPES[1] or a * narrow_sum + b <= 0:
        return None
    return a, b


def stored_correction(table: Any, model_name: str, setting: Mapping[str, Any]) -> Correction | None:
    """The validate correction the table carries, if it was fitted for this model and setting.

    ``setting`` holds ``batch``, ``dtype``, ``memory_format`` and ``input_shape`` (a list); a field the
    stored correction does not record is not checked (corrections written before it existed). The
    result unpacks as ``(a, b)``; its ``per_kind`` is the per-kind fit where one was stored.
    """
    corr = table.correction
    raw = table.provenance.get("correction")
    if corr is None or corr[0] <= 0:
        return None
    if isinstance(raw, Mapping):
        wanted = {"model": model_name, **setting}
        for key, want in wanted.items():
            have = raw.get(key)
            if have is not None and (list(have) if isinstance(have, (list, tuple)) else have) != want:
                return None
    return Correction(corr[0], corr[1], _usable_per_kind(raw.get("per_kind")) if isinstance(raw, Mapping) else None)


@dataclass
class Settled:
    """The latency model of one device and the measurements it came from (None where not measured)."""

    model: LatencyModel
    latency_fit: str | None = None
    dense_measured_ms: float | None = None
    narrow_measured_ms: float | None = None
    narrow_layer_sum_ms: float | None = None
    correction: tuple[float, float] | None = None
    lost: str | None = None
    priced_by: str = "table only"

    @property
    def floor_share(self) -> float | None:
        """The fastest network's measured latency as a share of dense, measured side by side."""
        if self.dense_measured_ms and self.narrow_measured_ms:
            return self.narrow_measured_ms / self.dense_measured_ms
        return None

    def to_dict(self) -> dict[str, Any]:
        """The report.json fields of the latency model."""
        lm = self.model
        return {
            "dense_layer_sum_ms": lm.layer_sum(), "dense_measured_ms": self.dense_measured_ms,
            "narrow_measured_ms": self.narrow_measured_ms, "narrow_layer_sum_ms": self.narrow_layer_sum_ms,
            "floor_share": self.floor_share, "latency_fit": self.latency_fit, "fixed_ms": lm.fixed_ms,
            "fixed_source": lm.fixed_source, "correction": list(self.correction) if self.correction else None,
            "ops_priced": lm.ops_priced, "pricing_note": lm.ops_note, "latency_model": self.priced_by,
            "per_kind": dict(getattr(self.correction, "per_kind", None) or {}) or None
            if self.priced_by == "per-kind correction" else None,
        }


def settle(plan: Any, table: Any, *, correction: tuple[float, float] | None = None,
           measure: Measure | None = None, latency_fit: str = "two-point") -> Settled:
    """The latency model for one device: first that applies of a stored ``correction``, the line
    through the dense and the fastest network measured side by side (``two-point``; ``offset`` adds
    the dense model's excess as a constant), the table rows alone (``measure`` None).

    A device lost while measuring leaves the table-only model with ``lost`` saying why.
    """
    lm = LatencyModel(plan, table, 0.0, TABLE_ONLY)
    out = Settled(lm, correction=correction)
    if measure is not None:
        fastest = lm.min_widths()
        try:
            timing = measure([Network(lm.full_widths()), Network(fastest)])
        except DeviceLostError as exc:
            log.warning("%s: the device went away while measuring the dense model (%s); predicting from the table "
                        "only", getattr(table, "device_key", "?"), exc)
            out.lost = str(exc)
            measure = None
        else:
            out.latency_fit = latency_fit
            out.dense_measured_ms, out.narrow_measured_ms = timing.ms[0], timing.ms[1]
            out.narrow_layer_sum_ms = lm.layer_sum(fastest)
    if correction is not None:
        a, b = correction
        per_kind = getattr(correction, "per_kind", None)
        if per_kind:
            factors = per_kind["factors"]
            shown = ", ".join(f"{k}={f:.3g}" for k, f in sorted(factors.items()))
            out.model = LatencyModel(plan, KindScaledTable(table, factors, float(per_kind.get("prior", a))),
                                     float(per_kind["b"]), f"{FIXED_PER_KIND} ({shown}, b={per_kind['b']:.4g})")
            out.priced_by = "per-kind correction"
            return out
        out.model = LatencyModel(plan, ScaledTable(table, a), b, f"{FIXED_CORRECTION} (a={a:.4g}, b={b:.4g})")
        out.priced_by = "line correction"
        return out
    if out.dense_measured_ms is None:
        return out
    layers = lm.layer_sum()
    line = None
    if latency_fit == "two-point":
        line = two_point_line(layers, out.dense_measured_ms, out.narrow_layer_sum_ms, out.narrow_measured_ms)
        if line is None:
            log.warning("%s: the dense (%.4g ms, layer sum %.4g) and the fastest network (%.4g ms, layer sum %.4g) "
                        "give no usable line; using the dense measurement's offset", getattr(table, "device_key", "?"),
                        out.dense_measured_ms, layers, out.narrow_measured_ms, out.narrow_layer_sum_ms)
    if line is not None:
        a, b = line
        out.model = LatencyModel(plan, ScaledTable(table, a), b, f"{FIXED_TWO_POINT} (a={a:.4g}, b={b:.4g})")
        out.priced_by = "two-point line"
    else:
        out.model = lm.with_measured_dense(out.dense_measured_ms, FIXED_MEASURED)
        out.priced_by = "dense offset"
    return out


def check_floor(budget: Budget, settled: Settled, model_name: str, device_key: str) -> None:
    """Refuse a budget the device cannot reach, judged by measurement where there is one.

    With a measured floor (the fastest network beside the dense model) a relative budget is refused
    only below :data:`FLOOR_MARGIN` of it, and an absolute one below that share of the fastest
    network's time: the closed loop handles the rest and reports a floor it could not pass. Without
    a measurement, the model's own minimum decides.

    Raises:
        BudgetError: naming the minimum in ms and as a share of dense.
    """
    lm = settled.model
    dense_ms, minimum = lm.dense_ms(), lm.min_latency()
    if settled.floor_share is not None:
        share = settled.floor_share
        asked = budget.fraction if budget.relative else budget.ms / settled.dense_measured_ms
        if asked >= FLOOR_MARGIN * share:
            return
        raise BudgetError(
            f"budget {budget.text} is {asked:.3f} of dense on {device_key}, below the fastest {model_name} can run "
            f"there: {share:.3f} of dense ({settled.narrow_measured_ms:.4g} ms beside the dense "
            f"{settled.dense_measured_ms:.4g} ms, measured side by side); ask for at least {share:.3f}"
        )
    target = budget.of(dense_ms)
    if target < minimum * (1 - 1e-9):
        raise BudgetError(
            f"budget {budget.text} is {target:.4g} ms on {device_key}, below the smallest latency {model_name} can "
            f"reach there: {minimum:.4g} ms (dense {dense_ms:.4g} ms, fixed part {lm.fixed_ms:.4g} ms from "
            f"{lm.fixed_source}); ask for at least {minimum:.4g} ms ({minimum / dense_ms:.3f} of dense)"
        )


@dataclass
class Round:
    """One closed-loop round: the table-space target, what the model predicted, what was measured.

    ``measured_ms`` and ``dense_measured_ms`` are the pair the share is scored on: a call whose own
    ratio agrees with the ratio of each network's fastest measurement so far (else those fastest
    figures); ``raw_ms`` / ``raw_dense_ms`` are the round's last call, taken side by side."""

    round: int
    target_ms: float
    predicted_ms: float
    measured_ms: float
    dense_measured_ms: float
    share: float
    widths: dict[str, int]
    final: bool = False
    raw_ms: float | None = None
    raw_dense_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def status_of(share: float | None, window: tuple[float, float] = WINDOW) -> str:
    """``met``, ``over``, ``under``, or ``predicted only`` without a measurement."""
    if share is None:
        return "predicted only"
    if share > window[1] * (1 + 1e-9):
        return "over"
    return "under" if share < window[0] else "met"


def verdict_text(share: float | None, window: tuple[float, float] = WINDOW) -> str:
    """What the summary table prints: ``met (0.97 of budget)``, ``over by 4.1%``, ``under by 6.0%``."""
    status = status_of(share, window)
    if status == "met":
        return f"met ({share:.3f} of budget)"
    if status == "over":
        return f"over by {100 * (share - 1):.1f}%"
    if status == "under":
        return f"under by {100 * (1 - share):.1f}%"
    return status


@dataclass
class Verification:
    """How a variant's budget was checked on its device.

    Attributes:
        status: ``met``, ``over``, ``under`` or ``predicted only`` (see :func:`status_of`).
        target_ms: the table-space budget the variant was pruned to.
        rounds: every measured round in order, the final measurement (``final=True``) last if made.
        chosen: the index in ``rounds`` of the round whose target the variant was pruned to.
        note: why it is not met (the floor, the width granularity), or why it is predicted only.
        where: where the measurements ran (device key, node, process).
    """

    status: str
    target_ms: float
    rounds: list[Round] = field(default_factory=list)
    chosen: int | None = None
    note: str = ""
    where: dict[str, Any] = field(default_factory=dict)
    window: tuple[float, float] = WINDOW
    fastest: "_Fastest | None" = field(default=None, repr=False)

    @property
    def standing(self) -> Round | None:
        """The measurement that stands: the final one if made, else the chosen round."""
        if self.rounds and self.rounds[-1].final:
            return self.rounds[-1]
        return None if self.chosen is None else self.rounds[self.chosen]

    @property
    def share(self) -> float | None:
        """Measured latency / budget of the variant (None: not measured)."""
        r = self.standing
        return None if r is None else r.share

    @property
    def verdict(self) -> str:
        return verdict_text(self.share, self.window) if self.standing else self.status

    def to_dict(self) -> dict[str, Any]:
        r = self.standing
        return {"status": self.status, "verdict": self.verdict, "share": self.share, "target_ms": self.target_ms,
                "measured_ms": None if r is None else r.measured_ms,
                "dense_measured_ms": None if r is None else r.dense_measured_ms, "window": list(self.window),
                "note": self.note, "measured_on": self.where, "chosen_round": None if self.chosen is None else
                self.rounds[self.chosen].round, "rounds": [r.to_dict() for r in self.rounds]}


class _Fastest:
    """The fastest measurement of each network (by width plan) on one device, across calls: each call
    times its networks side by side, and a network measured again keeps its fastest figure."""

    def __init__(self, dense: Mapping[str, int], dense_ms: float | None = None):
        self.ms: dict[tuple, float] = {} if dense_ms is None else {_key(dense): float(dense_ms)}

    def add(self, widths: Mapping[str, int], ms: float) -> float:
        key = _key(widths)
        self.ms[key] = min(ms, self.ms.get(key, ms))
        return self.ms[key]

    def measure(self, measure: Measure, dense: Network, variant: Network) -> tuple[float, float, Timing]:
        """Measure ``variant`` beside the dense model; again (at most :data:`CONFIRMS` times) while the
        call's own ratio and the ratio of the fastest figures so far disagree by more than :data:`AGREE`.

        Returns the pair to score (the agreeing call's own pair: both networks timed equally often;
        if no call agrees, the fastest figures of each) and the last call's timing.
        """
        for _ in range(1 + CONFIRMS):
            timing = measure([dense, variant])
            raw_dense, raw = timing.ms
            dense_ms, ms = self.add(dense.widths, raw_dense), self.add(variant.widths, raw)
            if abs((raw / raw_dense) / (ms / dense_ms) - 1) <= AGREE:
                return raw_dense, raw, timing
            log.info("measured %.4g ms beside dense %.4g ms, the fastest so far %.4g beside %.4g: measuring again",
                     raw, raw_dense, ms, dense_ms)
        return dense_ms, ms, timing



def _key(widths: Mapping[str, int]) -> tuple:
    return tuple(sorted((k, int(v)) for k, v in widths.items()))


Solve = Callable[[float], tuple[dict[str, int], float]]
"""``solve(target_ms) -> (widths, predicted_ms)``: what the knapsack settles on for a table-space target."""


def close_loop(solve: Solve, measure: Measure, budget: Budget, model: LatencyModel, *, rounds: int = 4,
               window: tuple[float, float] = WINDOW, goal: float = GOAL,
               dense_measured_ms: float | None = None) -> Verification:
    """Measure what the knapsack chooses and correct its target until the budget holds on the device.

    Round 1 solves for the budget as the model sees it; each round measures the variant beside the
    dense model (a relative budget is checked as a ratio of the two) and, outside ``window``, moves
    the table-space target (:func:`_next_target`: the secant inside a bracket of tries under and over
    the goal, else through the two tries nearest it, else proportionally), clamped to what the model
    can reach. A target that gives the
    widths of an earlier round again costs no measurement: the next target halves the bracket of
    tries below and above the goal instead (the widths move in steps, the target does not). It stops
    inside the window, when ``rounds`` measurements are spent, when the target cannot move (floor or
    dense) or when the bracket is narrower than the width steps can resolve.

    A round is scored on a pair measured side by side whose ratio agrees with the ratio of each
    network's fastest measurement so far (``dense_measured_ms``: one taken before, by :func:`settle`),
    measuring again while they disagree: one disturbed measurement of the dense model must not make a
    variant look inside the window, nor a call disturbed as a whole make it look outside.

    Returns:
        The verification, with the chosen round's target as ``target_ms``: the round inside the
        window if any, else the one nearest it (:func:`_choose`). A device lost mid-way gives
        ``predicted only`` at the last target, with the reason in ``note``.
    """
    hi = model.dense_ms()
    # the knapsack reaches down to the narrowest network for sure; below it only where the table is not
    # monotone and the frozen-c_in steps happen to find the faster plan, so the loop stays above it
    lo = min(hi, max(model.min_latency(), model.predict(model.narrowest_widths())))
    dense = Network(model.full_widths())
    fastest = _Fastest(dense.widths, dense_measured_ms)
    target = min(hi, max(lo, budget.of(hi)))
    done: list[Round] = []
    tries: list[tuple[float, float]] = []  # (target, share) of every solve, repeats included
    seen: dict[tuple, Round] = {}
    where: dict[str, Any] = {}
    note = ""
    for _ in range(4 * max(1, rounds)):
        try:
            widths, predicted = solve(target)
        except BudgetError:
            if not done:
                raise
            note = f"the floor: the knapsack found no width plan for {target:.4g} ms"
            break
        key = tuple(sorted(widths.items()))
        repeat = seen.get(key)
        if repeat is None:
            try:
                dense_ms, ms, timing = fastest.measure(measure, dense, Network(widths))
            except DeviceLostError as exc:
                log.warning("verification lost its device (%s): the variant is pruned open-loop", exc)
                return Verification("predicted only", target, done, note=f"device lost during verification: {exc}",
                                    where=where, window=window)
            where = timing.where
            raw_dense, raw = timing.ms
            rec = Round(len(done) + 1, target, float(predicted), ms, dense_ms, budget.share(ms, dense_ms),
                        dict(widths), raw_ms=raw, raw_dense_ms=raw_dense)
            done.append(rec)
            seen[key] = rec
            log.info("verify round %d: target %.4g ms, predicted %.4g ms, measured %.4g ms beside dense %.4g ms: %s",
                     rec.round, target, predicted, ms, dense_ms, verdict_text(rec.share, window))
            share = rec.share
        else:
            share = repeat.share
            log.info("target %.4g ms gives the widths of round %d again", target, repeat.round)
        tries.append((target, share))
        if window[0] <= share <= window[1] or len(done) >= rounds:
            break
        nxt = min(hi, max(lo, _next_target(tries, goal, bisect=repeat is not None)))
        if nxt in (lo, hi) and nxt == target:
            note = ("the floor: the fastest network the table knows is still over the budget"
                    if share > window[1] else "the dense model is under the budget")
            break
        if min(abs(nxt - t) for t, _ in tries) <= 1e-3 * target:
            note = ("the width granularity: no width plan between the closest ones measured lands within "
                    f"{window[0]:.2f}-{window[1]:.2f} of the budget")
            break
        target = nxt
    chosen = _choose(done, window)
    status = status_of(chosen.share, window)
    if status != "met" and not note:
        note = f"{len(done)} rounds were not enough to land within {window[0]:.2f}-{window[1]:.2f} of the budget"
    return Verification(status, chosen.target_ms, done, chosen=done.index(chosen),
                        note=note if status != "met" else "", where=where, window=window, fastest=fastest)


def _next_target(tries: Sequence[tuple[float, float]], goal: float, bisect: bool = False) -> float:
    """The next table-space target from the (target, share) tries: inside a bracket (tries below and
    above the goal) the secant between its ends, or its midpoint with ``bisect`` or when noise makes
    the ends disagree; outside one, the secant through the two tries nearest the goal, or proportional
    to the last."""
    t, share = tries[-1]
    proportional = t * goal / share
    below = [p for p in tries if p[1] < goal]
    above = [p for p in tries if p[1] >= goal]
    if below and above:
        # the bracket's ends in target: the highest target measured under the goal, the lowest over it
        a = max(below, key=lambda p: (p[0], p[1]))
        b = min(above, key=lambda p: (p[0], p[1]))
        if bisect or b[0] <= a[0]:
            return 0.5 * (a[0] + b[0])
    elif len(tries) >= 2:
        a, b = sorted(tries, key=lambda p: abs(p[1] - goal))[:2]
    else:
        return proportional
    if b[0] == a[0] or (b[1] - a[1]) / (b[0] - a[0]) <= 0:
        return proportional
    slope = (b[1] - a[1]) / (b[0] - a[0])
    # a secant much flatter than the proportional slope (two shares equal up to noise) would throw the
    # target far off: share ~ target near the goal, so trust it only within a factor 4 of that slope
    if slope < 0.25 * share / t:
        return proportional
    return a[0] + (goal - a[1]) / slope


OVER_WEIGHT = 2.0
"""Outside the window, a share over the budget counts this many times its distance under it when the
loop picks its round: over by 1% is worse than under by 1%, but far better than under by 40%."""


def _choose(done: Sequence[Round], window: tuple[float, float]) -> Round:
    """The round inside the window closest to the budget, else the one nearest the window, a share over
    the budget weighing :data:`OVER_WEIGHT` times a share under it."""
    inside = [r for r in done if window[0] <= r.share <= window[1]]
    if inside:
        return max(inside, key=lambda r: r.share)
    return min(done, key=lambda r: OVER_WEIGHT * (r.share - window[1]) if r.share > window[1]
               else window[0] - r.share)


def finish(verification: Verification, measure: Measure, budget: Budget, dense: Mapping[str, int],
           final: Network, predicted_ms: float) -> Verification:
    """Measure the final variant (after fine-tuning, with its own weights) beside the dense model once
    more, and make that the verdict (each network at its fastest measurement on the device so far). A
    lost device keeps the rounds' verdict and says so."""
    # the same architecture measured before (no fine-tuning moved a width) keeps its fastest figure
    fastest = verification.fastest or _Fastest(dense)
    verification.fastest = fastest
    try:
        dense_ms, ms, timing = fastest.measure(measure, Network(dense), final)
    except DeviceLostError as exc:
        verification.note = (verification.note + "; " if verification.note else "") + \
            f"the final variant was not measured: device lost ({exc})"
        return verification
    raw_dense, raw = timing.ms
    chosen = None if verification.chosen is None else verification.rounds[verification.chosen]
    if chosen is not None and chosen.widths == dict(final.widths):
        # the chosen round's network again (no fine-tuning moved a width): both pairs are of the same two
        # networks, timed equally often, so each keeps its fastest of the two
        dense_ms, ms = min(dense_ms, chosen.dense_measured_ms), min(ms, chosen.measured_ms)
    n = len(verification.rounds) + 1
    verification.rounds.append(Round(n, verification.target_ms, float(predicted_ms), ms, dense_ms,
                                     budget.share(ms, dense_ms), dict(final.widths), final=True, raw_ms=raw,
                                     raw_dense_ms=raw_dense))
    verification.where = timing.where or verification.where
    verification.status = status_of(verification.share, verification.window)
    if verification.status == "met":
        verification.note = ""
    elif not verification.note:
        verification.note = "the final variant, measured once more beside the dense model, landed outside the window"
    return verification
