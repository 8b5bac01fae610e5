"""The ``validate`` verb: how well a device's table predicts end-to-end latency on this machine.

It draws random width plans across the latency range (plus the dense model), predicts each from the
table, builds and measures each one end to end with the profiler's protocol, and summarises the
error. A fitted correction ``measured ~ a * layer_sum + b`` (``b`` being the fixed part the layers
do not cover) is stored in the table's provenance so the pruner's latency model uses it.

What the figures compare (every one recomputes from the rows written to ``validation.parquet``):

* ``predicted_ms = layer_sum_ms + fixed_ms``, with ``fixed_ms`` the dense model's measured latency
  minus its layer sum (clamped at 0): what the pruner predicts on a machine where it can measure the
  dense model. The "before" figures cover every random variant (the dense row is exact by
  construction and left out).
* ``corrected_ms = a * layer_sum_ms + b``, fitted on the dense model and the first
  :func:`calibration_count` variants (``calibration`` rows) and reported on the rest (held out).
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats

from fleetprune import models
from fleetprune.api._common import resolve_setting, table_protocol
from fleetprune.errors import DeviceError, FleetpruneError, MissingConfigsError
from fleetprune.profiler import DeviceInfo, TimingProtocol, local_devices, measure_model
from fleetprune.pruner.export import shrink_to_widths
from fleetprune.pruner.latency import LatencyModel, fixed_part
from fleetprune.pruner.plan import Plan, build_plan
from fleetprune.pruner.variant import example_input
from fleetprune.tables import LatencyTable, LayerConfig, TableStore
from fleetprune.tables.table import missing_message

log = logging.getLogger(__name__)

# Variants (besides the dense model) used to fit the correction; the rest are held out.
CALIBRATION_VARIANTS = 5
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
        """Every layer configuration the width plans need, deduplicated, in first-seen order."""
        seen: dict[LayerConfig, None] = {}
        for w in self.widths:
            for layer in self.plan.layers:
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
    n: int
    within_5: float
    within_10: float
    median_abs_error: float
    bias: float
    spearman: float
    dense_measured_ms: float
    dense_layer_sum_ms: float
    fixed_ms: float
    raw: dict[str, float] = field(default_factory=dict)
    correction: dict[str, Any] | None = None
    correction_stored: bool = False
    correction_note: str = ""
    held_out_before: dict[str, float] | None = None
    after: dict[str, float] | None = None
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


def calibration_count(variants: int) -> int:
    """Random variants the correction is fitted on: up to :data:`CALIBRATION_VARIANTS`, at most half."""
    return min(CALIBRATION_VARIANTS, variants // 2)


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
    input_shape: Sequence[int] | None = None,
    round_to: int | None = None,
    max_choices: int = 32,
    seed: int = 0,
    model_factory: Callable[[], Any] | None = None,
) -> ValidationDesign:
    """The plan and width plans a validate run with these arguments measures (deterministic in ``seed``).

    Lets a caller (the fidelity benchmark) profile exactly the configurations a run will need.

    Raises:
        ModelError: an unknown model name (without ``model_factory``) or an unsupported layer.
    """
    if variants < 1:
        raise FleetpruneError(f"--variants must be at least 1, got {variants}")
    factory = model_factory or (lambda: models.create(model_name))
    shape = tuple(int(s) for s in (input_shape or models.input_shape(model_name)))
    rt = round_to or (16 if dtype == "fp32" else 8)
    x = example_input(shape, batch=batch, memory_format="nchw")
    plan = build_plan(factory(), x, round_to=rt, max_choices=max_choices, dtype=dtype, memory_format=memory_format)
    if not plan.prunable_groups():
        raise FleetpruneError(
            f"{model_name} has no prunable channel group at round_to={rt}; every variant would be the "
            "dense model. Try a smaller --round-to"
        )
    return ValidationDesign(factory, shape, plan, draw_widths(plan, variants, seed), calibration_count(variants))


def local_device(table: LatencyTable, threads: int | None = None) -> DeviceInfo:
    """This machine's device that the table was measured on.

    ``threads=None`` takes the table's own thread count, so a CPU key (``...-t2``) matches.

    Raises:
        DeviceError: the table is of another device (or thread count), or was made up by a fake backend.
    """
    prov = table.provenance
    if (prov.get("fingerprint") or {}).get("fake") or prov.get("timing_method") == "fake":
        raise DeviceError(
            f"the table of {table.device_key} was made by a fake timing backend; validate needs real "
            "measurements: profile this machine with `fleetprune profile`"
        )
    if threads is None and prov.get("threads"):
        threads = int(prov["threads"])
    devices = local_devices(threads)
    for dev in devices:
        if dev.key == table.device_key:
            return dev
    raise DeviceError(
        f"validate measures on this machine, but the table's device {table.device_key!r} is not one of its "
        f"devices ({', '.join(d.key for d in devices)}); run validate on a machine of that device type, "
        "or pass --threads to match the thread count the table was measured with"
    )


def _measured(m: Any, protocol: TimingProtocol) -> dict[str, Any]:
    """A validation row's measured columns from one end-to-end measurement."""
    return {
        "measured_ms": protocol.latency(m),
        "statistic": protocol.statistic,
        "measured_min_ms": float(m.min_ms),
        "measured_median_ms": float(m.median_ms),
        "measured_p10_ms": float(m.p10_ms),
        "measured_p90_ms": float(m.p90_ms),
    }


