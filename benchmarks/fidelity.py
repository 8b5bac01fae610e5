"""How well do the latency tables predict whole networks on this CPU, and what does each part of issue 13 buy?

Per model and batch it profiles, on this CPU, the configurations that the validate run's random width
plans need (layers and op rows, the profiler's own ``profile_configs``; nothing is timed here beyond
that), runs ``fleetprune validate`` (the API: every network measured in ``--passes`` interleaved
passes beside the dense model, fastest kept) in a fresh process per (model, batch), and then prices
the same measured networks four ways:

  A  table alone as it was: convs and linears only, timed warm, + the dense model's fixed part
  B  + (1): the op rows (residual adds, pools, activations, squeeze-excitation, concat) summed too
  C  + (2): the same rows timed cold (copies exceeding the last-level cache), + fixed part
  D  + (3): one non-negative factor per op kind + a constant fitted on half the networks (C's rows),
     reported on the held-out half

A-C are over every random variant, D over the held-out ones (``line*``: the old ``a * sum + b`` line
on the same held-out networks, for comparison). The per-kind factors say which op kind the table
misprices (a factor far from the others carries the error).

    python benchmarks/fidelity.py --preset smoke                 # a handful of networks, rough numbers
    python benchmarks/fidelity.py                                 # issue 13: resnet18, mobilenet_v2 (112), resnet56; b1, b8
    python benchmarks/fidelity.py --models efficientnet_b0,regnet_y_400mf --batch 1   # unseen models

Tables are kept under ``--tables`` (default ``.benchcache/fidelity-tables``; cold rows in
``...-cold``; ``-quick`` with ``--quick`` so rough numbers never mix with real ones), so a rerun only
profiles what is missing. Each validate run appends its rows to ``TABLES/validation.parquet`` and may
store a correction in the warm table. Run it on a quiet machine: the figures measure the table, and
other load measures the neighbours.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone

DEFAULT_MODELS = "resnet18,mobilenet_v2,resnet56"
CHUNK = 100  # rows per table write while profiling, so an interrupted run keeps its progress
PRESETS = {
    "smoke": dict(models="resnet20", variants=4, batch="1", quick=True, passes=1, cold_only_ops=True),
    "issue13": dict(models=DEFAULT_MODELS, variants=30, batch="1,8", quick=False, passes=2),
}
STEPS = ("A", "B", "C", "D")


def _pct(x: float | None, digits: int = 1, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:{'+' if signed else ''}.{digits}%}"


def _rho(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


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
    from fleetprune.profiler import TorchTimingBackend, profile_configs, provenance

    have = store.measured_keys(device.key, protocol.statistic)
    todo = [c for c in configs if c.key not in have]
    if not todo:
        return 0, 0.0, 0
    backend = TorchTimingBackend(device, protocol)
    prov = provenance(device, protocol)
    started = time.perf_counter()
    noisy, chunk = 0, []
    for row in profile_configs(todo, backend):
        chunk.append(row)
        noisy += bool(row["noisy"])
        if len(chunk) >= CHUNK:
            store.write(device.key, chunk, prov)
            chunk = []
    if chunk:
        store.write(device.key, chunk, prov)
    return len(todo), time.perf_counter() - started, noisy


def price_four_ways(plan, rows: list[dict], warm, cold) -> dict:
    """Figures A-D (see the module docstring) for one run's measured rows (the dense row first)."""
    from fleetprune.pruner.fidelity import fidelity, fit_correction, fit_per_kind, per_kind_predict
    from fleetprune.pruner.latency import LatencyModel, fixed_part

    widths = [json.loads(r["widths"]) for r in rows]
    measured = [r["measured_ms"] for r in rows]
    varied = [i for i, r in enumerate(rows) if not r["dense"]]
    calib = [i for i, r in enumerate(rows) if r["calibration"]]
    held = [i for i in varied if not rows[i]["calibration"]]
    out: dict = {}
    models = {"A": LatencyModel(plan, warm, ops=False), "B": LatencyModel(plan, warm, ops=True)}
    if cold is not None:
        models["C"] = LatencyModel(plan, cold, ops=True)
    sums = {}
    for step, lm in models.items():
        sums[step] = [lm.layer_sum(w) for w in widths]
        fixed = fixed_part(measured[0], sums[step][0])
        pred = [s + fixed for s in sums[step]]
        out[step] = fidelity([pred[i] for i in varied], [measured[i] for i in varied])
        out[step]["fixed_ms"] = fixed
        out[step]["dense_layer_sum_ms"] = sums[step][0]
    base = "C" if "C" in models else "B"
    lm = models[base]
    kinds = [lm.kind_sums(w) for w in widths]
    if len(calib) >= 2 and held:
        line = fit_correction([sums[base][i] for i in calib], [measured[i] for i in calib])
        out["line"] = fidelity([line["a"] * sums[base][i] + line["b"] for i in held], [measured[i] for i in held])
        pk = fit_per_kind([kinds[i] for i in calib], [measured[i] for i in calib], prior=line["a"])
        out["D"] = fidelity([per_kind_predict(pk, kinds[i]) for i in held], [measured[i] for i in held])
        out["D"]["factors"], out["D"]["b"], out["D"]["on"] = pk["factors"], pk["b"], base
        # which kind carries the error: each kind's share of the dense network's layer sum, and its factor
        total = sum(kinds[0].values())
        out["D"]["shares"] = {k: v / total for k, v in kinds[0].items()}
    return out


