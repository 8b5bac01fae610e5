"""A whole multi-target prune of ResNet-50, without fine-tuning: wall time and peak memory.

Four synthetic device tables (fake timing, four different cost shapes: compute-bound,
memory-bound, launch-bound and a 64-channel staircase) are written for every configuration of the
ResNet-50 plan; then one ``fleetprune.api.prune`` call prunes for all four devices with K steps and
exports four variants. Peak memory is the process's maximum resident set size.

    python benchmarks/prune_targets.py --steps 30 --budget 0.5
"""

from __future__ import annotations

import argparse
import math
import resource
import tempfile
import time
from datetime import datetime, timezone

from fleetprune import models
from fleetprune.api.prune import prune
from fleetprune.pruner.plan import build_plan
from fleetprune.pruner.variant import example_input
from fleetprune.tables import TableStore, make_row


def _staircase(step: int):
    return lambda c: math.ceil(c / step) * step


SHAPES = {
    # name: (MACs per ms, elements per ms, launch ms, channel step)
    "fake-compute": (2.0e7, 1e9, 0.005, 16),
    "fake-memory": (1.0e9, 2.0e5, 0.005, 8),
    "fake-launch": (1.0e8, 5.0e6, 0.2, 16),
    "fake-tile64": (3.0e7, 1e7, 0.01, 64),
}


def latency(config, macs_per_ms: float, elem_per_ms: float, launch_ms: float, step: int) -> float:
    up = _staircase(step)
    cin, cout = up(config.cin), up(config.cout)
    oh, ow = config.out_hw
    per_group_in = 1 if config.op == "dwconv" else cin / config.groups
    macs = config.batch * oh * ow * config.kh * config.kw * cout * per_group_in
    elements = config.batch * (cin * config.in_h * config.in_w + cout * oh * ow)
    return launch_ms + macs / macs_per_ms + elements / elem_per_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--budget", default="0.5")
    ap.add_argument("--round-to", type=int, default=16)
    ap.add_argument("--solver", default="dp", choices=["dp", "exact"])
    args = ap.parse_args()

    shape = models.input_shape(args.model)
    t0 = time.perf_counter()
    plan = build_plan(models.create(args.model), example_input(shape), round_to=args.round_to,
                      dtype="fp32", memory_format="nhwc")
    configs = plan.configs()
    root = tempfile.mkdtemp(prefix="fp-targets-")
    store = TableStore(root)
    for key, params in SHAPES.items():
        rows = []
        for c in configs:
            ms = latency(c, *params)
            rows.append(make_row(c, key, ms, ms * 0.99, ms * 1.01, 15))
        store.write(key, rows, {"device_key": key, "device_name": f"{key} (fake timing)",
                                "fingerprint": {"fake": True}, "threads": 1})
    t_tables = time.perf_counter() - t0

    out = tempfile.mkdtemp(prefix="fp-targets-out-")
    t1 = time.perf_counter()
    results = prune(args.model, tables=root, devices="all", budget=args.budget, out=out, steps=args.steps,
                    solver=args.solver, round_to=args.round_to, measure=False, overwrite=True)
    t_prune = time.perf_counter() - t1
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # ru_maxrss is KiB on Linux

    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  {args.model}, {len(configs)} configurations x "
          f"{len(SHAPES)} fake devices, budget {args.budget}, K={args.steps}, solver {args.solver}")
    print(f"tables written in {t_tables:.1f} s; prune of {len(results)} targets in {t_prune:.1f} s "
          f"({t_prune / len(results):.1f} s per target); peak memory {peak_gb:.2f} GB")
    for r in results:
        solver_s = sum(s.get("solver_time_s", 0.0) for s in r.report.get("steps", []))
        kept = sum(r.widths.values()) / sum(g.width for g in plan.groups)
        print(f"  {r.device_key:<14} dense {r.dense_ms:8.3f} ms  budget {r.budget_ms:8.3f}  predicted "
              f"{r.predicted_ms:8.3f}  kept channels {kept:5.1%}  solver total {solver_s:5.2f} s")
    distinct = len({tuple(sorted(r.widths.items())) for r in results})
    print(f"distinct width plans: {distinct} of {len(results)}")


if __name__ == "__main__":
    main()
