"""How profiling one device type scales with its number of actors, and what Ray's start-up costs.

A simulated cluster (``ray.cluster_utils.Cluster``) gets 1, then 2, then 4 nodes of one fake GPU
type; each run profiles the same configurations with the fake backend sleeping a fixed time per
configuration, into a fresh table root. Reported per actor count: measuring time (first chunk
handed out to last chunk written), speedup over one actor (goal: >= 0.85 x actors), and start-up
(discovery + actors ready). Ray's own start-up is reported too: an embedded ``ray.init`` (in a
subprocess, since a process may only initialise Ray once), the simulated head and each node.

    python benchmarks/fleet_scaling.py [--configs 400] [--cost-ms 20] [--actors 1,2,4] [--repeats 2]

Sleeping actors need no CPU, so the figures measure the driver's scheduling and writing, not the
machine's cores; a loaded machine still slows the driver, Ray's processes and actor start-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TYPE = "FAKE_S"

_EMBEDDED = """
import time, ray
t0 = time.perf_counter()
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
t1 = time.perf_counter()
ray.shutdown()
print(t1 - t0, time.perf_counter() - t1)
"""


def configs(n: int) -> list:
    """``n`` distinct conv configurations (their shape does not matter to a fixed-cost fake)."""
    from fleetprune.tables import LayerConfig

    return [LayerConfig("conv", cin=8 + i % 64, cout=8 + i // 64, kh=3, kw=3, ph=1, pw=1, in_h=8, in_w=8)
            for i in range(n)]


def embedded_startup() -> tuple[float, float]:
    """(ray.init, ray.shutdown) seconds of an embedded instance, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _EMBEDDED], capture_output=True, text=True, timeout=300, check=True)
    init_s, shutdown_s = (float(x) for x in out.stdout.split())
    return init_s, shutdown_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=400, help="configurations per run (default 400)")
    parser.add_argument("--cost-ms", type=float, default=20.0, help="fake cost per configuration (default 20 ms)")
    parser.add_argument("--actors", default="1,2,4", help="actor counts (default 1,2,4)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per actor count; the median is kept")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    counts = sorted(int(x) for x in args.actors.split(","))
    logging.basicConfig(level=logging.WARNING)

    import ray
    from ray.cluster_utils import Cluster

    from fleetprune.cluster.run import profile_fleet
    from fleetprune.cluster.spec import BackendSpec

    init_s, shutdown_s = embedded_startup()
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=False))
    head_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
    connect_s = time.perf_counter() - t0
    node_s: list[float] = []
    cs = configs(args.configs)
    spec = BackendSpec.fake(args.cost_ms / 1e3)
    rows = []
    try:
        for n in counts:
            while len(node_s) < n:
                t0 = time.perf_counter()
                cluster.add_node(num_cpus=1, num_gpus=1, resources={f"accelerator_type:{TYPE}": 1})
                node_s.append(time.perf_counter() - t0)
            cluster.wait_for_nodes()
            measure, startup = [], []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory() as root:
                    summary = profile_fleet(cs, root, devices=TYPE, backend=spec)
                run = summary.device(TYPE)
                assert run.measured == len(cs) and len(run.actors) == n, (run.measured, len(run.actors))
                measure.append(run.seconds)
                startup.append(summary.startup_s)
            rows.append({"actors": n, "measure_s": statistics.median(measure), "runs_s": measure,
                         "startup_s": statistics.median(startup)})
    finally:
        ray.shutdown()
        cluster.shutdown()

    ideal_1 = len(cs) * args.cost_ms / 1e3
    base = rows[0]["measure_s"] * rows[0]["actors"]
    print(f"{len(cs)} configurations x {args.cost_ms:g} ms (fake backend): {ideal_1:.1f} s of work; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'actors':>6}  {'measure':>8}  {'ideal':>7}  {'speedup':>7}  {'per actor':>9}  {'start-up':>8}")
    for r in rows:
        r["speedup"] = base / r["measure_s"]
        r["efficiency"] = r["speedup"] / r["actors"]
        print(f"{r['actors']:>6}  {r['measure_s']:>7.2f}s  {ideal_1 / r['actors']:>6.2f}s  {r['speedup']:>6.2f}x  "
              f"{r['efficiency']:>9.2f}  {r['startup_s']:>7.2f}s")
    print(f"Ray start-up: embedded ray.init {init_s:.2f} s (shutdown {shutdown_s:.2f} s); simulated head "
          f"{head_s:.2f} s, connect {connect_s:.2f} s, each added node {statistics.median(node_s):.2f} s (median)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"configs": len(cs), "cost_ms": args.cost_ms, "rows": rows, "embedded_init_s": init_s,
                       "embedded_shutdown_s": shutdown_s, "head_s": head_s, "connect_s": connect_s,
                       "node_s": node_s, "loadavg": os.getloadavg()}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