def worker(args: argparse.Namespace) -> int:
    """One (model, batch) in this (fresh) process: profile what is missing, validate, price four ways."""
    from fleetprune import models
    from fleetprune.api.validate import design, validate
    from fleetprune.errors import FleetpruneError
    from fleetprune.profiler import TimingProtocol, cpu_device
    from fleetprune.tables import TableStore

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fleetprune.profiler.run").setLevel(logging.ERROR)
    name, batch = args.worker, args.worker_batch
    protocol = TimingProtocol.quick() if args.quick else TimingProtocol()
    cold_protocol = TimingProtocol(**{**protocol.to_dict(), "cache": "cold"})
    device = cpu_device(args.threads)
    warm_root, cold_root = args.tables, args.tables + "-cold"
    shape = tuple(models.input_shape(name))
    if shape[1] > 64:  # ImageNet-sized: reduce so 2 cores finish in minutes
        shape = (shape[0], args.input_size, args.input_size)
    kwargs = dict(variants=args.variants, batch=batch, dtype="fp32", memory_format=args.memory_format,
                  input_shape=shape, seed=args.seed)
    t0 = time.perf_counter()
    try:
        d = design(name, model_factory=lambda: models.create(name), **kwargs)
        configs = d.configs()
        warm_store = TableStore(warm_root)
        prof = {"warm": profile_missing(warm_store, device, protocol, configs)}
        if "cold" in args.modes:
            cold_configs = [c for c in configs if not c.is_layer] if args.cold_only_ops else configs
            prof["cold"] = profile_missing(TableStore(cold_root), device, cold_protocol, cold_configs)
        t1 = time.perf_counter()
        s = validate(name, warm_root, device.key, threads=device.threads, protocol=protocol, passes=args.passes,
                     **kwargs)
        val_s = time.perf_counter() - t1
        warm = TableStore(warm_root).read(device.key)
        cold = None
        if "cold" in args.modes:
            cold = TableStore(cold_root).read(device.key)
            if args.cold_only_ops:  # smoke preset: cold op rows over warm layer rows, to save time
                from fleetprune.tables.table import LatencyTable

                frame = cold.frame[~cold.frame["op"].isin(["conv", "dwconv", "linear"])]
                import pandas as pd

                cold = LatencyTable(device.key, cold.provenance,
                                    pd.concat([warm.frame[warm.frame["op"].isin(["conv", "dwconv", "linear"])], frame]),
                                    root=cold_root)
        figures = price_four_ways(d.plan, s.rows, warm, cold)
    except FleetpruneError as exc:
        print(json.dumps({"error": f"{name} b{batch}: {exc}"}))
        return 2
    label = "x".join(map(str, shape))
    result = {"model": name, "batch": batch, "input": label, "figures": figures, "configs": len(configs),
              "op_configs": sum(1 for c in configs if not c.is_layer), "profiled": prof, "validate_s": val_s,
              "wall_s": time.perf_counter() - t0, "dense_measured_ms": s.dense_measured_ms,
              "validate_per_kind_warm": s.per_kind_after, "run_id": s.run_id}
    print("RESULT " + json.dumps(result, default=str))
    return 0


