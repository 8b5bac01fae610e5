"""How repeatable are profiler latencies between two processes, and how fast does it profile?

Measures the same 20 layer configurations (a CIFAR-ResNet-like mix) in two separate Python
processes, one after the other, and prints the median relative difference of the two runs'
latencies (the protocol's statistic: the minimum by default), of their medians and of their p10s,
the within-run spread, and configurations per second. The relative difference of one
configuration is |a - b| / mean(a, b).

    python benchmarks/profile_noise.py                       # default protocol, in-process mallopt
    python benchmarks/profile_noise.py --threads 1 --statistic median
    python benchmarks/profile_noise.py --protocol quick
    python benchmarks/profile_noise.py --compare-allocators  # none vs env vars vs in-process mallopt

``--allocator`` picks how the measuring processes tune glibc's allocator: ``mallopt`` (the
profiler's own ``tune_allocator``, the default), ``env`` (``ALLOCATOR_ENV`` in the child's
environment, no mallopt), or ``none``. The figure depends on how busy the machine is: check the
load averages printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CIFAR_MIX = [
    # (op, cin, cout, k, stride, pad, in_hw, batch, memory_format, act)
    ("conv", 3, 16, 3, 1, 1, 32, 1, "nchw", "relu"),    # stem
    ("conv", 16, 16, 3, 1, 1, 32, 1, "nchw", "relu"),   # stage 1
    ("conv", 8, 16, 3, 1, 1, 32, 1, "nchw", "relu"),
    ("conv", 16, 8, 3, 1, 1, 32, 1, "nchw", "none"),
    ("conv", 16, 32, 3, 2, 1, 32, 1, "nchw", "relu"),   # stage 2 entry
    ("conv", 16, 32, 1, 2, 0, 32, 1, "nchw", "none"),   # downsample
    ("conv", 32, 32, 3, 1, 1, 16, 1, "nchw", "relu"),
    ("conv", 24, 32, 3, 1, 1, 16, 1, "nchw", "relu"),
    ("conv", 32, 24, 3, 1, 1, 16, 1, "nchw", "none"),
    ("conv", 32, 64, 3, 2, 1, 16, 1, "nchw", "relu"),   # stage 3 entry
    ("conv", 32, 64, 1, 2, 0, 16, 1, "nchw", "none"),
    ("conv", 64, 64, 3, 1, 1, 8, 1, "nchw", "relu"),
    ("conv", 48, 64, 3, 1, 1, 8, 1, "nchw", "relu"),
    ("conv", 64, 48, 3, 1, 1, 8, 1, "nchw", "none"),
    ("conv", 16, 16, 3, 1, 1, 32, 1, "nhwc", "relu"),
    ("conv", 32, 32, 3, 1, 1, 16, 1, "nhwc", "relu"),
    ("conv", 64, 64, 3, 1, 1, 8, 1, "nhwc", "relu"),
    ("conv", 16, 16, 3, 1, 1, 32, 32, "nchw", "relu"),  # batch 32: tensors past glibc's mmap threshold
    ("conv", 32, 32, 3, 1, 1, 16, 32, "nchw", "relu"),
    ("linear", 64, 10, 1, 1, 0, 1, 1, "nchw", "none"),  # classifier
]


def _configs():
    from fleetprune.tables.config import LayerConfig

    out = []
    for op, cin, cout, k, s, p, hw, batch, fmt, act in CIFAR_MIX:
        out.append(LayerConfig(op, cin, cout, kh=k, kw=k, sh=s, sw=s, ph=p, pw=p, in_h=hw, in_w=hw,
                               batch=batch, memory_format=fmt, act=act))
    return out


def _protocol(name: str, statistic: str = "min"):
    import dataclasses

    from fleetprune.profiler import TimingProtocol

    protocol = TimingProtocol.quick() if name == "quick" else TimingProtocol()
    return dataclasses.replace(protocol, statistic=statistic)


def worker(args: argparse.Namespace) -> None:
    """One measuring process: print one JSON line per configuration, then a summary line."""
    from fleetprune.profiler import TorchTimingBackend, build_layer, cpu_device, profile_configs, time_callable

    import torch

    device = cpu_device(args.threads)
    protocol = _protocol(args.protocol, args.statistic)
    if args.allocator == "mallopt":
        backend = TorchTimingBackend(device, protocol)  # the profiler's own path: tunes in-process
    else:
        class Untuned:  # same build and timing, allocator left as the environment set it
            def __init__(self):
                self.device, self.protocol = device, protocol

            def measure(self, config):
                module, x = build_layer(config, device)
                with torch.inference_mode():
                    return time_callable(lambda: module(x), device, protocol)

        backend = Untuned()
    import resource

    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    rows = list(profile_configs(_configs(), backend, seed=args.seed))
    elapsed = time.perf_counter() - start
    # Minor page faults are how an untuned allocator shows itself (buffers unmapped and faulted
    # in again on every call), and unlike times they do not depend on machine load.
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    for r in rows:
        print(json.dumps({"key": r["key"], "lat": r["lat_ms"], "median": r["lat_ms_median"], "p10": r["lat_ms_p10"],
                          "p90": r["lat_ms_p90"], "n": r["n_samples"], "noisy": r["noisy"]}))
    print(json.dumps({"elapsed_s": elapsed, "device": device.key, "minor_faults": faults}))


def _run_once(args: argparse.Namespace, seed: int, allocator: str) -> tuple[dict, float, int]:
    from fleetprune.profiler import ALLOCATOR_ENV

    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    if allocator == "env":
        env.update(ALLOCATOR_ENV)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(seed),
           "--threads", str(args.threads), "--protocol", args.protocol, "--allocator", allocator,
           "--statistic", args.statistic]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    rows, elapsed, faults = {}, 0.0, 0
    for line in out.stdout.splitlines():
        rec = json.loads(line)
        if "key" in rec:
            rows[rec["key"]] = rec
        else:
            elapsed, faults = rec["elapsed_s"], rec["minor_faults"]
    return rows, elapsed, faults


def compare(args: argparse.Namespace, allocator: str) -> dict:
    """Two processes, one after the other; returns the figures."""
    a, ta, fa = _run_once(args, 0, allocator)
    b, tb, fb = _run_once(args, 1, allocator)
    def rel_diffs(field: str) -> list[float]:
        return sorted(abs(a[k][field] - b[k][field]) / ((a[k][field] + b[k][field]) / 2) for k in a)

    # The table's latency (the protocol's statistic), and the median and p10 beside it:
    # pre-emption by other work only ever adds time, so on a busy machine the minimum and the p10
    # are less disturbed than the median; a large gap between the figures means load.
    diffs = rel_diffs("lat")
    spreads = [(r["p90"] - r["p10"]) / r["median"] for r in list(a.values()) + list(b.values())]
    noisy = sum(r["noisy"] for r in list(a.values()) + list(b.values()))
    return {
        "allocator": allocator,
        "median_rel_diff": statistics.median(diffs),
        "p90_rel_diff": diffs[int(0.9 * (len(diffs) - 1))],
        "max_rel_diff": diffs[-1],
        "median_rel_diff_median": statistics.median(rel_diffs("median")),
        "median_rel_diff_p10": statistics.median(rel_diffs("p10")),
        "median_spread": statistics.median(spreads),
        "noisy_rows": noisy,
        "configs_per_s": 2 * len(a) / (ta + tb),
        "faults_per_config": (fa + fb) / (2 * len(a)),
        "mean_ms": {k: (a[k]["lat"], b[k]["lat"]) for k in a},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--protocol", choices=["default", "quick"], default="default")
    parser.add_argument("--allocator", choices=["mallopt", "env", "none"], default="mallopt")
    parser.add_argument("--statistic", choices=["min", "median"], default="min",
                        help="the protocol's latency statistic (default min, the profiler's default)")
    parser.add_argument("--compare-allocators", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="print every configuration's two latencies")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    if args.worker:
        worker(args)
        return

    from fleetprune.profiler import cpu_device

    device = cpu_device(args.threads)
    print(f"machine: {device.name} ({device.fingerprint['cpu_capability']}), "
          f"{device.fingerprint['logical_cpus']} logical CPUs, timing with {args.threads} thread(s); "
          f"device key {device.key}")
    print(f"protocol: {args.protocol} {_protocol(args.protocol, args.statistic).to_dict()}")
    print(f"configurations: {len(CIFAR_MIX)} (CIFAR-ResNet-like, fp32, batch 1 and 32), two processes in turn")
    print("load average before: %.2f %.2f %.2f" % os.getloadavg())
    allocators = ["none", "env", "mallopt"] if args.compare_allocators else [args.allocator]
    for allocator in allocators:
        res = compare(args, allocator)
        print(f"allocator={allocator:8s} latency ({args.statistic}) median rel. diff between processes "
              f"{100 * res['median_rel_diff']:.1f}% (p90 {100 * res['p90_rel_diff']:.1f}%, max "
              f"{100 * res['max_rel_diff']:.1f}%; of the medians {100 * res['median_rel_diff_median']:.1f}%, "
              f"of the p10s {100 * res['median_rel_diff_p10']:.1f}%); "
              f"median within-run spread (p90-p10)/median {100 * res['median_spread']:.1f}%; "
              f"noisy rows {res['noisy_rows']}/{2 * len(CIFAR_MIX)}; {res['configs_per_s']:.2f} configurations/s; "
              f"{res['faults_per_config']:.0f} minor page faults per configuration")
        if args.verbose:
            for key, (ma, mb) in res["mean_ms"].items():
                print(f"    {key}: {ma:.4f} ms vs {mb:.4f} ms")
    print("load average after: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