def _missing(
    table: LatencyTable, configs: list[LayerConfig], model_name: str, root: str, input_shape: tuple[int, ...] | None
) -> MissingConfigsError:
    """The miss error, its profile commands naming the model (and the input size when not the default).

    ``input_shape=None`` for models outside the registry.
    """
    msg = missing_message(table.device_key, configs, root)
    msg = msg.replace("fleetprune profile MODEL", f"fleetprune profile {shlex.quote(model_name)}")
    msg = msg.replace(" (MODEL = the model you are pruning)", "")
    if input_shape is not None and tuple(models.input_shape(model_name)) != tuple(input_shape):
        size = f"{input_shape[1]}x{input_shape[2]}" if len(input_shape) == 3 else "x".join(map(str, input_shape[1:]))
        msg = "\n".join(
            f"{line} --input-size {size}" if line.lstrip().startswith("fleetprune profile") else line
            for line in msg.splitlines()
        )
    return MissingConfigsError(msg, [c.key for c in configs])


def validate(
    model_name: str,
    tables: str,
    device: str,
    *,
    variants: int = 20,
    batch: int | None = None,
    dtype: str | None = None,
    memory_format: str | None = None,
    input_shape: Sequence[int] | None = None,
    round_to: int | None = None,
    max_choices: int = 32,
    seed: int = 0,
    threads: int | None = None,
    protocol: TimingProtocol | None = None,
    fit: bool = True,
    model_factory: Callable[[], Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    passes: int = 2,
) -> ValidationSummary:
    """Predict and measure ``variants`` random width plans plus the dense model on this machine.

    Writes one row per network to ``TABLES/validation.parquet`` (with the table's provenance) and,
    with ``fit``, stores the fitted correction in the device's table (``LatencyTable.correction``)
    unless its slope is not positive (noise, not a calibration) or it predicts the held-out
    networks worse than the table does.

    Args:
        model_name: a name from :func:`fleetprune.models.names` (or any label with ``model_factory``).
        tables: the table root; ``validation.parquet`` is written beside the device tables.
        device: the device key of the table; it must be this machine's CPU or one of its GPUs.
        variants: random width plans besides the dense model.
        batch, dtype, memory_format: the setting to validate; None takes the table's only one.
        input_shape: ``(C, H, W)`` instead of the model's default (e.g. ``(3, 64, 64)``).
        threads: CPU threads; None takes the table's thread count.
        protocol: the timing protocol; None takes the table's (as it was profiled).
        fit: fit ``measured ~ a * layer_sum + b`` on the dense model and the first
            :func:`calibration_count` variants, store it and report the held-out error.
        model_factory: builds a model that is not in the registry (tests, notebooks).
        progress: called with (measurements done, total) after each one.
        passes: measure every network this many times, in passes over all of them, and keep each
            network's fastest (the protocol's statistic): a network measured during a minute when
            the machine was slow is measured again minutes later (whole networks drift 10-30% within
            a minute on a shared VM; BENCHMARKS.md).

    Raises:
        TableError: no table of ``device`` (or no unique setting in it).
        DeviceError: the table is not of this machine.
        MissingConfigsError: the table lacks configurations the plans need (before anything is
            measured; the message names them and the profile command).
    """
    if passes < 1:
        raise FleetpruneError(f"passes must be at least 1, got {passes}")
    store = TableStore(tables)
    table = store.read(device)
    dev = local_device(table, threads)
    batch, dtype, memory_format = resolve_setting(table, model_name, tables, batch, dtype, memory_format)
    d = design(
        model_name, variants=variants, batch=batch, dtype=dtype, memory_format=memory_format,
        input_shape=input_shape, round_to=round_to, max_choices=max_choices, seed=seed,
        model_factory=model_factory,
    )
    missing = table.missing(d.configs())
    if missing:
        raise _missing(table, missing, model_name, tables, None if model_factory else d.input_shape)
    if protocol is None:
        protocol = table_protocol(table)
    lm = LatencyModel(d.plan, table)
    x = example_input(d.input_shape, batch=batch, memory_format="nchw")
    full_shape = (batch, *d.input_shape)
    shape_label = "x".join(str(s) for s in d.input_shape)
    run_id = uuid.uuid4().hex[:12]
    log.info("validate %s on %s: %d networks, %s, batch %d %s %s, run %s", model_name, device, len(d.widths),
             shape_label, batch, dtype, memory_format, run_id)

    total = len(d.widths) * passes
    if progress:
        progress(0, total)  # every check passed: measuring starts
    n = len(d.widths)
    best: list[Any] = [None] * n
    for p in range(passes):
        for i, widths in enumerate(d.widths):
            # built again in every pass rather than held: N copies of a large model need not fit in memory
            net = d.factory().eval()
            if i > 0:
                net = shrink_to_widths(net, d.plan, widths, x)
            m = measure_model(net, full_shape, dev, dtype, memory_format, protocol)
            del net
            if best[i] is None or protocol.latency(m) < protocol.latency(best[i]):
                if best[i] is not None:
                    log.info("%s variant %d: pass %d measured %.4g ms, below %.4g ms before; keeping it", model_name,
                             i, p + 1, protocol.latency(m), protocol.latency(best[i]))
                best[i] = m
            if progress:
                progress(p * n + i + 1, total)
    rows: list[dict[str, Any]] = []
    for i, widths in enumerate(d.widths):
        rows.append({
            "run_id": run_id,
            "device_key": device,
            "model": model_name,
            "input_shape": shape_label,
            "variant": i,
            "dense": i == 0,
            "calibration": bool(fit and d.calibration > 0 and i <= d.calibration),
            "layer_sum_ms": lm.layer_sum(widths),
            **_measured(best[i], protocol),
            "widths": json.dumps({k: int(v) for k, v in widths.items()}, sort_keys=True),
            "batch": int(batch),
            "dtype": dtype,
            "memory_format": memory_format,
            "measured_at": datetime.now(timezone.utc),
        })
        log.info("%s variant %d: layer sum %.4g ms, measured %.4g ms (%s, best of %d passes)", model_name, i,
                 rows[-1]["layer_sum_ms"], rows[-1]["measured_ms"], protocol.statistic, passes)

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

    varied = [r for r in rows if not r["dense"]]
    before = fidelity([r["predicted_ms"] for r in varied], [r["measured_ms"] for r in varied])
    summary = ValidationSummary(
        device_key=device, model=model_name, run_id=run_id, input_shape=d.input_shape, batch=batch,
        dtype=dtype, memory_format=memory_format, dense_measured_ms=dense["measured_ms"],
        dense_layer_sum_ms=dense["layer_sum_ms"], fixed_ms=fixed, rows=rows,
        raw=fidelity([r["layer_sum_ms"] for r in varied], [r["measured_ms"] for r in varied]), **before,
    )

    calib = [r for r in rows if r["calibration"]]
    if fit and not calib:
        log.warning("%d variants are too few to fit a correction (need 2: one to fit, one to check)", variants)
    if calib:
        held = [r for r in varied if not r["calibration"]]
        corr = fit_correction([r["layer_sum_ms"] for r in calib], [r["measured_ms"] for r in calib])
        corr.update(
            model=model_name, input_shape=list(d.input_shape), batch=batch, dtype=dtype,
            memory_format=memory_format, run_id=run_id, fitted_at=datetime.now(timezone.utc).isoformat(),
        )
        for r in rows:
            r["corrected_ms"] = corr["a"] * r["layer_sum_ms"] + corr["b"]
            r["corrected_rel_error"] = (r["corrected_ms"] - r["measured_ms"]) / r["measured_ms"]
        summary.correction = corr
        summary.held_out_before = fidelity([r["predicted_ms"] for r in held], [r["measured_ms"] for r in held])
        summary.after = fidelity([r["corrected_ms"] for r in held], [r["measured_ms"] for r in held])
        err_before = summary.held_out_before["median_abs_error"]
        err_after = summary.after["median_abs_error"]
        if corr["a"] <= 0:
            # A slope <= 0 would make the pruner's latency model fall as layers grow: never store it.
            summary.correction_note = f"not stored: the fitted slope a={corr['a']:.4g} is not positive"
            log.warning("%s: the fitted slope a=%.4g is not positive, so the correction is not stored; the "
                        "end-to-end measurements are too noisy to calibrate (rerun on a quiet machine)",
                        device, corr["a"])
        elif held and err_after > err_before:
            # The table (+ the dense model's fixed part) already predicts the held-out networks
            # better than the fit does: storing it would make the pruner's predictions worse.
            summary.correction_note = (f"not stored: it raises the held-out median |error| from "
                                       f"{100 * err_before:.2f}% to {100 * err_after:.2f}%")
            log.warning("%s: the correction is not stored: on the held-out networks it raises the median "
                        "|error| from %.2f%% to %.2f%%", device, 100 * err_before, 100 * err_after)
        else:
            store.set_correction(device, corr, provenance=table.provenance)
            summary.correction_stored = True
            summary.correction_note = "stored in the table"
            log.info("%s: stored correction measured = %.4g * layer_sum + %.4g ms", device, corr["a"], corr["b"])
    summary.path = store.append_validation(rows, provenance=table.provenance)
    return summary
