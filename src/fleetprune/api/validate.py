"""The ``validate`` verb: how well a device's table predicts end-to-end latency on this machine.

A composition of parts: :func:`fleetprune.pruner.fidelity.design` draws random width plans across
the latency range (plus the dense model), each is built and measured here in ``passes`` passes over
all of them (the fastest kept), and :func:`fleetprune.pruner.fidelity.summarise` gives the figures
and the correction ``measured ~ a * layer_sum + b``, which is stored in the table's provenance when
it helps the held-out networks. Rows go to ``ROOT/validation.parquet``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from fleetprune import models
from fleetprune.api._common import table_protocol
from fleetprune.errors import DeviceError, FleetpruneError, TableError
from fleetprune.profiler import DeviceInfo, TimingProtocol, local_devices, measure_model
from fleetprune.pruner import setting as settings
from fleetprune.pruner.export import shrink_to_widths
from fleetprune.pruner.fidelity import ValidationSummary, calibration_count, design, draw_widths, fidelity, \
    fit_correction, summarise
from fleetprune.pruner.latency import LatencyModel
from fleetprune.pruner.variant import example_input
from fleetprune.tables import LatencyTable, TableStore

log = logging.getLogger(__name__)

__all__ = ["ValidationSummary", "validate", "design", "draw_widths", "fidelity", "fit_correction", "calibration_count",
           "local_device"]


def local_device(table: LatencyTable, threads: int | None = None) -> DeviceInfo:
    """This machine's device that the table was measured on (``threads=None``: the table's thread count).

    Raises:
        DeviceError: the table is of another device (or thread count), or was made up by a fake backend.
    """
    prov = table.provenance
    if (prov.get("fingerprint") or {}).get("fake") or prov.get("timing_method") == "fake":
        raise DeviceError(f"the table of {table.device_key} was made by a fake timing backend; validate needs real "
                          "measurements: profile this machine with `fleetprune profile`")
    if threads is None and prov.get("threads"):
        threads = int(prov["threads"])
    devices = local_devices(threads)
    for dev in devices:
        if dev.key == table.device_key:
            return dev
    raise DeviceError(
        f"validate measures on this machine, but the table's device {table.device_key!r} is not one of its devices "
        f"({', '.join(d.key for d in devices)}); run validate on a machine of that device type, or pass --threads to "
        "match the thread count the table was measured with"
    )


def _check_writable(root: str) -> None:
    """Refuse a local table root that cannot take the validation rows, before anything is measured."""
    if "://" in root and not root.startswith("file://"):
        return  # a remote filesystem: the write is checked when it happens (rows are kept, see _save)
    path = Path(root.removeprefix("file://"))
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".fleetprune-write-check."):
            pass
    except OSError as exc:
        raise TableError(f"the table root {root} cannot be written ({exc.strerror or exc}), so the validation rows "
                         "and the correction could not be saved; run validate on a root you can write to (copy it "
                         "with `fleetprune tables merge`)") from exc


def validate(
    model_name: str, tables: str, device: str, *, variants: int = 20, batch: int | None = None,
    dtype: str | None = None, memory_format: str | None = None, input_shape: Sequence[int] | None = None,
    round_to: int | None = None, max_choices: int = 32, seed: int = 0, threads: int | None = None,
    protocol: TimingProtocol | None = None, fit: bool = True, model_factory: Callable[[], Any] | None = None,
    progress: Callable[[int, int], None] | None = None, passes: int = 2,
) -> ValidationSummary:
    """Predict and measure ``variants`` random width plans plus the dense model on this machine.

    Writes one row per network to ``TABLES/validation.parquet`` (with the table's provenance) and,
    with ``fit``, stores the fitted correction in the device's table unless its slope is not positive
    or it predicts the held-out networks worse than the table does.

    Args:
        model_name: a name from :func:`fleetprune.models.names` (or any label with ``model_factory``).
        tables, device: the table root and the device key of the table (this machine's CPU or a GPU).
        variants: random width plans besides the dense model.
        batch, dtype, memory_format: the setting to validate; None takes the table's only one.
        input_shape: ``(C, H, W)`` instead of the model's default. round_to, max_choices: as profiled.
        threads: CPU threads; None takes the table's. protocol: None takes the table's.
        fit: fit and store the correction on the dense model and the first variants; report the rest.
        model_factory: builds a model that is not in the registry. progress: ``(done, total)`` callback.
        passes: measure every network this many times, in passes over all of them, keeping the fastest.

    Raises:
        TableError: no table of ``device``, no unique setting in it, or a root that cannot be written.
        DeviceError: the table is not of this machine.
        MissingConfigsError: the table lacks configurations the plans need (before anything is measured).
    """
    if passes < 1:
        raise FleetpruneError(f"passes must be at least 1, got {passes}")
    store = TableStore(tables)
    table = store.read(device)
    dev = local_device(table, threads)
    default = None if model_factory else tuple(models.input_shape(model_name))
    shape = tuple(int(s) for s in (input_shape or default))
    s = settings.resolve(table, model_name, tables, input_shape=shape, batch=batch, dtype=dtype,
                         memory_format=memory_format, round_to=round_to, max_choices=max_choices, default_shape=default)
    d = design(model_name, variants=variants, batch=s.batch, dtype=s.dtype, memory_format=s.memory_format,
               input_shape=shape, round_to=s.round_to, max_choices=s.max_choices, seed=seed,
               model_factory=model_factory or (lambda: models.create(model_name)))
    missing = table.missing(d.configs())
    if missing:
        raise settings.missing_error(table, missing, model_name, tables, s)
    _check_writable(tables)
    protocol = protocol if protocol is not None else table_protocol(table)
    lm = LatencyModel(d.plan, table)
    x = example_input(d.input_shape, batch=s.batch, memory_format="nchw")
    run_id = uuid.uuid4().hex[:12]
    log.info("validate %s on %s: %d networks, batch %d %s %s, run %s", model_name, device, len(d.widths), s.batch,
             s.dtype, s.memory_format, run_id)
    n, best = len(d.widths), [None] * len(d.widths)
    if progress:
        progress(0, n * passes)  # every check passed: measuring starts
    for p in range(passes):
        for i, widths in enumerate(d.widths):
            # built again in every pass rather than held: N copies of a large model need not fit in memory
            net = d.factory().eval()
            if i > 0:
                net = shrink_to_widths(net, d.plan, widths, x)
            m = measure_model(net, s.full_shape, dev, s.dtype, s.memory_format, protocol)
            del net
            if best[i] is None or protocol.latency(m) < protocol.latency(best[i]):
                best[i] = m
            if progress:
                progress(p * n + i + 1, n * passes)
    rows = [{
        "run_id": run_id, "device_key": device, "model": model_name, "input_shape": "x".join(map(str, d.input_shape)),
        "variant": i, "dense": i == 0, "calibration": bool(fit and d.calibration > 0 and i <= d.calibration),
        "layer_sum_ms": lm.layer_sum(widths), "kind_sums": json.dumps(lm.kind_sums(widths), sort_keys=True),
        "ops_priced": lm.ops_priced, "measured_ms": protocol.latency(best[i]), "statistic": protocol.statistic,
        "measured_min_ms": float(best[i].min_ms), "measured_median_ms": float(best[i].median_ms),
        "measured_p10_ms": float(best[i].p10_ms), "measured_p90_ms": float(best[i].p90_ms),
        "widths": json.dumps({k: int(v) for k, v in widths.items()}, sort_keys=True), "batch": int(s.batch),
        "dtype": s.dtype, "memory_format": s.memory_format, "measured_at": datetime.now(timezone.utc),
    } for i, widths in enumerate(d.widths)]
    summary = ValidationSummary(device_key=device, model=model_name, run_id=run_id, input_shape=d.input_shape,
                                batch=s.batch, dtype=s.dtype, memory_format=s.memory_format)
    summary.priced_ops = lm.ops_priced
    summarise(rows, summary, fit=fit, variants=variants)
    summary.path = _save(store, rows, table, tables, run_id)
    if summary.correction_stored:
        store.set_correction(device, summary.correction, provenance=table.provenance)
        log.info("%s: stored correction measured = %.4g * layer_sum + %.4g ms%s", device, summary.correction["a"],
                 summary.correction["b"], " (and per op kind)" if "per_kind" in summary.correction else "")
    return summary


def _save(store: TableStore, rows: list[dict[str, Any]], table: LatencyTable, root: str, run_id: str) -> str:
    """Append the rows to the root; if that fails, keep them in a local file and say where."""
    try:
        return store.append_validation(rows, provenance=table.provenance)
    except (OSError, FleetpruneError) as exc:
        keep = Path.cwd() / f"validation-{run_id}.parquet"
        pd.DataFrame(rows).to_parquet(keep)
        raise TableError(f"the validation rows could not be written to {root} ({exc}); the measurements are kept in "
                         f"{keep}: copy them next to the table when it can be written") from exc
