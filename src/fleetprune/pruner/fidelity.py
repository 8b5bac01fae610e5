"""How well a table predicts whole networks: random width plans, fidelity figures and the fitted correction.

``fleetprune validate`` draws random width plans across the latency range (:func:`draw_widths`),
measures each beside the dense model on the device, and :func:`summarise` turns the measurements into
fidelity figures and a correction ``measured ~ a * layer_sum + b`` fitted on the dense model and the
first :func:`calibration_count` variants and reported on the rest (held out). The pruner's latency
model uses a stored correction (:func:`fleetprune.pruner.calibrate.stored_correction`).

What the figures compare (every one recomputes from the rows written to ``validation.parquet``):

* ``predicted_ms = layer_sum_ms + fixed_ms``, with ``fixed_ms`` the dense model's measured latency
  minus its layer sum (clamped at 0): what the pruner predicts on a machine where it can measure the
  dense model. The "before" figures cover every random variant (the dense row is exact by
  construction and left out).
* ``corrected_ms = a * layer_sum_ms + b`` on the held-out variants.
* ``per_kind_ms = sum_k f_k * kind_sum_k + c``: one non-negative factor per op kind (conv, dwconv,
  linear, add, act, se, ...) and a constant (:func:`fit_per_kind`), fitted on the same calibration
  networks from each row's ``kind_sums`` and reported on the held-out ones. It replaces the line
  when it predicts the held-out networks at least as well.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import stats

from fleetprune.errors import FleetpruneError
from fleetprune.pruner.latency import fixed_part
from fleetprune.pruner.plan import Plan, build_plan
from fleetprune.pruner.variant import example_input
from fleetprune.tables import LayerConfig

log = logging.getLogger(__name__)

# Variants (besides the dense model) the correction was fitted on before issue 13 (now: half of them).
CALIBRATION_VARIANTS = 5
# Pull of each per-kind factor toward the line's slope, weighted by the kind's share of the networks:
# kinds that move together (adds with the convs of their stage) cannot then trade factors freely.
PER_KIND_RIDGE = 0.05
PER_KIND_MIN_PULL = 0.05
# Smallest share of the dense layer latency a random plan aims at (keep fraction 0.15).
MIN_LATENCY_SHARE = 0.0225
# Spread of the per-group keep fraction around the plan's global one (lognormal sigma).
GROUP_JITTER = 0.25


@dataclass
class ValidationDesign:
    """What one validate run will build and measure, known before anything is timed.

    Attributes:
        factory: builds the dense model.
        input_shape: ``(C, H, W)``.
        plan: the channel plan at ``(batch, *input_shape)``.
        widths: the width plans, the dense model first.
        calibration: how many random variants (after the dense one) the correction is fitted on.
    """

    factory: Callable[[], Any]
    input_shape: tuple[int, ...]
    plan: Plan
    widths: list[dict[str, int]]
    calibration: int

    def configs(self) -> list[LayerConfig]:
        """Every layer and op configuration the width plans need, deduplicated, in first-seen order."""
        seen: dict[LayerConfig, None] = {}
        for w in self.widths:
            for layer in [*self.plan.layers, *self.plan.ops]:
                seen.setdefault(self.plan.layer_config(layer, w), None)
        return list(seen)


@dataclass
class ValidationSummary:
    """Fidelity figures of one validate run.

    The top-level figures are "before" (``predicted_ms``) over every random variant; ``raw`` the
    same for the bare layer sum; ``held_out_before`` and ``after`` compare the prediction and the
    fitted correction on the held-out variants only.
    """

    device_key: str
    model: str
    run_id: str
    input_shape: tuple[int, ...]
    batch: int
    dtype: str
    memory_format: str
    n: int = 0
    within_5: float = float("nan")
    within_10: float = float("nan")
    median_abs_error: float = float("nan")
    bias: float = float("nan")
    spearman: float = float("nan")
    dense_measured_ms: float = float("nan")
    dense_layer_sum_ms: float = float("nan")
    fixed_ms: float = 0.0
    raw: dict[str, float] = field(default_factory=dict)
    correction: dict[str, Any] | None = None
    correction_stored: bool = False
    correction_note: str = ""
    held_out_before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    per_kind: dict[str, Any] | None = None
    per_kind_after: dict[str, float] | None = None
    priced_ops: bool = False
    path: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The summary without its rows, JSON-ready."""
        return {k: v for k, v in self.__dict__.items() if k != "rows"}


