"""The ``prune`` verb: one pruned variant of one model per device, each from that device's table.

For every requested device: read its table, check it holds the asked batch, dtype and memory format,
build the model and its plan, check the table has every configuration the plan can reach, settle
the fixed part of the latency model, run the K-step progressive prune, remove the masked channels
physically, measure the variant end to end when the device is this machine, and write the variant
folder. Everything that can be checked without pruning is checked for every device first, so a bad
table or budget fails in seconds and before anything is written.

End-to-end measurements run the network as deployed and as the table prices its layers: eval
mode with every batch norm folded into its conv (``measure_model(fold_bn=True)``); ``model.ts`` is
the same folded network (``export.fold_batchnorm``).

What the per-layer rows do not cover (pooling, residual adds, framework overhead, which are fixed
or grow with the widths, and in-network effects such as weights streamed from memory that a layer
timed alone keeps in cache) is modelled, in this order, by:

1. when ``fleetprune validate`` stored a correction ``measured ~ a * layer_sum + b`` for this model,
   input, batch, dtype and memory format (fitted over many networks): every row is scaled by ``a``
   and ``fixed = b``;
2. else, on this machine with ``latency_fit='two-point'`` (the default): the line through the dense
   and the narrowest network measured end to end (folded), rows scaled by ``a`` and ``fixed = b``;
   the dense latency is then the measured one, and so is the smallest reachable;
3. else, on this machine (``latency_fit='offset'``, or two points that give no sane line): ``fixed =
   dense measured - layer sum`` (clamped at 0);
4. otherwise 0: the table rows only, as HALP counts latency. Relative budgets stay meaningful (a
   fraction of the modeled dense latency); the report says which source was used.

On this machine the dense model and the variant are measured in any case, with the table's own
timing protocol unless one is given.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fleetprune import models
from fleetprune.api._common import resolve_setting, sample_shape, table_protocol
from fleetprune.errors import BudgetError, DeviceError, FleetpruneError, MissingConfigsError, TableError
from fleetprune.pruner.export import fold_batchnorm, module_widths, remove_channels, shrink_to_widths
from fleetprune.pruner.latency import LatencyModel
from fleetprune.pruner.plan import Plan, build_plan
from fleetprune.pruner.progressive import METHODS, FinetuneHook, progressive_prune
from fleetprune.pruner.schedule import parse_budget
from fleetprune.pruner.solve import SOLVERS
from fleetprune.pruner.variant import (
    SUMMARY_FILE,
    WEIGHTS_FILE,
    example_input,
    read_widths,
    write_json_atomic,
    write_variant,
)
from fleetprune.tables import LatencyTable, TableStore
from fleetprune.tables.table import missing_message

log = logging.getLogger(__name__)

__all__ = ["DeviceResult", "prune", "load_variant", "FIXED_MEASURED", "FIXED_TWO_POINT", "FIXED_CORRECTION",
           "FIXED_TABLE_ONLY", "LATENCY_FITS"]

FIXED_MEASURED = "end-to-end measurement of the dense model on this machine"
FIXED_TWO_POINT = "end-to-end measurements of the dense and the narrowest network on this machine"
FIXED_CORRECTION = "fitted correction from fleetprune validate"
FIXED_TABLE_ONLY = "table rows only"


@dataclass
class DeviceResult:
    """What one device's prune produced (latencies in ms; ``model`` is the pruned network, eval mode)."""

    device_key: str
    folder: Path
    dense_ms: float
    budget_ms: float
    predicted_ms: float
    measured_ms: float | None
    dense_measured_ms: float | None
    fixed_ms: float
    fixed_source: str
    widths: dict[str, int]
    report: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)


@dataclass
class _Setting:
    batch: int
    dtype: str
    memory_format: str


