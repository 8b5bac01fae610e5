"""How well do the latency tables predict whole networks on this CPU? The validate verb over three models.

For each model it profiles, on this CPU, the layer configurations that the validate run's random
width plans need and the table lacks (the profiler's own ``profile_configs``; nothing is timed here),
then runs ``fleetprune validate`` (the API) with ``--variants`` plans plus the dense model, and prints
one summary table: the share of variants predicted within 5% / 10%, the median absolute error, the
signed bias (median of (predicted - measured) / measured) and Spearman's rho, before and after the
fitted correction (fitted on the dense model + the first 5 variants, reported on the held-out rest).

    python benchmarks/fidelity.py                              # resnet18, mobilenet_v2 (3x112x112), resnet56
    python benchmarks/fidelity.py --input-size 64              # ImageNet models at 3x64x64
    python benchmarks/fidelity.py --models resnet56 --variants 8 --quick   # smoke run

Tables are kept under ``--tables`` (default ``.benchcache/fidelity-tables``, or
``...-quick`` with ``--quick`` so rough numbers never mix with real ones), so a rerun only
profiles what is missing. Each run also appends its rows to ``TABLES/validation.parquet`` and stores
a correction per device; the correction of the last model run is the one the table keeps.
Run it on a quiet machine: the figures measure the table, and other load measures the neighbours.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone

DEFAULT_MODELS = "resnet18,mobilenet_v2,resnet56"
CHUNK = 100  # rows per table write while profiling, so an interrupted run keeps its progress


def _pct(x: float | None, digits: int = 1, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:{'+' if signed else ''}.{digits}%}"


def _rho(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _figures(f: dict | None) -> list[str]:
    if not f:
        return ["-"] * 6
    return [str(f["n"]), _pct(f["within_5"], 0), _pct(f["within_10"], 0), _pct(f["median_abs_error"]),
            _pct(f["bias"], 1, signed=True), _rho(f["spearman"])]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def profile_missing(store, device, protocol, configs) -> tuple[int, float, int]:
    """Measure the configurations the table lacks; return (measured, seconds, noisy)."""
    from tqdm import tqdm

    from fleetprune.profiler import TorchTimingBackend, profile_configs, provenance

    have = store.measured_keys(device.key, protocol.statistic)
    todo = [c for c in configs if c.key not in have]
    if not todo:
        return 0, 0.0, 0
    backend = TorchTimingBackend(device, protocol)
    prov = provenance(device, protocol)
    started = time.perf_counter()
    noisy, chunk = 0, []
    for row in tqdm(profile_configs(todo, backend), total=len(todo), desc="profile", unit="cfg", leave=False):
        chunk.append(row)
        noisy += bool(row["noisy"])
        if len(chunk) >= CHUNK:
            store.write(device.key, chunk, prov)
            chunk = []
    if chunk:
        store.write(device.key, chunk, prov)
    return len(todo), time.perf_counter() - started, noisy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS})")
    parser.add_argument("--variants", type=int, default=30, help="random width plans per model (default 30)")
    parser.add_argument("--input-size", type=int, default=112,
                        help="H = W for the ImageNet models (default 112; CIFAR models keep 32)")
    parser.add_argument("--tables", help="table root (default .benchcache/fidelity-tables[-quick])")
    parser.add_argument("--quick", action="store_true", help="short timing protocol: a smoke run, not a figure")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, i.e. all cores)")
    parser.add_argument("--memory-format", default="nhwc", choices=["nchw", "nhwc"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the summaries as JSON")
    args = parser.parse_args(argv)

    import torch

    from fleetprune import models
    from fleetprune.api.validate import design, validate
    from fleetprune.errors import FleetpruneError
    from fleetprune.profiler import TimingProtocol, cpu_device
    from fleetprune.tables import TableStore

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # One warning per noisy row floods the output on a busy machine; the table counts them instead.
    logging.getLogger("fleetprune.profiler.run").setLevel(logging.ERROR)

    root = args.tables or (".benchcache/fidelity-tables-quick" if args.quick else ".benchcache/fidelity-tables")
    protocol = TimingProtocol.quick() if args.quick else TimingProtocol()
    device = cpu_device(args.threads)
    store = TableStore(root)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    started_at = datetime.now(timezone.utc)
    wall = time.perf_counter()
    load_before = _load()
    print(f"fidelity: {', '.join(names)}, {args.variants} variants each, seed {args.seed}")
    print(f"machine: {device.name}, {device.threads} threads (device {device.key}); torch {torch.__version__}; "
          f"python {platform.python_version()}")
    print(f"protocol: {'quick (smoke run, rough numbers)' if args.quick else 'default'} {protocol.to_dict()}")
    print(f"tables: {root}; date {started_at:%Y-%m-%d %H:%M} UTC; load average before: {load_before}", flush=True)

    results, rows, notes = [], [], []
    for name in names:
        shape = tuple(models.input_shape(name))
        if shape[1] > 64:  # ImageNet-sized: reduce so 2 cores finish in minutes
            shape = (shape[0], args.input_size, args.input_size)
        label = "x".join(map(str, shape))
        kwargs = dict(variants=args.variants, batch=1, dtype="fp32", memory_format=args.memory_format,
                      input_shape=shape, seed=args.seed)
        try:
            t0 = time.perf_counter()
            d = design(name, model_factory=lambda: models.create(name), **kwargs)
            configs = d.configs()
            measured, prof_s, noisy = profile_missing(store, device, protocol, configs)
            t1 = time.perf_counter()
            s = validate(name, root, device.key, threads=device.threads, protocol=protocol, **kwargs)
            val_s = time.perf_counter() - t1
        except FleetpruneError as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 2
        c = s.correction
        rows.append([name, label, *_figures(s.to_dict()), *_figures(s.after),
                     (f"{c['a']:.3f}" + ("" if s.correction_stored else " (not stored)")) if c else "-",
                     f"{c['b']:+.3f}" if c else "-"])
        notes.append(
            f"{name} {label}: dense measured {s.dense_measured_ms:.3f} ms, layer sum {s.dense_layer_sum_ms:.3f} ms "
            f"(layer sum alone: median |err| {_pct(s.raw['median_abs_error'])}, bias {_pct(s.raw['bias'], 1, True)}); "
            f"held out before correction: median |err| {_pct((s.held_out_before or {}).get('median_abs_error'))}; "
            f"{len(configs)} configurations needed, {measured} profiled now in {prof_s:.0f} s ({noisy} noisy); "
            f"validate {val_s:.0f} s; plan+profile+validate {time.perf_counter() - t0:.0f} s"
        )
        results.append({**s.to_dict(), "configs_needed": len(configs), "profiled_now": measured,
                        "profile_s": prof_s, "noisy_rows": noisy, "validate_s": val_s})
        print(f"done {name} ({label}) in {time.perf_counter() - t0:.0f} s", flush=True)

    header = ["model", "input", "n", "<=5%", "<=10%", "med|err|", "bias", "rho",
              "held", "<=5%*", "<=10%*", "med|err|*", "bias*", "rho*", "a", "b ms"]
    print()
    print(_table(header, rows))
    print("first block: table + fixed part (dense measured - dense layer sum) over all variants; "
          "* = corrected a*layer_sum+b on the held-out variants")
    for line in notes:
        print("  " + line)
    total = time.perf_counter() - wall
    print(f"wall time {total:.0f} s ({total / 60:.1f} min); load average before {load_before}, after {_load()}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"date": started_at.isoformat(), "machine": device.name, "threads": device.threads,
                       "device_key": device.key, "protocol": protocol.to_dict(), "wall_s": total,
                       "results": results}, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
