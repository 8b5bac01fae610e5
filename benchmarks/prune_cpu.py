"""Predicted versus measured latency of pruned variants on this CPU (CIFAR ResNet-56 by default).

Profiles the model's layer configurations on this CPU (default timing protocol, resumable: rows the
table holds are not measured again), prunes the model for each budget with the table, measures the
exported (BN-folded) variant end to end, and prints one line per budget:

    .venv/bin/python benchmarks/prune_cpu.py --model resnet56 --batch 1 --budgets 0.7 0.5

Start the process with the allocator settings of DESIGN.md (MALLOC_MMAP_THRESHOLD_=67108864
MALLOC_TRIM_THRESHOLD_=134217728) or let the profiler's in-process tuning do it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

from fleetprune import models
from fleetprune.api import prune
from fleetprune.profiler import TimingProtocol, TorchTimingBackend, cpu_device, profile_configs, provenance
from fleetprune.pruner.plan import build_plan
from fleetprune.pruner.variant import example_input
from fleetprune.tables import TableStore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--memory-format", default="nchw", choices=["nchw", "nhwc"])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tables", default=None, help="table root to reuse (default: a new temporary one)")
    p.add_argument("--out", default=None, help="variants folder (default: temporary)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    device = cpu_device(args.threads)
    protocol = TimingProtocol.quick() if args.quick else TimingProtocol()
    root = args.tables or tempfile.mkdtemp(prefix="fp-bench-tables-")
    store = TableStore(root)
    plan = build_plan(models.create(args.model), example_input(models.input_shape(args.model), args.batch),
                      round_to=args.round_to, memory_format=args.memory_format)
    todo = [c for c in plan.configs() if c.key not in store.measured_keys(device.key)]
    start = time.perf_counter()
    if todo:
        rows = list(profile_configs(todo, TorchTimingBackend(device, protocol)))
        store.write(device.key, rows, provenance(device, protocol))
    print(f"{args.model} batch {args.batch} on {device.key} ({device.name}): {len(plan.configs())} configurations, "
          f"{len(todo)} profiled in {time.perf_counter() - start:.0f} s, table {root}")
    out = args.out or tempfile.mkdtemp(prefix="fp-bench-variants-")
    print(f"{'budget':>6} {'dense meas':>11} {'target':>9} {'predicted':>10} {'measured':>9} {'pred/meas-1':>11} "
          f"{'solver s':>8}")
    for budget in args.budgets:
        [r] = prune(args.model, tables=root, devices=device.key, budget=budget, steps=args.steps,
                    out=os.path.join(out, f"b{budget}"), round_to=args.round_to, batch=args.batch,
                    memory_format=args.memory_format, protocol=protocol)
        err = (r.predicted_ms - r.measured_ms) / r.measured_ms
        print(f"{budget:>6} {r.dense_measured_ms:>9.3f}ms {r.budget_ms:>7.3f}ms {r.predicted_ms:>8.3f}ms "
              f"{r.measured_ms:>7.3f}ms {err:>+10.1%} {r.report['solver_time_s']:>8.2f}")
        print("   widths", json.dumps(r.widths))
        print(f"   fixed part {r.fixed_ms:.3f} ms ({r.fixed_source}); measured as {r.report['measured_as']}")


if __name__ == "__main__":
    main()
