"""Predicted versus measured latency of pruned variants on this CPU (CIFAR ResNet-56 by default).

Profiles the model's layer configurations on this CPU (default timing protocol, resumable: rows the
table holds are not measured again), prunes the model for each budget with the table, then measures
the dense model and the exported variant end to end (BN folded) ``--rounds`` times, alternating, and
compares their latencies (the protocol's statistic, the minimum by default) with two predictions:
``offset`` (the pruner's: variant layer sum + fixed part, fixed = dense measured - dense layer sum)
and ``scale`` (variant layer sum * dense measured / dense layer sum). Two lines per budget (the
median and the minimum over the rounds), then the prune's own in-run figures with its latency model
(``--latency-fit``: two-point by default, see ``fleetprune.api.prune``):

    .venv/bin/python benchmarks/prune_cpu.py --model resnet56 --batch 16 --budgets 0.7 0.5
    .venv/bin/python benchmarks/prune_cpu.py --model mobilenet_v2 --input-size 64 --budgets 0.7 0.5

Start the process with the allocator settings of DESIGN.md (MALLOC_MMAP_THRESHOLD_=67108864
MALLOC_TRIM_THRESHOLD_=134217728) or let the profiler's in-process tuning do it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time

import statistics

from fleetprune import load_variant, models
from fleetprune.api import prune
from fleetprune.profiler import (
    TimingProtocol,
    TorchTimingBackend,
    cpu_device,
    measure_model,
    profile_configs,
    provenance,
)
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
    p.add_argument("--rounds", type=int, default=5, help="alternating dense/variant measurements (default 5)")
    p.add_argument("--input-size", type=int, default=None, help="H = W instead of the model's default (e.g. 64)")
    p.add_argument("--statistic", default="min", choices=["min", "median"], help="the protocol's latency statistic")
    p.add_argument("--latency-fit", default="two-point", choices=["two-point", "offset"],
                   help="the prune's latency model on this machine (default two-point)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    device = cpu_device(args.threads)
    protocol = TimingProtocol.quick() if args.quick else TimingProtocol()
    protocol = dataclasses.replace(protocol, statistic=args.statistic)
    root = args.tables or tempfile.mkdtemp(prefix="fp-bench-tables-")
    store = TableStore(root)
    sample = tuple(models.input_shape(args.model))
    if args.input_size:
        sample = (sample[0], args.input_size, args.input_size)
    plan = build_plan(models.create(args.model), example_input(sample, args.batch),
                      round_to=args.round_to, memory_format=args.memory_format)
    todo = [c for c in plan.configs() if c.key not in store.measured_keys(device.key, protocol.statistic)]
    start = time.perf_counter()
    if todo:
        rows = list(profile_configs(todo, TorchTimingBackend(device, protocol)))
        store.write(device.key, rows, provenance(device, protocol))
    print(f"{args.model} {'x'.join(map(str, sample))} batch {args.batch} on {device.key} ({device.name}), "
          f"latency = {protocol.statistic} of the timed blocks: {len(plan.configs())} configurations, "
          f"{len(todo)} profiled in {time.perf_counter() - start:.0f} s, table {root}")
    out = args.out or tempfile.mkdtemp(prefix="fp-bench-variants-")
    print(f"{'budget':>6} {'dense':>9} {'target':>9} {'variant':>9} {'offset':>9} {'err':>7} {'scale':>9} "
          f"{'err':>7} {'solver s':>8}   (ms; dense/variant over {args.rounds} alternating measurements)")
    dense = models.create(args.model)
    shape = (args.batch, *sample)
    for budget in args.budgets:
        [r] = prune(args.model, tables=root, devices=device.key, budget=budget, steps=args.steps,
                    out=os.path.join(out, f"b{budget}"), round_to=args.round_to, batch=args.batch,
                    memory_format=args.memory_format, protocol=protocol, input_size=args.input_size,
                    latency_fit=args.latency_fit)
        variant = load_variant(r.folder)
        dense_ms, variant_ms = [], []
        for _ in range(args.rounds):
            dense_ms.append(protocol.latency(measure_model(dense, shape, device, "fp32", args.memory_format, protocol)))
            variant_ms.append(protocol.latency(measure_model(variant, shape, device, "fp32", args.memory_format,
                                                             protocol)))
        s_dense = r.report["dense_layer_sum_ms"]
        s_var = r.predicted_ms - r.fixed_ms
        # over the rounds: the median is the typical round, the min the least disturbed one
        for label, stat in (("median of rounds", statistics.median), ("min of rounds", min)):
            md, mv = stat(dense_ms), stat(variant_ms)
            offset = s_var + max(0.0, md - s_dense)
            scale = s_var * md / s_dense
            print(f"{budget:>6} {md:>9.3f} {budget * md:>9.3f} {mv:>9.3f} {offset:>9.3f} {offset / mv - 1:>+7.1%} "
                  f"{scale:>9.3f} {scale / mv - 1:>+7.1%} {r.report['solver_time_s']:>8.2f}  {label}")
        print(f"   in-run: dense {r.dense_measured_ms:.3f}, budget {r.budget_ms:.3f}, predicted {r.predicted_ms:.3f}, "
              f"measured {r.measured_ms:.3f} ({r.predicted_ms / r.measured_ms - 1:+.1%}); dense spread "
              f"{min(dense_ms):.3f}-{max(dense_ms):.3f}, variant spread {min(variant_ms):.3f}-{max(variant_ms):.3f}")
        print(f"   latency model: {r.fixed_source}")
        print("   widths", json.dumps(r.widths))


if __name__ == "__main__":
    main()
