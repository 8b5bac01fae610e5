"""How fast are the width solvers on a ResNet-50 plan?

Part 1 (this file so far): builds the ResNet-50 plan (``fleetprune.models.create('resnet50')``,
``build_plan`` at the given input size), a synthetic latency table for every configuration of the
plan (latency proportional to MACs, output channels on a 16-channel staircase), SP-LAMP scores of
the random-init network, then times one width choice at several budgets:

* the multiple-choice knapsack DP alone (``knapsack.solve_mckp``, frozen c_in weights already
  built) in ms per step, and the whole ``choose_widths(solver='dp')`` call including the option
  weights, verification and repair;
* ``choose_widths(solver='exact')``: the MILP (HiGHS) in seconds, with its size.

    python benchmarks/solver.py
    python benchmarks/solver.py --budgets 0.8 0.5 0.3 --time-limit 120 --skip-exact

Printed figures are single-process wall times on this machine; the DP figure is the median of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import pandas as pd
import torch

from fleetprune.models import create
from fleetprune.pruner.exact import build_coupled_problem
from fleetprune.pruner.knapsack import DEFAULT_RESOLUTION, integerise, solve_mckp
from fleetprune.pruner.latency import LatencyModel
from fleetprune.pruner.plan import build_plan
from fleetprune.pruner.scores import make_importance
from fleetprune.pruner.solve import choose_widths
from fleetprune.pruner.units import group_units
from fleetprune.tables.table import LatencyTable


def macs_ms(config, step: int = 16, ms_per_gmac: float = 0.25, launch_ms: float = 0.002) -> float:
    """Synthetic latency: a launch cost plus MACs with c_out rounded up to the staircase step."""
    if config.op != "dwconv":
        config = config.with_channels(config.cin, -(-config.cout // step) * step)
    return launch_ms + config.macs * 1e-9 * ms_per_gmac


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--hw", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--round-to", type=int, default=16)
    parser.add_argument("--max-choices", type=int, default=32)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.55, 0.3],
                        help="fractions of the dense modeled latency")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--time-limit", type=float, default=60.0, help="exact solver limit (s)")
    parser.add_argument("--skip-exact", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    torch.manual_seed(0)
    model = create(args.model).eval()
    t = time.perf_counter()
    plan = build_plan(model, torch.randn(args.batch, 3, args.hw, args.hw), round_to=args.round_to,
                      max_choices=args.max_choices)
    plan_s = time.perf_counter() - t
    configs = plan.configs()
    table = LatencyTable("synthetic-macs", {}, pd.DataFrame(
        {"key": [c.key for c in configs], "lat_ms": [macs_ms(c) for c in configs]}))
    lm = LatencyModel(plan, table)
    scores = make_importance("sp_lamp").scores(model, plan)
    units = {g.name: group_units(g, scores[g.name]) for g in plan.groups if g.prunable}
    options = {g: list(u.widths) for g, u in units.items()}
    n_opts = [len(o) for o in options.values()]
    dense, minimum = lm.dense_ms(), lm.min_latency()
    print(f"{args.model} @ {args.batch}x3x{args.hw}x{args.hw}: {len(plan.layers)} layers, {len(units)} classes, "
          f"{sum(n_opts)} options (max {max(n_opts)} per class), {len(configs)} table configs; plan built in "
          f"{plan_s:.1f} s")
    print(f"modeled dense {dense:.3f} ms, minimum {minimum:.3f} ms")
    if not args.skip_exact:
        prob = build_coupled_problem(lm, lm.full_widths(), options, {g: u.values for g, u in units.items()})
        print(f"exact MILP size: {sum(n_opts)} binaries, {prob.n_factor_variables} factor variables "
              f"in {len(prob.factors)} factors")

    print(f"{'budget':>8} {'B (int)':>8} {'DP ms':>8} {'1-solve':>8} {'pred':>8} {'value':>8} "
          f"{'refill':>8} {'pred':>8} {'value':>8} {'exact s':>8} {'pred':>8} {'value':>8} {'optimal':>7}")
    current = lm.full_widths()
    weights, constant = lm.option_weights(current, options)
    names = list(options)
    for frac in args.budgets:
        budget = frac * dense
        if budget < minimum:
            print(f"{frac:>8.2f} below the minimum {minimum:.3f} ms, skipped")
            continue
        delta = budget / (DEFAULT_RESOLUTION * len(names))
        inst = integerise([weights[g] for g in names], budget - constant, delta)
        dp_times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            solve_mckp([units[g].values for g in names], [weights[g] for g in names], budget - constant, delta=delta)
            dp_times.append((time.perf_counter() - t) * 1e3)
        halp_times, full_times = [], []
        for _ in range(max(args.repeats // 4, 1)):
            t = time.perf_counter()
            halp = choose_widths(plan, lm, scores, None, budget, solver="dp", refine=0)
            halp_times.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            dp = choose_widths(plan, lm, scores, None, budget, solver="dp")
            full_times.append((time.perf_counter() - t) * 1e3)
        line = (f"{frac:>8.2f} {inst.capacity:>8d} {statistics.median(dp_times):>8.1f} "
                f"{statistics.median(halp_times):>8.1f} {halp.predicted_ms:>8.3f} {halp.value:>8.2f} "
                f"{statistics.median(full_times):>8.1f} {dp.predicted_ms:>8.3f} {dp.value:>8.2f}")
        if not args.skip_exact:
            ex = choose_widths(plan, lm, scores, None, budget, solver="exact", time_limit_s=args.time_limit)
            line += (f" {ex.solver_s:>8.2f} {ex.predicted_ms:>8.3f} {ex.value:>8.2f} "
                     f"{str(ex.optimal) if ex.solver == 'exact' else 'fell back':>7}")
        print(line)
    print(f"budget: fraction of the modeled dense latency; B: DP capacity in integer units; DP ms: solve_mckp "
          f"alone, median of {args.repeats}; 1-solve: choose_widths(solver='dp', refine=0) in ms (HALP: frozen c_in, "
          "one DP, verify, repair); refill: the default choose_widths(solver='dp') in ms (adds the slack-refill "
          "bisection); exact s: HiGHS time; pred: modeled latency (ms) of the answer; value: kept SP-LAMP score")


if __name__ == "__main__":
    main()
