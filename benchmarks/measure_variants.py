"""Measure saved variants (and the dense model) side by side on this CPU: interleaved rounds, best of each.

Whole-network latency on a shared VM drifts by 10-30% within a minute (BENCHMARKS.md), so two
networks measured minutes apart cannot be compared. This script loads every variant folder given
(``fleetprune.load_variant``: the architecture from ``widths.json``; the weights do not change the
latency), optionally the dense model by name, and measures them in ``--rounds`` interleaved rounds
(network 1, 2, ..., n, then again), each measurement with the profiler's protocol and BN folded. Per
network it keeps the best round (the protocol's statistic, the minimum by default: other tenants only
add time) and reports it in ms and, with ``--dense``, as a fraction of the dense model measured in
the same rounds, which is what a budget "fraction of dense" means.

    .venv/bin/python benchmarks/measure_variants.py --dense resnet20 --batch 64 --memory-format nhwc \\
        .benchcache/cifar/variants/*/sp_lamp-0.5/cpu-amd-epyc-t1 --json /tmp/measured.json

Run it in a fresh process: measurements taken right after training in the same process came out up
to 60% slower (BENCHMARKS.md, CIFAR quick run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def measure_side_by_side(named_models: dict, input_shapes: dict, batch: int, memory_format: str, threads: int,
                         rounds: int, dtype: str = "fp32") -> dict[str, dict]:
    """``{name: {"ms": best, "rounds_ms": [...]}}`` over ``rounds`` interleaved rounds.

    Every network is prepared once (copied, BN folded, in the memory format; ``deployed_forward``)
    and timed once before the rounds, so no round pays for fresh weight tensors.
    """
    import torch

    from fleetprune.profiler import TimingProtocol, cpu_device, deployed_forward, time_callable

    device = cpu_device(threads)
    protocol = TimingProtocol()
    forwards = {name: deployed_forward(model, (batch, *input_shapes[name]), device, dtype, memory_format)
                for name, model in named_models.items()}
    out: dict[str, dict] = {name: {"rounds_ms": []} for name in named_models}
    with torch.inference_mode():
        for fwd in forwards.values():
            time_callable(fwd, device, TimingProtocol.quick())  # warm every network before the rounds
        for _ in range(max(1, rounds)):
            for name, fwd in forwards.items():
                out[name]["rounds_ms"].append(protocol.latency(time_callable(fwd, device, protocol)))
    for rec in out.values():
        rec["ms"] = min(rec["rounds_ms"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", help="variant folders (the per-device folder holding widths.json)")
    p.add_argument("--dense", metavar="MODEL", help="also measure this dense model; report fractions of it")
    p.add_argument("--input-size", type=int, help="the dense model's input H = W, if not its default")
    p.add_argument("--num-classes", type=int, help="the dense model's classifier outputs, if not its default")
    p.add_argument("--batch", type=int, required=True, help="batch of every measurement")
    p.add_argument("--memory-format", choices=["nchw", "nhwc"], default="nchw")
    p.add_argument("--threads", type=int, default=1, help="timing threads (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is kept (default 3)")
    p.add_argument("--json", metavar="OUT", help="write the figures here")
    args = p.parse_args(argv)
    if not args.folders and not args.dense:
        p.error("give variant folders and/or --dense MODEL")

    import torch

    from fleetprune import load_variant, models
    from fleetprune.errors import FleetpruneError

    torch.set_num_threads(args.threads)
    named, shapes = {}, {}
    if args.dense:
        named["dense"] = models.create(args.dense, **({"num_classes": args.num_classes} if args.num_classes else {}))
        shapes["dense"] = tuple(models.input_shape(args.dense))
        if args.input_size:
            shapes["dense"] = (shapes["dense"][0], args.input_size, args.input_size)
    for folder in args.folders:
        try:
            named[folder] = load_variant(folder)
            shapes[folder] = tuple(json.loads((Path(folder) / "widths.json").read_text())["input_shape"])
        except (FleetpruneError, OSError, KeyError, ValueError) as exc:
            print(f"error: {folder}: {exc}; pass the folder that holds widths.json and weights.pt", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    res = measure_side_by_side(named, shapes, args.batch, args.memory_format, args.threads, args.rounds)
    dense_ms = res["dense"]["ms"] if "dense" in res else None
    for name, rec in res.items():
        rec["fraction_of_dense"] = rec["ms"] / dense_ms if dense_ms else None
        frac = f"  {rec['fraction_of_dense']:.3f} of dense" if dense_ms else ""
        print(f"{rec['ms']:9.3f} ms{frac}  (rounds {', '.join(f'{x:.2f}' for x in rec['rounds_ms'])})  {name}")
    print(f"{len(res)} networks x {args.rounds} rounds, batch {args.batch} {args.memory_format}, {args.threads} "
          f"thread(s), {time.perf_counter() - t0:.0f} s, load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"batch": args.batch, "memory_format": args.memory_format,
                                               "threads": args.threads, "rounds": args.rounds,
                                               "networks": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