@dataclass
class _Job:
    device_key: str
    table: LatencyTable
    setting: _Setting
    local: Any  # DeviceInfo of this machine, or None
    lm: Any = None  # the LatencyModel with its fixed part settled
    dense_measured_ms: float | None = None
    narrow_measured_ms: float | None = None
    narrow_layer_sum_ms: float | None = None
    latency_fit: str | None = None  # how the measurements here became the latency model (None: not local)
    correction: tuple[float, float] | None = None


class _ScaledTable:
    """A table whose every lookup is multiplied by ``a`` (a validate correction's slope)."""

    def __init__(self, table: LatencyTable, a: float):
        self.table, self.a = table, float(a)
        self.device_key = table.device_key

    def lookup(self, config: Any) -> float:
        return self.a * self.table.lookup(config)

    def lookup_many(self, configs: Any) -> np.ndarray:
        return self.a * self.table.lookup_many(configs)


# ----------------------------------------------------------------------------------------- checks


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FleetpruneError(f"--out {out} is a file; give a folder for the variants")
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()) and not overwrite:
        raise FleetpruneError(
            f"--out {out} exists and is not empty; pass --overwrite to replace the variants of the "
            "devices pruned now (others are kept), or choose another folder"
        )


def _devices(store: TableStore, devices: str | Sequence[str]) -> list[str]:
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    devices = list(dict.fromkeys(devices))
    if not devices:
        raise DeviceError("no device given; pass --device KEY[,KEY...] or --device all")
    if devices == ["all"]:
        found = [d.device_key for d in store.devices() if d.rows > 0]
        if not found:
            raise TableError(
                f"no device tables under {store.root}; measure one first: "
                f"fleetprune profile MODEL --tables {store.root}"
            )
        return found
    if "all" in devices:
        raise DeviceError("--device all cannot be combined with device keys")
    return devices


def _local_device(table: LatencyTable) -> Any:
    """This machine's DeviceInfo if the table was measured on it, else None."""
    from fleetprune.profiler import local_devices

    if (table.provenance.get("fingerprint") or {}).get("fake"):
        return None
    threads = table.provenance.get("threads")
    try:
        candidates = local_devices(int(threads) if threads else None)
    except (TypeError, ValueError, DeviceError):
        candidates = local_devices()
    for dev in candidates:
        if dev.key == table.device_key:
            return dev
    return None


def _correction(table: LatencyTable, model_name: str, setting: _Setting,
                shape: tuple[int, ...]) -> tuple[float, float] | None:
    """The table's validate correction, if it was fitted for this model, input and setting."""
    corr = table.correction
    raw = table.provenance.get("correction")
    if corr is None or corr[0] <= 0:
        return None
    if isinstance(raw, Mapping):
        wanted = {"model": model_name, "batch": setting.batch, "dtype": setting.dtype,
                  "memory_format": setting.memory_format, "input_shape": list(shape)}
        for key, want in wanted.items():
            have = raw.get(key)
            if have is not None and (list(have) if isinstance(have, (list, tuple)) else have) != want:
                return None
    return corr


def _missing_error(table: LatencyTable, missing: list[Any], model_name: str, root: str,
                   round_to: int | None) -> MissingConfigsError:
    msg = missing_message(table.device_key, missing, root)
    msg = msg.replace("measure them with (MODEL = the model you are pruning):", "measure them with:")
    lines = []
    for line in msg.splitlines():
        if line.lstrip().startswith("fleetprune profile MODEL"):
            line = line.replace("fleetprune profile MODEL", f"fleetprune profile {model_name}")
            if round_to is not None:
                line += f" --round-to {round_to}"
        lines.append(line)
    return MissingConfigsError("\n".join(lines), [c.key for c in missing])


# ------------------------------------------------------------------------------------------- verb


