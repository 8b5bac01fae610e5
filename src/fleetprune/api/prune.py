"""The ``prune`` verb: one pruned variant of one model per device, each from that device's table.

A composition of parts: every input is checked for every device before any work (table, setting,
plan, missing configurations, ``--out``); the devices that can be reached are measured (this
machine in this process, the others on actors of the cluster, see :mod:`fleetprune.api._measure`);
the pruner settles each device's latency model, checks the budget against what was measured, and
prunes with the closed loop until the measured latency meets the budget
(:mod:`fleetprune.pruner.calibrate`, :mod:`fleetprune.pruner.pipeline`); the variant folder is
written whole (:mod:`fleetprune.pruner.variant`). Devices measured on the cluster run side by
side; devices of this machine after them, so that nothing else runs on it while it times.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from fleetprune import models
from fleetprune.api._common import sample_shape
from fleetprune.api._measure import RAY_ADDRESS_NONE, ModelFactory, Target, create_model, measurers
from fleetprune.api._parallel import for_each_device
from fleetprune.errors import BudgetError, DeviceError, FleetpruneError, TableError
from fleetprune.pruner import calibrate, setting as settings
from fleetprune.pruner import variant as variants
from fleetprune.pruner.calibrate import FIXED_CORRECTION, FIXED_MEASURED, FIXED_TWO_POINT, LATENCY_FITS, TABLE_ONLY
from fleetprune.pruner.pipeline import device_report, prune_for_device
from fleetprune.pruner.plan import build_plan
from fleetprune.pruner.progressive import METHODS, FinetuneHook
from fleetprune.pruner.schedule import read_budget
from fleetprune.pruner.scores import importance_options
from fleetprune.pruner.solve import SOLVERS
from fleetprune.tables import TableStore

log = logging.getLogger(__name__)

__all__ = ["DeviceResult", "prune", "load_variant", "FIXED_MEASURED", "FIXED_TWO_POINT", "FIXED_CORRECTION",
           "TABLE_ONLY", "LATENCY_FITS"]


@dataclass
class DeviceResult:
    """What one device's prune produced (latencies in ms; ``model`` is the pruned network, eval mode).

    ``verification`` is ``met``, ``over``, ``under`` or ``predicted only``; ``verdict`` says by how much.
    """

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
    verification: str = "predicted only"
    verdict: str = "predicted only"
    report: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)


def _devices(store: TableStore, devices: str | Sequence[str]) -> list[str]:
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    devices = list(dict.fromkeys(devices))
    if not devices:
        raise DeviceError("no device given; pass --device KEY[,KEY...] or --device all")
    if devices == ["all"]:
        found = [d.device_key for d in store.devices() if d.rows > 0]
        if not found:
            raise TableError(f"no device tables under {store.root}; measure one first: "
                             f"fleetprune profile MODEL --tables {store.root}")
        return found
    if "all" in devices:
        raise DeviceError("--device all cannot be combined with device keys")
    return devices


def prune(
    model_name: str, *, tables: str, devices: str | Sequence[str], budget: str | float, out: str | os.PathLike,
    steps: int = 30, weights: str | None = None, num_classes: int | None = None,
    input_size: Sequence[int] | int | None = None, method: str = "sp_lamp", solver: str = "dp",
    batch: int | None = None, dtype: str | None = None, memory_format: str | None = None,
    round_to: int | None = None, max_choices: int = 32, overwrite: bool = False,
    finetune: Callable[[str], FinetuneHook | None] | None = None, measure: bool = True,
    latency_fit: str = "two-point", protocol: Any = None, importance_kwargs: Mapping[str, Any] | None = None,
    on_device_done: Callable[[DeviceResult], None] | None = None, model_factory: Callable[[], nn.Module] | None = None,
    input_shape: Sequence[int] | None = None, verify_rounds: int = 4, ray_address: str = RAY_ADDRESS_NONE,
    seed: int = 0, on_measured: Callable[[str, Any], None] | None = None, service: str | None = None,
) -> list[DeviceResult]:
    """Prune ``model_name`` for every device in ``devices`` and write one variant folder per device.

    Args:
        model_name: a name from :func:`fleetprune.models.names` (a label with ``model_factory``).
        tables, devices: the table root; device keys (a list or ``"a,b"``) or ``"all"``.
        budget: ``0.5`` / ``50%`` (of dense), ``2x`` (checked as a ratio to the dense model measured beside
            the variant), or ``12ms`` / ``800us`` (checked against the variant's time).
        out: ``out/<device_key>/`` per device plus ``out/summary.json``.
        steps: K, the progressive steps. weights: a local checkpoint of the dense model.
        num_classes, input_size: classifier outputs and spatial input size, if not the model's default.
        method, solver: ``sp_lamp`` | ``l1`` | ``random`` | ``uniform``; ``dp`` | ``exact``.
        batch, dtype, memory_format: the setting (None: the table's only one). round_to, max_choices: units.
        overwrite: replace the variants of these devices in a non-empty ``out``.
        finetune: ``finetune(device_key) -> hook or None``: a fresh hook per device, called between steps.
        measure: measure devices that can be reached (False: every device open-loop, predicted only).
        latency_fit: ``two-point`` (default) or ``offset``: how measurements become the latency model.
        protocol: the timing protocol of the measurements (None: each table's own).
        importance_kwargs: options of the channel importance (``fold_bn``, ``coupled_reduce``, ...).
        on_device_done: called with each device's result as soon as its variant is written.
        model_factory, input_shape: prune a network outside the registry (``input_shape`` = (C, H, W)).
        verify_rounds: closed-loop rounds per reachable device (0: open loop, the final variant measured).
        ray_address: ``none`` (default: this machine only), ``local``, ``auto`` or ``HOST:PORT`` to
            reach the other devices' types on a Ray cluster.
        seed: seeds the random starting weights when no ``weights`` are given.
        on_measured: called as ``(device_key, timing)`` after each measurement on a device (progress, tests).
        service: the URL of a running ``fleetprune serve``: devices other than this machine are measured
            on its replicas (instead of ``ray_address``).

    Raises:
        FleetpruneError: (and subclasses) a bad budget, device, table, model or --out, before anything
            is written; variants already written stay whole.
    """
    if method not in METHODS or solver not in SOLVERS:
        raise FleetpruneError(f"unknown method {method!r} or solver {solver!r}; methods: {', '.join(METHODS)}; "
                              f"solvers: {', '.join(SOLVERS)}")
    importance = importance_options(method, importance_kwargs)  # bad options fail here, before any work
    if steps < 1:
        raise BudgetError(f"--steps must be at least 1, got {steps}")
    if latency_fit not in LATENCY_FITS or verify_rounds < 0:
        raise FleetpruneError(f"--latency-fit must be one of {', '.join(LATENCY_FITS)} (got {latency_fit!r}) and "
                              f"--verify-rounds at least 0 (got {verify_rounds})")
    wanted_budget = read_budget(budget)
    out = Path(out)
    variants.check_writable(out, overwrite)
    store = TableStore(tables)
    if not store.exists():
        raise TableError(f"no table root at {tables}; measure first: fleetprune profile {model_name} --tables {tables}")
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    if model_factory is not None and input_shape is None:
        raise FleetpruneError("a model_factory needs input_shape=(C, H, W)")
    with torch.random.fork_rng(devices=[]):  # seeded random weights without touching the caller's RNG
        torch.manual_seed(seed)
        if model_factory is not None:
            shape, default, factory = tuple(int(s) for s in input_shape), None, model_factory
            dense = model_factory()
            if weights is not None:
                models.load_weights(dense, weights, name=model_name)
        else:
            shape = tuple(int(s) for s in input_shape) if input_shape else sample_shape(model_name, input_size)
            default, factory = tuple(models.input_shape(model_name)), ModelFactory(model_name, kwargs)
            dense = models.create(model_name, weights=weights, **kwargs)  # unknown name / bad weights fail here

    targets, plans = [], {}
    for key in _devices(store, devices):
        table = store.read(key)
        s = settings.resolve(table, model_name, tables, input_shape=shape, batch=batch, dtype=dtype,
                             memory_format=memory_format, round_to=round_to, max_choices=max_choices,
                             default_shape=default, num_classes=num_classes)
        if s not in plans:
            plans[s] = build_plan(dense, variants.example_input(shape, s.batch, "nchw"), round_to=s.round_to,
                                  max_choices=s.max_choices, dtype=s.dtype, memory_format=s.memory_format)
        plan = plans[s]
        if not plan.prunable_groups():
            raise FleetpruneError(f"{model_name} has no prunable channel group at round_to={s.round_to} (every group is "
                                  "a single unit or fixed); try a smaller --round-to")
        missing = table.missing(plan.configs())
        if missing:
            raise settings.missing_error(table, missing, model_name, tables, s)
        targets.append(Target(table, s, model_name, kwargs, plan.to_dict(), factory, protocol))

    results: dict[str, DeviceResult] = {}
    summary = variants.kept_summary(out, {t.device_key for t in targets})
    lock = threading.Lock()
    with measurers(targets, ray_address=ray_address, enabled=measure, on_measured=on_measured,
                   service=service) as reach:
        def settle(t: Target) -> Any:
            corr = calibrate.stored_correction(t.table, model_name, t.setting.correction_key())
            st = calibrate.settle(plans[t.setting], t.table, correction=corr, measure=reach.measure[t.device_key],
                                  latency_fit=latency_fit)
            if st.lost:
                reach.measure[t.device_key], reach.why[t.device_key] = None, f"device lost: {st.lost}"
            calibrate.check_floor(wanted_budget, st, model_name, t.device_key)
            return st

        settled = for_each_device(targets, settle, reach.remote)

        def run(t: Target) -> DeviceResult:
            key, st, plan = t.device_key, settled[t.device_key], plans[t.setting]
            outcome = prune_for_device(dense, plan, st, wanted_budget, steps=steps, method=method, solver=solver,
                                       finetune=finetune(key) if finetune else None, importance_kwargs=importance_kwargs,
                                       measure=reach.measure[key], verify_rounds=verify_rounds,
                                       unreachable_note=reach.why.get(key, ""))
            report = device_report(outcome, st, device_key=key, model_name=model_name, method=method,
                                   importance=importance, solver=solver, steps=steps, budget=wanted_budget,
                                   setting={**t.setting.report(), "seed": None if weights else seed},
                                   protocol_statistic=t.timing_protocol().statistic)
            folder = variants.write_variant(
                out, key, outcome.model, model_name=model_name, model_kwargs=kwargs, input_shape=shape,
                dtype=t.setting.dtype, memory_format=t.setting.memory_format, batch=t.setting.batch,
                plan_json=t.plan, widths=outcome.widths, report=report, overwrite=overwrite, deploy_model=outcome.deploy)
            v = outcome.verification
            res = DeviceResult(key, folder, st.model.dense_ms(), outcome.budget_ms, outcome.result.predicted_ms,
                               outcome.measured_ms, st.dense_measured_ms, st.model.fixed_ms, st.model.fixed_source,
                               outcome.widths, v.status, v.verdict, report, outcome.model)
            with lock:
                summary.append({"device_key": key, "model": model_name, "budget_ms": res.budget_ms,
                                "dense_ms": res.dense_ms, "predicted_ms": res.predicted_ms,
                                "measured_ms": res.measured_ms, "verification": v.status, "verdict": v.verdict,
                                "note": v.note})
                # rewritten after each device, so a later failure leaves a summary of the variants that exist
                variants.write_json_atomic(out / variants.SUMMARY_FILE, {"model": model_name, "devices": summary})
                if on_device_done is not None:
                    on_device_done(res)
            return res

        results = for_each_device(targets, run, reach.remote)
    return [results[t.device_key] for t in targets]


def load_variant(path: str | os.PathLike, model_factory: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Rebuild a pruned variant from its folder, in eval mode, without unpickling any module.

    The dense model is created by the name in ``widths.json`` (or by ``model_factory``), cut to the
    stored widths and ``weights.pt`` loaded strictly into it (:func:`fleetprune.pruner.variant.load_variant`).

    Raises:
        ReportError: the folder is not a variant; ModelError: the weights do not fit.
    """
    factory = (lambda _name, _kwargs: model_factory()) if model_factory is not None else create_model
    return variants.load_variant(path, factory)
