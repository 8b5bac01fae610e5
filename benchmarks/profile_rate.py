"""How long would a model's whole table take to measure on this CPU?

Builds the model's plan, draws a seeded random sample of its configurations, measures the sample
with the profiler's real protocol, and extrapolates to the whole set (the sample is drawn
uniformly, so the mean time per configuration carries over). Prints the measured sample time and
the extrapolation, clearly labelled as such.

    python benchmarks/profile_rate.py --model resnet50 --round-to 32 --sample 200
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from datetime import datetime, timezone

import torch

from fleetprune import models
from fleetprune.profiler import TimingProtocol, TorchTimingBackend, cpu_device, profile_configs
from fleetprune.pruner.plan import build_plan
from fleetprune.pruner.variant import example_input


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--round-to", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--memory-format", default="nhwc", choices=["nchw", "nhwc"])
    ap.add_argument("--sample", type=int, default=200, help="configurations to measure")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    shape = models.input_shape(args.model)
    plan = build_plan(models.create(args.model), example_input(shape, batch=args.batch), round_to=args.round_to,
                      dtype="fp32", memory_format=args.memory_format)
    configs = plan.configs()
    sample = random.Random(args.seed).sample(configs, min(args.sample, len(configs)))
    device = cpu_device(args.threads)
    backend = TorchTimingBackend(device, TimingProtocol())
    t0 = time.perf_counter()
    rows = list(profile_configs(sample, backend, seed=args.seed))
    took = time.perf_counter() - t0
    noisy = sum(bool(r["noisy"]) for r in rows)
    per = took / len(rows)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  {platform.processor() or device.name}  "
          f"device {device.key}  torch {torch.__version__}")
    print(f"{args.model} at {shape}, batch {args.batch}, fp32, {args.memory_format}, round_to {args.round_to}: "
          f"{len(configs)} configurations")
    print(f"measured a random sample of {len(rows)}: {took:.1f} s ({per:.3f} s each, {1 / per:.2f} configs/s, "
          f"{noisy} flagged noisy)")
    print(f"extrapolated whole table: {per * len(configs) / 60:.1f} min (estimate from the sample, not a full run)")


if __name__ == "__main__":
    main()
