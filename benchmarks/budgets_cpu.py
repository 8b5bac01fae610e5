"""Do closed-loop variants meet their budgets on this CPU? (issue 11's acceptance run)

For each case (model, batch, input size, width unit), profiles the table here with one thread
(resumable: a cached root is reused), prunes for each budget with the closed loop on (``prune``'s
defaults: measured beside the dense model, re-solved until within 0.95-1.00 of the budget, at most
``--verify-rounds`` rounds), then re-measures every variant in a fresh process beside its dense
model (``benchmarks/measure_variants.py``: interleaved rounds, fastest kept; ``--fresh-processes``
processes one after another, each network's fastest kept: one process can run a network 10-30%
slower than the next for its whole life on our VMs), and prints one row per variant: rounds used,
prune wall time, the in-run verdict and the fresh-process fraction of dense and share of the budget.
``--fresh-only`` repeats the fresh-process check on the variants of the last run.

    .venv/bin/python benchmarks/budgets_cpu.py --cache .benchcache/budgets

Run it on a quiet machine (nothing else heavy running): it times networks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    # name: (model, batch, input size or None, round_to, max_choices)
    "resnet20": ("resnet20", 16, None, 8, 32),
    "resnet56": ("resnet56", 16, None, 8, 32),
    "resnet18": ("resnet18", 8, 64, 32, 8),
    "mobilenet_v2": ("mobilenet_v2", 8, 64, 16, 8),
}
HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--cache", default=".benchcache/budgets", help="tables and variants (reused across runs)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--verify-rounds", type=int, default=4)
    p.add_argument("--fresh-rounds", type=int, default=4, help="interleaved rounds of the fresh-process check")
    p.add_argument("--fresh-processes", type=int, default=3, help="fresh processes of the check (default 3)")
    p.add_argument("--fresh-only", action="store_true", help="only the fresh-process check of the last run")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import logging

    from fleetprune.api import profile, prune
    from fleetprune.profiler import cpu_device

    logging.basicConfig(level=logging.WARNING)
    cache = Path(args.cache)
    key = cpu_device(args.threads).key
    rows = json.loads((cache / "budgets.json").read_text()) if args.fresh_only else []
    for name in [] if args.fresh_only else args.cases:
        model, batch, size, round_to, max_choices = CASES[name]
        root = str(cache / f"tables-b{batch}-s{size or 'def'}-rt{round_to}-mc{max_choices}")
        t0 = time.perf_counter()
        profile(model, batch=batch, round_to=round_to, input_size=size, max_choices=max_choices, tables=root,
                threads=args.threads, ray_address="none", num_classes=10 if size else None)
        print(f"{name}: table {root} ready in {time.perf_counter() - t0:.0f} s", flush=True)
        for budget in args.budgets:
            out = cache / "variants" / f"{name}-{budget}"
            t0 = time.perf_counter()
            [r] = prune(model, tables=root, devices=key, budget=budget, out=out, steps=args.steps, batch=batch,
                        round_to=round_to, max_choices=max_choices, input_size=size,
                        num_classes=10 if size else None, overwrite=True, verify_rounds=args.verify_rounds)
            wall = time.perf_counter() - t0
            v = r.report["verification"]
            rounds = sum(1 for x in v["rounds"] if not x["final"])
            rows.append(dict(case=name, model=model, batch=batch, size=size, budget=budget, folder=str(r.folder),
                             rounds=rounds, wall_s=wall, verdict=v["verdict"], note=v["note"],
                             in_run_share=v["share"]))
            print(f"  {budget}: {v['verdict']} in {rounds} rounds, {wall:.0f} s ({v['note'] or 'ok'})", flush=True)
    print(f"\nfresh-process check (variant beside its dense model, interleaved rounds, {args.fresh_processes} "
          "processes, fastest kept):")
    for name in dict.fromkeys(r["case"] for r in rows):
        model, batch, size, _, _ = CASES[name]
        mine = [r for r in rows if r["case"] == name]
        best: dict[str, float] = {}
        for i in range(args.fresh_processes):
            js = cache / f"measured-{name}-{i}.json"
            cmd = [sys.executable, str(HERE / "measure_variants.py"), "--dense", model, "--batch", str(batch),
                   "--memory-format", "nhwc", "--threads", str(args.threads), "--rounds", str(args.fresh_rounds),
                   "--json", str(js), *[r["folder"] for r in mine]]
            if size:
                cmd += ["--input-size", str(size), "--num-classes", "10"]
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            for net, rec in json.loads(js.read_text())["networks"].items():
                best[net] = min(rec["ms"], best.get(net, rec["ms"]))
        for r in mine:
            r["fresh_fraction"] = best[r["folder"]] / best["dense"]
            r["fresh_share"] = r["fresh_fraction"] / r["budget"]
    print("\n| model | setting | budget | rounds | prune wall s | in-run verdict | fresh: of dense | fresh: of budget |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        setting = f"b{r['batch']}" + (f" 3x{r['size']}x{r['size']}" if r["size"] else "")
        print(f"| {r['model']} | {setting} | {r['budget']} | {r['rounds']} | {r['wall_s']:.0f} | {r['verdict']} | "
              f"{r['fresh_fraction']:.3f} | {r['fresh_share']:.3f} |")
    inside = sum(1 for r in rows if 0.95 <= r["fresh_share"] <= 1.0)
    print(f"\n{inside} of {len(rows)} variants within [0.95, 1.00] of their budget re-measured in a fresh process; "
          f"load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    (cache / "budgets.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