def importance_options(method: str, importance_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The channel importance ``method`` uses with ``importance_kwargs``, as ``{"name": ..., option: value}``
    (defaults filled in: what report.json records). ``uniform`` ranks channels with SP-LAMP."""
    from fleetprune.pruner.scores import make_importance

    name = "sp_lamp" if method == "uniform" else method
    try:
        imp = make_importance(name, **dict(importance_kwargs or {}))
    except (TypeError, ValueError) as exc:
        raise FleetpruneError(f"bad options {dict(importance_kwargs or {})} for method {method!r} ({exc}); "
                              "coupled_reduce, fold_bn and include_consumers are SP-LAMP (and uniform) options")
    return {"name": name, **{k: v for k, v in vars(imp).items() if not k.startswith("_")}}


def prune(
    model_name: str,
    *,
    tables: str,
    devices: str | Sequence[str],
    budget: str | float,
    out: str | os.PathLike,
    steps: int = 30,
    weights: str | None = None,
    num_classes: int | None = None,
    input_size: Sequence[int] | int | None = None,
    method: str = "sp_lamp",
    solver: str = "dp",
    batch: int | None = None,
    dtype: str | None = None,
    memory_format: str | None = None,
    round_to: int | None = None,
    max_choices: int = 32,
    overwrite: bool = False,
    finetune: Callable[[str], FinetuneHook | None] | None = None,
    measure: bool = True,
    latency_fit: str = "two-point",
    protocol: Any = None,
    importance_kwargs: Mapping[str, Any] | None = None,
    on_device_done: Callable[[DeviceResult], None] | None = None,
    model_factory: Callable[[], nn.Module] | None = None,
    input_shape: Sequence[int] | None = None,
) -> list[DeviceResult]:
    """Prune ``model_name`` for every device in ``devices`` and write one variant folder per device.

    Args:
        model_name: a name from :func:`fleetprune.models.names`.
        tables: the table root.
        devices: device keys (a list or ``"a,b"``), or ``"all"`` for every device of the root.
        budget: ``0.5`` / ``50%`` (of the dense latency), ``12ms``, ``800us`` or ``2x``.
        out: the variants folder; ``out/<device_key>/`` per device plus ``out/summary.json``.
        steps: K, the progressive steps.
        weights: a local checkpoint of the dense model (never downloaded).
        num_classes: classifier outputs, if not the model's default.
        input_size: spatial input size (``64`` or ``(64, 64)``) instead of the model's default.
        method: ``sp_lamp`` (default), ``l1``, ``random`` or ``uniform``.
        solver: ``dp`` or ``exact``.
        batch, dtype, memory_format: the setting to prune for; None takes the table's only one.
        round_to: channel unit alignment (default 16 for fp32, 8 for fp16/bf16).
        max_choices: most width choices per group (see ``build_plan``).
        overwrite: replace the variants of these devices in a non-empty ``out``.
        finetune: ``finetune(device_key) -> hook or None``, called once per device for a fresh
            fine-tune hook ``hook(model, step)`` (a hook keeps optimizer and schedule state, so
            devices must not share one). None: no fine-tuning between steps.
        measure: measure the dense model and the variant end to end when the device is this machine.
        latency_fit: on this machine without a validate correction: ``two-point`` (default) fits
            ``a * layer_sum + b`` through the dense and the narrowest network measured end to end;
            ``offset`` adds the dense measurement's excess over the layer sum as a constant.
        protocol: the profiler's ``TimingProtocol`` for those measurements (None: the table's).
        importance_kwargs: options of the channel importance (``fold_bn``, ``coupled_reduce``, ...).
        on_device_done: called with each device's result as soon as its variant is written.
        model_factory, input_shape: prune a network that is not in the model registry (Python
            users, tests): ``model_factory()`` builds it and ``input_shape`` is one sample's (C, H, W);
            ``model_name`` is then only a label, and :func:`load_variant` needs the same factory.

    Returns:
        One result per device, in order.

    Raises:
        FleetpruneError: (and subclasses) a bad budget, device, table, model or --out; the message
            says what to do. Variants already written stay whole.
    """
    if method not in METHODS:
        raise FleetpruneError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if solver not in SOLVERS:
        raise FleetpruneError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    importance_options(method, importance_kwargs)  # bad options fail here, before any work
    if steps < 1:
        raise BudgetError(f"--steps must be at least 1, got {steps}")
    if (round_to is not None and round_to < 1) or max_choices < 1:
        raise FleetpruneError(f"--round-to and --max-choices must be at least 1, got {round_to} and {max_choices}")
    if latency_fit not in LATENCY_FITS:
        raise FleetpruneError(f"--latency-fit must be one of {', '.join(LATENCY_FITS)}, got {latency_fit!r}")
    out = Path(out)
    _check_out(out, overwrite)
    store = TableStore(tables)
    if not store.exists():
        raise TableError(f"no table root at {tables}; measure first: fleetprune profile {model_name} --tables {tables}")
    model_kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    if model_factory is not None:
        if input_shape is None:
            raise FleetpruneError("a model_factory needs input_shape=(C, H, W)")
        shape = tuple(int(s) for s in input_shape)
        dense = model_factory()
        if weights is not None:
            models.load_weights(dense, weights, name=model_name)
    else:
        shape = tuple(int(s) for s in input_shape) if input_shape else sample_shape(model_name, input_size)
        dense = models.create(model_name, weights=weights, **model_kwargs)  # unknown name / bad weights fail here

    # Everything checkable before pruning, for every device.
    jobs: list[_Job] = []
    plans: dict[tuple[int, str, str], Plan] = {}
    for key in _devices(store, devices):
        table = store.read(key)
        setting = _Setting(*resolve_setting(table, model_name, tables, batch, dtype, memory_format))
        jobs.append(_Job(key, table, setting, _local_device(table) if measure else None))
        skey = (setting.batch, setting.dtype, setting.memory_format)
        if skey not in plans:
            x = example_input(shape, setting.batch, "nchw")
            rt = round_to or (16 if setting.dtype == "fp32" else 8)
            plans[skey] = build_plan(dense, x, round_to=rt, max_choices=max_choices, dtype=setting.dtype,
                                     memory_format=setting.memory_format)
        plan = plans[skey]
        if not plan.prunable_groups():
            raise FleetpruneError(
                f"{model_name} has no prunable channel group at round_to={plan.round_to} "
                f"(every group is a single unit or fixed); try a smaller --round-to"
            )
        missing = table.missing(plan.configs())
        if missing:
            raise _missing_error(table, missing, model_name, tables, round_to)
        job = jobs[-1]
        _settle_latency(job, plan, model_name, dense, shape, protocol, latency_fit)
        # The budget is checked now for every device, before any pruning or writing.
        minimum, dense_ms = job.lm.min_latency(), job.lm.dense_ms()
        if parse_budget(budget, dense_ms) < minimum * (1 - 1e-9):
            raise BudgetError(
                f"budget {budget} is {parse_budget(budget, dense_ms):.4g} ms on {key}, below the smallest latency "
                f"{model_name} can reach there: {minimum:.4g} ms (every group at its narrowest width; dense "
                f"{dense_ms:.4g} ms, fixed part {job.lm.fixed_ms:.4g} ms from {job.lm.fixed_source}); ask for at "
                f"least {minimum:.4g} ms ({minimum / dense_ms:.3f} of dense)"
            )
    results: list[DeviceResult] = []
    done_summary = _kept_summary(out, {job.device_key for job in jobs})
    for job in jobs:
        plan = plans[(job.setting.batch, job.setting.dtype, job.setting.memory_format)]
        hook = finetune(job.device_key) if finetune is not None else None
        result = _prune_one(
            model_name, dense, model_kwargs, shape, plan, job, budget=budget, steps=steps, method=method,
            solver=solver, out=out, overwrite=overwrite, finetune=hook, protocol=protocol,
            importance_kwargs=importance_kwargs,
        )
        results.append(result)
        done_summary.append({
            "device_key": result.device_key, "model": model_name, "budget_ms": result.budget_ms,
            "dense_ms": result.dense_ms, "predicted_ms": result.predicted_ms, "measured_ms": result.measured_ms,
        })
        # Rewritten after each device, so a later failure leaves a summary of the variants that exist.
        write_json_atomic(out / SUMMARY_FILE, {"model": model_name, "devices": done_summary})
        if on_device_done is not None:
            on_device_done(result)
    return results


def _kept_summary(out: Path, replacing: set[str]) -> list[dict[str, Any]]:
    """Entries of an existing summary.json for devices not pruned now whose folders still exist."""
    path = out / SUMMARY_FILE
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
        entries = old.get("devices", []) if isinstance(old, dict) else []
    except (OSError, ValueError):
        return []
    return [e for e in entries if isinstance(e, dict) and e.get("device_key") not in replacing
            and (out / str(e.get("device_key"))).is_dir()]


def _prune_one(
    model_name: str,
    dense: nn.Module,
    model_kwargs: dict[str, Any],
    shape: tuple[int, ...],
    plan: Plan,
    job: _Job,
    *,
    budget: str | float,
    steps: int,
    method: str,
    solver: str,
    out: Path,
    overwrite: bool,
    finetune: FinetuneHook | None,
    protocol: Any,
    importance_kwargs: Mapping[str, Any] | None,
) -> DeviceResult:
    import copy

    setting = job.setting
    model = copy.deepcopy(dense)
    full_shape = (setting.batch, *shape)
    lm = job.lm
    dense_ms = lm.dense_ms()
    budget_ms = parse_budget(budget, dense_ms)
    log.info("%s: dense %.4g ms (layers %.4g + fixed %.4g, %s), budget %.4g ms", job.device_key, dense_ms,
             lm.layer_sum(), lm.fixed_ms, lm.fixed_source, budget_ms)
    result = progressive_prune(model, plan, lm, budget_ms, steps, method=method, solver=solver,
                               finetune=finetune, importance_kwargs=importance_kwargs)
    model.eval()
    remove_channels(model, plan, result.keep_indices(), example_input(shape, 1, "nchw"))
    deploy, folded = fold_batchnorm(model)  # for model.ts; measure_model folds its own copy the same way
    measured = _measure(model, full_shape, job, protocol) if job.local is not None else None
    widths = module_widths(model, plan)
    report = {
        "device_key": job.device_key,
        "model": model_name,
        "method": method,
        "importance": importance_options(method, importance_kwargs),
        "solver": solver,
        "steps_k": steps,
        "budget": str(budget),
        "budget_ms": budget_ms,
        "batch": setting.batch,
        "dtype": setting.dtype,
        "memory_format": setting.memory_format,
        "dense_ms": dense_ms,
        "dense_predicted_ms": dense_ms,
        "dense_layer_sum_ms": lm.layer_sum(),
        "dense_measured_ms": job.dense_measured_ms,
        "narrow_measured_ms": job.narrow_measured_ms,
        "narrow_layer_sum_ms": job.narrow_layer_sum_ms,
        "latency_fit": job.latency_fit,
        "fixed_ms": lm.fixed_ms,
        "fixed_source": lm.fixed_source,
        "correction": list(job.correction) if job.correction else None,
        "predicted_ms": result.predicted_ms,
        "measured_ms": measured,
        "measured_error": None if measured is None else (result.predicted_ms - measured) / measured,
        "measured_as": "batch norms folded into the convs (torch.fx), eval mode" if folded else "as given, eval mode",
        "measured_statistic": (protocol or table_protocol(job.table)).statistic if measured is not None else None,
        "solver_time_s": result.solver_time_s,
        "widths": widths,
        "dense_widths": plan.dense_widths(),
        "steps": [s.to_dict() for s in result.steps],
    }
    folder = write_variant(
        out, job.device_key, model, model_name=model_name, model_kwargs=model_kwargs, input_shape=shape,
        dtype=setting.dtype, memory_format=setting.memory_format, batch=setting.batch,
        plan_json=plan.to_dict(), widths=widths, report=report, overwrite=overwrite, deploy_model=deploy,
    )
    return DeviceResult(
        device_key=job.device_key, folder=folder, dense_ms=dense_ms, budget_ms=budget_ms,
        predicted_ms=result.predicted_ms, measured_ms=measured, dense_measured_ms=job.dense_measured_ms,
        fixed_ms=lm.fixed_ms, fixed_source=lm.fixed_source, widths=widths, report=report, model=model,
    )


LATENCY_FITS = ("two-point", "offset")
"""How ``prune`` turns end-to-end measurements on this machine into the latency model (see
:func:`_settle_latency`)."""
TWO_POINT_SLOPES = (0.5, 2.5)
"""The slopes a two-point line may have; outside them the points are taken as noise (offset used)."""


def two_point_line(dense_sum: float, dense_ms: float, narrow_sum: float, narrow_ms: float) -> tuple[float, float] | None:
    """``measured ~ a * layer_sum + b`` through the dense and the narrowest network, or None when the
    two cannot give a trustworthy line (layer sums within 10% of each other, a slope outside
    :data:`TWO_POINT_SLOPES`, or a line that predicts a network at or below 0 ms)."""
    if dense_sum - narrow_sum <= 0.10 * dense_sum:
        return None
    a = (dense_ms - narrow_ms) / (dense_sum - narrow_sum)
    b = dense_ms - a * dense_sum
    if not TWO_POINT_SLOPES[0] <= a <= TWO_POINT_SLOPES[1] or a * narrow_sum + b <= 0:
        return None
    return a, b


def _settle_latency(job: _Job, plan: Plan, model_name: str, dense: nn.Module, shape: tuple[int, ...],
                    protocol: Any, latency_fit: str = "two-point") -> None:
    """Give ``job`` its latency model and measure the dense model when the device is this machine.

    First that applies: a validate correction for this model and setting (fitted over many
    networks); on this machine with ``latency_fit='two-point'``, the line through the dense and the
    narrowest network measured end to end (``a * layer_sum + b``: what the table misses may be fixed,
    like per-op overhead, or grow with the widths, like element-wise ops and weights streamed from
    memory); on this machine otherwise (or when the two points give no sane line), the dense
    measurement's excess over the layer sum as a constant; else the table rows alone.
    """
    lm = LatencyModel(plan, job.table, 0.0, FIXED_TABLE_ONLY)
    full_shape = (job.setting.batch, *shape)
    if job.local is not None:
        job.latency_fit = latency_fit
        job.dense_measured_ms = measure_dense(lambda: _measure(dense, full_shape, job, protocol), lm.layer_sum(),
                                              job.device_key)
    job.correction = _correction(job.table, model_name, job.setting, shape)
    if job.correction is not None:
        a, b = job.correction
        lm = LatencyModel(plan, _ScaledTable(job.table, a), b, f"{FIXED_CORRECTION} (a={a:.4g}, b={b:.4g})")
    elif job.dense_measured_ms is not None:
        layers = lm.layer_sum()
        line = None
        if latency_fit == "two-point":
            narrow_widths = lm.min_widths()
            narrow = shrink_to_widths(copy.deepcopy(dense), plan, narrow_widths, example_input(shape, 1, "nchw"))
            # Twice, keeping the lower: a disturbed narrow point would tilt the whole line.
            job.narrow_measured_ms = min(_measure(narrow, full_shape, job, protocol) for _ in range(2))
            job.narrow_layer_sum_ms = lm.layer_sum(narrow_widths)
            del narrow
            line = two_point_line(layers, job.dense_measured_ms, job.narrow_layer_sum_ms, job.narrow_measured_ms)
            if line is None:
                log.warning("%s: the dense (%.4g ms, layer sum %.4g) and the narrowest network (%.4g ms, layer sum "
                            "%.4g) give no usable line; using the dense measurement's offset", job.device_key,
                            job.dense_measured_ms, layers, job.narrow_measured_ms, job.narrow_layer_sum_ms)
        if line is not None:
            a, b = line
            lm = LatencyModel(plan, _ScaledTable(job.table, a), b, f"{FIXED_TWO_POINT} (a={a:.4g}, b={b:.4g})")
        else:
            lm = lm.with_measured_dense(job.dense_measured_ms, FIXED_MEASURED)
            if job.dense_measured_ms < layers:
                log.warning("%s: dense measured %.4g ms is below the layer sum %.4g ms; fixed part set to 0",
                            job.device_key, job.dense_measured_ms, layers)
    job.lm = lm


DENSE_RECHECK = 0.10
"""A dense measurement more than this share above the table's layer sum is taken again (see
:func:`measure_dense`)."""
DENSE_RECHECKS = 2


def measure_dense(measure: Callable[[], float], layer_sum: float, device_key: str = "") -> float:
    """The dense model's end-to-end latency, re-measured while it looks disturbed.

    Everything above the layer sum becomes the fixed part, which moves the budget and every
    prediction, so one disturbed measurement (a busy neighbour for a few seconds) would over-prune.
    A measurement more than :data:`DENSE_RECHECK` above the layer sum is either a real fixed part
    (an unpruned stem, head, pooling: measuring again agrees) or a disturbed one (measuring again
    is lower): up to :data:`DENSE_RECHECKS` more measurements are taken while they keep coming out
    more than 3% lower, and the lowest stands.
    """
    best = measure()
    for _ in range(DENSE_RECHECKS):
        if best <= layer_sum * (1 + DENSE_RECHECK):
            break
        again = measure()
        log.info("%s: dense measured %.4g ms, %.0f%% above the layer sum %.4g ms; measured again: %.4g ms",
                 device_key, best, 100 * (best / layer_sum - 1), layer_sum, again)
        improved = again < 0.97 * best
        best = min(best, again)
        if not improved:
            break
    return best


def _measure(model: nn.Module, full_shape: tuple[int, ...], job: _Job, protocol: Any) -> float:
    from fleetprune.profiler import measure_model

    # measure_model folds batch norms into the convs (fold_bn=True), as the table prices them
    protocol = protocol if protocol is not None else table_protocol(job.table)
    m = measure_model(model, full_shape, job.local, job.setting.dtype, job.setting.memory_format, protocol,
                      fold_bn=True)
    return protocol.latency(m)


# ------------------------------------------------------------------------------------------- load


def load_variant(path: str | os.PathLike, model_factory: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Rebuild a pruned variant from its folder, in eval mode, without unpickling any module.

    The dense model is created by name (``widths.json``; or by ``model_factory`` for a network
    pruned with one), cut to the stored widths with :func:`~fleetprune.pruner.export.shrink_to_widths`,
    and ``weights.pt`` (tensors only, ``weights_only=True``) is loaded strictly into it.

    Raises:
        ReportError: the folder is not a variant; ModelError: the weights do not fit.
    """
    from fleetprune.errors import ModelError, ReportError

    folder = Path(path)
    meta = read_widths(folder)
    try:
        plan = Plan.from_dict(meta["plan"])
        if model_factory is not None:
            model = model_factory()
        else:
            model = models.create(meta["model"], **dict(meta.get("model_kwargs") or {}))
        x = example_input(meta["input_shape"], 1, "nchw")
        widths = {k: int(v) for k, v in meta["widths"].items()}
    except KeyError as exc:
        raise ReportError(f"{folder / 'widths.json'} lacks {exc}; re-run fleetprune prune") from exc
    shrink_to_widths(model, plan, widths, x)
    try:
        state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ReportError(f"{folder} is not a complete variant: {WEIGHTS_FILE} is missing") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"the weights in {folder / WEIGHTS_FILE} do not fit the architecture of widths.json: {exc}"
        ) from exc
    return model.eval()