def _row(res: dict) -> list[str]:
    f = res["figures"]
    cells = [f"{res['model']} {res['input']} b{res['batch']}"]
    for step in ("A", "B", "C", "D", "line"):
        g = f.get(step)
        cells += ["-", "-", "-"] if not g else [_pct(g["within_10"], 0), _pct(g["median_abs_error"]), _rho(g["spearman"])]
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="smoke: resnet20, 4 variants, quick protocol "
                        "(a smoke run, not a figure); issue13: the issue's acceptance run")
    parser.add_argument("--models", help=f"comma-separated (default {DEFAULT_MODELS})")
    parser.add_argument("--variants", type=int, help="random width plans per model (default 30)")
    parser.add_argument("--batch", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--input-size", type=int, default=112,
                        help="H = W for the ImageNet models (default 112; CIFAR models keep 32)")
    parser.add_argument("--tables", help="table root (default .benchcache/fidelity-tables[-quick])")
    parser.add_argument("--modes", default="warm,cold", help="timing modes to profile (default warm,cold)")
    parser.add_argument("--quick", action="store_true", default=None, help="short timing protocol: not a figure")
    parser.add_argument("--passes", type=int, help="validate passes over all networks (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as the issue asks)")
    parser.add_argument("--memory-format", default="nhwc", choices=["nchw", "nhwc"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cold-only-ops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = PRESETS.get(args.preset or "issue13")
    for key in ("models", "variants", "batch", "quick", "passes"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.cold_only_ops = args.cold_only_ops or preset.get("cold_only_ops", False)
    args.tables = args.tables or (".benchcache/fidelity-tables-quick" if args.quick else ".benchcache/fidelity-tables")
    if args.worker:
        return worker(args)

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    started_at = datetime.now(timezone.utc)
    wall = time.perf_counter()
    load_before = _load()
    print(f"fidelity: {', '.join(names)} at batch {', '.join(map(str, batches))}, {args.variants} variants each, "
          f"seed {args.seed}, {args.threads} thread(s), modes {args.modes}; python {platform.python_version()}")
    print(f"tables: {args.tables}; {'quick protocol (smoke run, rough numbers)' if args.quick else 'default protocol'}; "
          f"date {started_at:%Y-%m-%d %H:%M} UTC; load average before: {load_before}", flush=True)
    results = []
    for name in names:
        for batch in batches:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--worker-batch", str(batch),
                   "--variants", str(args.variants), "--input-size", str(args.input_size), "--tables", args.tables,
                   "--modes", args.modes, "--passes", str(args.passes), "--threads", str(args.threads),
                   "--memory-format", args.memory_format, "--seed", str(args.seed)]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--cold-only-ops"] if args.cold_only_ops else []
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(f"error: {name} b{batch} (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}",
                      file=sys.stderr)
                return 2
            results.append(json.loads(line[len("RESULT "):]))
            print(f"done {name} b{batch} in {time.perf_counter() - t0:.0f} s", flush=True)

    header = ["model", "A<=10%", "A med", "A rho", "B<=10%", "B med", "B rho", "C<=10%", "C med", "C rho",
              "D<=10%*", "D med*", "D rho*", "line<=10%*", "line med*", "line rho*"]
    print()
    print(_table(header, [_row(r) for r in results]))
    print("A: convs+linears (warm) + fixed part; B: + op rows; C: + cold timing; D*: + per-kind factors fitted on "
          "half, on the held-out half (line*: a*sum+b on the same held-out networks)")
    for r in results:
        d = r["figures"].get("D") or {}
        factors = "  ".join(f"{k} {v:.2f} ({100 * d['shares'].get(k, 0):.0f}%)" for k, v in
                            sorted(d.get("factors", {}).items()))
        print(f"  {r['model']} {r['input']} b{r['batch']}: dense {r['dense_measured_ms']:.3f} ms; "
              f"{r['configs']} configurations ({r['op_configs']} op rows), profiled "
              + ", ".join(f"{m} {p[0]} in {p[1]:.0f} s ({p[2]} noisy)" for m, p in r["profiled"].items())
              + f"; validate {r['validate_s']:.0f} s")
        if factors:
            print(f"    per-kind factors on {d['on']} (share of the dense layer sum): {factors}; constant {d['b']:+.3f} ms")
    total = time.perf_counter() - wall
    print(f"wall time {total:.0f} s ({total / 60:.1f} min); load average before {load_before}, after {_load()}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"date": started_at.isoformat(), "args": vars(args), "wall_s": total, "results": results}, fh,
                      indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