def fidelity(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Share within +-5% / +-10%, median absolute relative error, signed bias and Spearman rho.

    The relative error is ``(predicted - measured) / measured``; the bias is its median, so a
    positive bias means the prediction is too high. Spearman is NaN below 3 points or when either
    side is constant.
    """
    p = np.asarray(predicted, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    if len(p) == 0:
        nan = float("nan")
        return {"n": 0, "within_5": nan, "within_10": nan, "median_abs_error": nan, "bias": nan, "spearman": nan}
    rel = (p - m) / m
    ranked = len(p) > 2 and np.ptp(p) > 0 and np.ptp(m) > 0
    rho = float(stats.spearmanr(p, m).statistic) if ranked else float("nan")
    return {
        "n": int(len(p)),
        "within_5": float(np.mean(np.abs(rel) <= 0.05)),
        "within_10": float(np.mean(np.abs(rel) <= 0.10)),
        "median_abs_error": float(np.median(np.abs(rel))),
        "bias": float(np.median(rel)),
        "spearman": rho,
    }


def fit_correction(layer_sum: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Fit ``measured ~ a * layer_sum + b`` minimising the relative residuals.

    Weighted by ``1 / measured`` because every figure we report is a relative error; a plain
    least-squares fit would let the largest network decide the line.

    Raises:
        FleetpruneError: fewer than two networks, or all with the same layer sum.
    """
    x = np.asarray(layer_sum, dtype=np.float64)
    y = np.asarray(measured, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) <= 0:
        raise FleetpruneError(
            "a correction needs at least two networks of different predicted latency; "
            "raise --variants or pass --no-fit"
        )
    a, b = np.polyfit(x, y, 1, w=1.0 / y)
    return {"a": float(a), "b": float(b), "n": int(len(x))}


def fit_per_kind(kind_sums: Sequence[Mapping[str, float]], measured: Sequence[float], *, prior: float = 1.0,
                 ridge: float = PER_KIND_RIDGE) -> dict[str, Any]:
    """Fit ``measured ~ sum_k f_k * kind_sum_k + c`` with every ``f_k >= 0`` (``scipy.optimize.lsq_linear``).

    Relative residuals, as :func:`fit_correction`; a ridge of weight ``ridge`` pulls each factor toward
    ``prior`` (the line's slope) in proportion to the kind's median share of the networks (at least
    :data:`PER_KIND_MIN_PULL`), so kinds that always move together, or hardly weigh, keep sensible factors. ``c`` is free (it may be negative, as the line's).

    Returns:
        ``{"factors": {kind: f}, "b": c, "n": networks, "prior": prior, "ridge": ridge}``.

    Raises:
        FleetpruneError: fewer than two networks.
    """
    from scipy.optimize import lsq_linear

    y = np.asarray(measured, dtype=np.float64)
    if len(y) < 2:
        raise FleetpruneError("a per-kind correction needs at least two networks; raise --variants or pass --no-fit")
    kinds = sorted({k for ks in kind_sums for k, v in ks.items() if v > 0})
    x = np.array([[float(ks.get(k, 0.0)) for k in kinds] for ks in kind_sums], dtype=np.float64).reshape(len(y), -1)
    prior = float(prior) if prior and prior > 0 and math.isfinite(prior) else 1.0
    a = np.hstack([x, np.ones((len(y), 1))]) / y[:, None]
    # at least PER_KIND_MIN_PULL: a kind with a tiny share would otherwise take any factor the noise suggests
    share = np.maximum(np.median(x / y[:, None], axis=0), PER_KIND_MIN_PULL) if len(kinds) else np.zeros(0)
    pull = np.hstack([np.diag(np.sqrt(ridge) * share), np.zeros((len(kinds), 1))])
    lhs = np.vstack([a, pull])
    rhs = np.concatenate([np.ones(len(y)), np.sqrt(ridge) * share * prior])
    lower = np.concatenate([np.zeros(len(kinds)), [-np.inf]])
    fit = lsq_linear(lhs, rhs, bounds=(lower, np.full(len(kinds) + 1, np.inf)))
    return {"factors": {k: float(f) for k, f in zip(kinds, fit.x[:-1])}, "b": float(fit.x[-1]), "n": int(len(y)),
            "prior": prior, "ridge": float(ridge)}


def per_kind_predict(fit: Mapping[str, Any], kind_sums: Mapping[str, float]) -> float:
    """What a per-kind correction predicts for a network's ``kind_sums`` (a kind the fit never saw is
    scaled by its prior)."""
    factors, prior = fit["factors"], float(fit.get("prior", 1.0))
    return float(sum(float(factors.get(k, prior)) * v for k, v in kind_sums.items()) + float(fit["b"]))


def calibration_count(variants: int) -> int:
    """Random variants the corrections are fitted on: half of them (the per-kind fit has a factor per op
    kind to find); the other half is held out to report them."""
    return variants // 2


def draw_widths(plan: Plan, variants: int, seed: int = 0) -> list[dict[str, int]]:
    """The dense widths followed by ``variants`` random width plans spread over the latency range.

    Each plan aims at a share ``s`` of the dense layer latency and keeps ``sqrt(s)`` of every
    prunable group (a conv's cost goes with c_in * c_out), jittered per group so plans are not
    uniform shrinks. The shares are stratified separately over the calibration variants and over
    the held-out ones, so both sets span the whole range.
    """
    rng = np.random.default_rng(seed)
    n_cal = calibration_count(variants)
    shares: list[float] = []
    for count in (n_cal, variants - n_cal):
        edges = np.linspace(MIN_LATENCY_SHARE, 1.0, count + 1)
        strata = rng.uniform(edges[:-1], edges[1:])
        shares.extend(rng.permutation(strata).tolist())
    dense = plan.dense_widths()
    out = [dict(dense)]
    for share in shares:
        keep = math.sqrt(share)
        widths = dict(dense)
        for g in plan.groups:
            if not g.prunable:
                continue
            target = min(1.0, keep * float(rng.lognormal(0.0, GROUP_JITTER))) * g.width
            choices = np.asarray(g.choices)
            widths[g.name] = int(choices[np.argmin(np.abs(choices - target))])
        out.append(widths)
    return out


def design(
    model_name: str,
    *,
    variants: int,
    batch: int = 1,
    dtype: str = "fp32",
    memory_format: str = "nhwc",
    input_shape: Sequence[int],
    round_to: int | None = None,
    max_choices: int = 32,
    seed: int = 0,
    model_factory: Callable[[], Any],
) -> ValidationDesign:
    """The plan and width plans a validate run with these arguments measures (deterministic in ``seed``).

    Lets a caller (the fidelity benchmark) profile exactly the configurations a run will need.
    ``model_factory()`` builds the dense model and ``input_shape`` is one sample's (C, H, W).

    Raises:
        ModelError: an unsupported layer.
    """
    from fleetprune.pruner.setting import default_round_to

    if variants < 1:
        raise FleetpruneError(f"--variants must be at least 1, got {variants}")
    factory = model_factory
    shape = tuple(int(s) for s in input_shape)
    rt = round_to or default_round_to(dtype)
    x = example_input(shape, batch=batch, memory_format="nchw")
    plan = build_plan(factory(), x, round_to=rt, max_choices=max_choices, dtype=dtype, memory_format=memory_format)
    if not plan.prunable_groups():
        raise FleetpruneError(
            f"{model_name} has no prunable channel group at round_to={rt}; every variant would be the "
            "dense model. Try a smaller --round-to"
        )
    return ValidationDesign(factory, shape, plan, draw_widths(plan, variants, seed), calibration_count(variants))


def _kind_sums(row: Mapping[str, Any]) -> dict[str, float]:
    raw = row["kind_sums"]
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


def summarise(rows: list[dict[str, Any]], summary: ValidationSummary, *, fit: bool, variants: int) -> None:
    """Complete the rows (fixed part, prediction, correction) and ``summary`` from one run's measurements.

    ``rows`` are one run's rows, the dense model first, each with ``layer_sum_ms``, ``measured_ms``
    and ``calibration``. Sets the figures, and the correction (``summary.correction``) with whether
    it should be stored (``summary.correction_stored``): only a positive slope that does not raise the
    held-out median |error| is.
    """
    dense = rows[0]
    fixed = fixed_part(dense["measured_ms"], dense["layer_sum_ms"])
    for r in rows:
        r["fixed_ms"] = fixed
        r["predicted_ms"] = r["layer_sum_ms"] + fixed
        r["rel_error"] = (r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"]
        # NaN, not None, without a fit: a column of nulls would take the null type and clash with
        # the float64 of other runs in the validation dataset.
        r["corrected_ms"] = float("nan")
        r["corrected_rel_error"] = float("nan")
        r["per_kind_ms"] = float("nan")
        r["per_kind_rel_error"] = float("nan")
    varied = [r for r in rows if not r["dense"]]
    summary.rows = rows
    summary.dense_measured_ms, summary.dense_layer_sum_ms, summary.fixed_ms = dense["measured_ms"], dense[
        "layer_sum_ms"], fixed
    summary.raw = fidelity([r["layer_sum_ms"] for r in varied], [r["measured_ms"] for r in varied])
    for k, v in fidelity([r["predicted_ms"] for r in varied], [r["measured_ms"] for r in varied]).items():
        setattr(summary, k, v)
    calib = [r for r in rows if r["calibration"]]
    if fit and not calib:
        log.warning("%d variants are too few to fit a correction (need 2: one to fit, one to check)", variants)
    if not calib:
        return
    held = [r for r in varied if not r["calibration"]]
    corr = fit_correction([r["layer_sum_ms"] for r in calib], [r["measured_ms"] for r in calib])
    corr.update(model=summary.model, input_shape=list(summary.input_shape), batch=summary.batch, dtype=summary.dtype,
                memory_format=summary.memory_format, run_id=summary.run_id,
                fitted_at=datetime.now(timezone.utc).isoformat())
    for r in rows:
        r["corrected_ms"] = corr["a"] * r["layer_sum_ms"] + corr["b"]
        r["corrected_rel_error"] = (r["corrected_ms"] - r["measured_ms"]) / r["measured_ms"]
    summary.correction = corr
    summary.held_out_before = fidelity([r["predicted_ms"] for r in held], [r["measured_ms"] for r in held])
    summary.after = fidelity([r["corrected_ms"] for r in held], [r["measured_ms"] for r in held])
    err_before = summary.held_out_before["median_abs_error"]
    err_after = summary.after["median_abs_error"]
    if all(r.get("kind_sums") for r in rows):
        kinds = [_kind_sums(r) for r in calib]
        pk = fit_per_kind(kinds, [r["measured_ms"] for r in calib], prior=corr["a"])
        for r in rows:
            r["per_kind_ms"] = per_kind_predict(pk, _kind_sums(r))
            r["per_kind_rel_error"] = (r["per_kind_ms"] - r["measured_ms"]) / r["measured_ms"]
        summary.per_kind = pk
        summary.per_kind_after = fidelity([r["per_kind_ms"] for r in held], [r["measured_ms"] for r in held])
        err_kind = summary.per_kind_after["median_abs_error"]
        if not held or not err_kind > err_after:
            corr["per_kind"] = pk  # it rides in the stored correction: the pruner prefers it to the line
            err_after = min(err_after, err_kind)
    if corr["a"] <= 0:
        # A slope <= 0 would make the pruner's latency model fall as layers grow: never store it.
        summary.correction_note = f"not stored: the fitted slope a={corr['a']:.4g} is not positive"
        log.warning("%s: the fitted slope a=%.4g is not positive, so the correction is not stored; the end-to-end "
                    "measurements are too noisy to calibrate (rerun on a quiet machine)", summary.device_key, corr["a"])
    elif held and err_after > err_before:
        # The table (+ the dense model's fixed part) already predicts the held-out networks better
        # than the fit does: storing it would make the pruner's predictions worse.
        summary.correction_note = (f"not stored: it raises the held-out median |error| from {100 * err_before:.2f}% "
                                   f"to {100 * err_after:.2f}%")
        log.warning("%s: the correction is not stored: on the held-out networks it raises the median |error| from "
                    "%.2f%% to %.2f%%", summary.device_key, 100 * err_before, 100 * err_after)
    else:
        summary.correction_stored = True
        summary.correction_note = ("stored in the table (per op kind)" if "per_kind" in corr
                                   else "stored in the table")
