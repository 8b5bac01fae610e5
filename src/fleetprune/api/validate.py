"""The ``validate`` verb: how well a device's table predicts end-to-end latency on this machine.

It draws random width plans across the latency range (plus the dense model), predicts each from the
table, builds and measures each one end to end with the profiler's protocol, and summarises the
error. A fitted correction ``measured ~ a * layer_sum + b`` (``b`` being the fixed part the layers
do not cover) is stored in the table's provenance so the pruner's latency model uses it.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import stats

from fleetprune import models
from fleetprune.errors import DeviceError, FleetpruneError
from fleetprune.profiler import TimingProtocol, local_devices, measure_model
from fleetprune.pruner.export import shrink_to_widths
from fleetprune.pruner.latency import LatencyModel
from fleetprune.pruner.plan import build_plan
from fleetprune.pruner.variant import example_input
from fleetprune.tables import TableStore

log = logging.getLogger(__name__)

# Variants used to fit the correction; the rest are held out to report "after" honestly.
CALIBRATION_VARIANTS = 5


@dataclass
class ValidationSummary:
    """Fidelity figures of one validate run (the ``before`` ones use no fitted correction)."""

    device_key: str
    model: str
    n: int
    within_5: float
    within_10: float
    median_abs_error: float
    bias: float
    spearman: float
    correction: dict[str, float] | None = None
    after: dict[str, float] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "rows"}
        return d


def fidelity(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Share within +-5% / +-10%, median absolute relative error, signed bias and Spearman rho.

    The relative error is ``(predicted - measured) / measured``; the bias is its median, so a
    positive bias means the table over-predicts.
    """
    p = np.asarray(predicted, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    rel = (p - m) / m
    rho = float(stats.spearmanr(p, m).statistic) if len(p) > 2 and np.ptp(p) > 0 else float("nan")
    return {
        "n": int(len(p)),
        "within_5": float(np.mean(np.abs(rel) <= 0.05)),
        "within_10": float(np.mean(np.abs(rel) <= 0.10)),
        "median_abs_error": float(np.median(np.abs(rel))),
        "bias": float(np.median(rel)),
        "spearman": rho,
    }


def fit_correction(layer_sum: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Least-squares ``measured ~ a * layer_sum + b`` (needs two distinct layer sums)."""
    x = np.asarray(layer_sum, dtype=np.float64)
    y = np.asarray(measured, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) <= 0:
        raise FleetpruneError("a correction needs at least two networks of different predicted latency")
    a, b = np.polyfit(x, y, 1)
    return {"a": float(a), "b": float(b), "n": int(len(x))}


def random_widths(plan: Any, rng: np.random.Generator) -> dict[str, int]:
    """One random width plan: a global keep fraction in [0.15, 1] jittered per group.

    A single fraction per plan spreads the plans across the whole latency range; the per-group
    jitter keeps them from all being uniform shrinks.
    """
    keep = rng.uniform(0.15, 1.0)
    widths = {}
    for g in plan.groups:
        if not g.prunable:
            continue
        target = min(1.0, keep * float(rng.lognormal(0.0, 0.3))) * g.width
        choices = np.asarray(g.choices)
        widths[g.name] = int(choices[np.argmin(np.abs(choices - target))])
    return {**plan.dense_widths(), **widths}


def _local_device(device_key: str, threads: int | None) -> Any:
    devices = local_devices(threads)
    for dev in devices:
        if dev.key == device_key:
            return dev
    raise DeviceError(
        f"validate measures on this machine, but table device {device_key!r} is not one of its devices "
        f"({', '.join(d.key for d in devices)}); run validate on a machine of that device, or pass "
        f"--threads to match the thread count the table was measured with"
    )


def validate(
    model_name: str,
    tables: str,
    device: str,
    *,
    variants: int = 20,
    batch: int = 1,
    dtype: str = "fp32",
    memory_format: str = "nhwc",
    round_to: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    protocol: TimingProtocol | None = None,
    fit: bool = True,
    model_factory: Callable[[], Any] | None = None,
    input_shape: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ValidationSummary:
    """Predict and measure ``variants`` random width plans plus the dense model on this machine.

    Args:
        model_name: a name from :func:`fleetprune.models.names` (or any label with ``model_factory``).
        tables: the table root; ``validation.parquet`` is written beside the device tables.
        device: the device key of the table; it must be this machine's CPU or one of its GPUs.
        variants: random width plans besides the dense model.
        fit: fit ``measured ~ a * layer_sum + b`` on the dense model and the first
            :data:`CALIBRATION_VARIANTS` plans, store it in the table and report the held-out error.
        model_factory, input_shape: build a model that is not in the registry (tests, notebooks).

    Raises:
        DeviceError: the device is not this machine. TableError / MissingConfigsError: the table
        cannot give the plans' configurations (the message names the profile command).
    """
    if variants < 1:
        raise FleetpruneError("--variants must be at least 1")
    store = TableStore(tables)
    table = store.read(device)
    dev = _local_device(device, threads)
    factory = model_factory or (lambda: models.create(model_name))
    shape = tuple(input_shape or models.input_shape(model_name))
    full_shape = (batch, *shape)
    round_to = round_to or (16 if dtype == "fp32" else 8)
    x = example_input(shape, batch=batch, memory_format="nchw")
    plan = build_plan(factory(), x, round_to=round_to, dtype=dtype, memory_format=memory_format)
    lm = LatencyModel(plan, table)
    protocol = protocol or TimingProtocol()

    rng = np.random.default_rng(seed)
    plans = [plan.dense_widths()] + [random_widths(plan, rng) for _ in range(variants)]
    lm.layer_costs()  # raises MissingConfigsError for the dense plan before anything is measured
    for w in plans:
        lm.layer_sum(w)

    run_id = uuid.uuid4().hex[:12]
    rows: list[dict[str, Any]] = []
    for i, widths in enumerate(plans):
        net = factory()
        if i > 0:
            net = shrink_to_widths(net, plan, widths, x)
        m = measure_model(net, full_shape, dev, dtype, memory_format, protocol)
        rows.append(
            {
                "run_id": run_id,
                "device_key": device,
                "model": model_name,
                "variant": i,
                "dense": i == 0,
                "layer_sum_ms": lm.layer_sum(widths),
                "measured_ms": m.median_ms,
                "measured_p10_ms": m.p10_ms,
                "measured_p90_ms": m.p90_ms,
                "widths": json.dumps({k: int(v) for k, v in widths.items()}, sort_keys=True),
                "batch": batch,
                "dtype": dtype,
                "memory_format": memory_format,
                "measured_at": datetime.now(timezone.utc),
            }
        )
        if progress:
            progress(i + 1, len(plans))

    # "before": the pruner's default model, fixed part from the dense end-to-end measurement.
    fixed = max(0.0, rows[0]["measured_ms"] - rows[0]["layer_sum_ms"])
    for r in rows:
        r["predicted_ms"] = r["layer_sum_ms"] + fixed
        r["rel_error"] = (r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"]
        r["corrected_ms"] = float("nan")  # filled below when a correction is fitted; keeps one schema
    variant_rows = rows[1:]
    before = fidelity([r["predicted_ms"] for r in variant_rows], [r["measured_ms"] for r in variant_rows])
    summary = ValidationSummary(device_key=device, model=model_name, rows=rows, **before)

    if fit and len(rows) >= 3:
        calib = rows[: 1 + CALIBRATION_VARIANTS]
        held = rows[1 + CALIBRATION_VARIANTS :] or variant_rows
        corr = fit_correction([r["layer_sum_ms"] for r in calib], [r["measured_ms"] for r in calib])
        corr.update(model=model_name, run_id=run_id, batch=batch, dtype=dtype, memory_format=memory_format)
        for r in rows:
            r["corrected_ms"] = corr["a"] * r["layer_sum_ms"] + corr["b"]
        summary.correction = corr
        summary.after = fidelity([r["corrected_ms"] for r in held], [r["measured_ms"] for r in held])
        summary.after["held_out"] = int(len(held))
        held_before = fidelity([r["predicted_ms"] for r in held], [r["measured_ms"] for r in held])
        summary.after["before_on_held_out_median_abs_error"] = held_before["median_abs_error"]
        store.set_correction(device, corr, provenance=table.provenance)
    store.append_validation(rows, provenance=table.provenance)
    return summary
