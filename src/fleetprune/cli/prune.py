"""``fleetprune prune MODEL --tables ROOT --device DEV[,DEV...]|all --budget B --out DIR``."""

from __future__ import annotations

import argparse
import os
import sys

from fleetprune.cli.fleet import input_size


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``prune`` verb to the ``fleetprune`` parser."""
    p = subparsers.add_parser(
        "prune",
        help="prune a model separately for each device from that device's latency table",
        description="For each device: SP-LAMP scores and a multiple-choice knapsack over the device's "
        "measured layer latencies, in K progressive steps, then physical channel removal. Writes "
        "DIR/<device>/ (widths.json, weights.pt, model.ts, report.json) and DIR/summary.json.",
    )
    p.add_argument("model", metavar="MODEL", help="model name, e.g. resnet56, resnet18, mobilenet_v2")
    p.add_argument("--tables", default="tables", metavar="ROOT", help="table root (default: ./tables)")
    p.add_argument("--device", required=True, metavar="DEV[,DEV...]|all",
                   help="device keys of the table root, comma-separated, or 'all'")
    p.add_argument("--budget", required=True,
                   help="latency budget: a fraction of dense (0.5, 50%%), an absolute time (12ms, 800us) "
                   "or a speed-up (2x)")
    p.add_argument("--steps", type=int, default=30, metavar="K", help="progressive pruning steps (default 30)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the variants")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the variants of these devices in a non-empty --out")
    p.add_argument("--weights", metavar="CKPT", help="local checkpoint (state_dict) of the dense model")
    p.add_argument("--num-classes", type=int, help="classifier outputs, if not the model's default")
    p.add_argument("--input-size", metavar="H[xW]", help="input size instead of the model's default (e.g. 64)")
    p.add_argument("--method", default="sp_lamp", choices=["sp_lamp", "l1", "random", "uniform"],
                   help="channel selection (default sp_lamp)")
    p.add_argument("--coupled-reduce", choices=["per_layer", "balanced", "concat"],
                   help="how SP-LAMP scores channels shared by several convs (a residual stream): per_layer (default) "
                        "sums each conv's LAMP score, balanced/concat run one LAMP over the set")
    p.add_argument("--solver", default="dp", choices=["dp", "exact"],
                   help="dp: multiple-choice knapsack (default); exact: MILP with c_in/c_out coupling")
    p.add_argument("--batch", type=int, help="batch size to prune for (default: the table's only one)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="dtype (default: the table's only one)")
    p.add_argument("--memory-format", choices=["nchw", "nhwc"], help="memory format (default: the table's only one)")
    p.add_argument("--round-to", type=int, help="channel alignment of units (default 16 for fp32, else 8)")
    p.add_argument("--max-choices", type=int, default=32,
                   help="most width choices per channel group (default 32); must match the profiled table")
    p.add_argument("--no-measure", action="store_true",
                   help="measure nothing: every variant is pruned open-loop from its table (predicted only)")
    p.add_argument("--verify-rounds", type=int, default=4, metavar="N",
                   help="closed loop: measure each variant on its device beside the dense model and re-solve until "
                   "it lands within 0.95-1.00 of the budget, at most N rounds (default 4; 0: open loop, the final "
                   "variant still measured)")
    p.add_argument("--ray-address", default="none", metavar="none|local|auto|HOST:PORT",
                   help="where devices other than this machine are measured: none (default: this machine only; "
                   "the others are pruned open-loop, 'predicted only'), or a Ray cluster with nodes of their types")
    p.add_argument("--service", metavar="URL",
                   help="a running `fleetprune serve`: devices other than this machine are measured on its replicas")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random starting weights when no --weights are given (default 0)")
    p.add_argument("--latency-fit", choices=["two-point", "offset"], default="two-point",
                   help="on this machine, without a validate correction: two-point (default) fits a * layer_sum + b "
                   "through the dense and the narrowest network measured end to end; offset adds the dense "
                   "model's excess over its layer sum as a constant")
    p.add_argument("--quick", action="store_true", help="short timing protocol for the measurements (noisier)")
    p.add_argument("--no-report", action="store_true", help="do not write DIR/report.html")
    p.add_argument("--data", metavar="PATH", default=os.environ.get("FLEETPRUNE_CIFAR"),
                   help="CIFAR-10 Parquet file for fine-tuning between steps (with --finetune-iters)")
    p.add_argument("--finetune-iters", type=int, default=0, metavar="N",
                   help="SGD iterations of fine-tuning after each step (default 0: none)")
    p.set_defaults(func=run)


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f} ms"


def run(args: argparse.Namespace) -> int:
    from fleetprune.api import quick_protocol
    from fleetprune.api.prune import prune
    from fleetprune.errors import DataError, FleetpruneError

    finetune = None
    if args.finetune_iters < 0:
        raise FleetpruneError("--finetune-iters must be >= 0")
    if args.finetune_iters:
        if not args.data:
            raise DataError("--finetune-iters needs the training data: pass --data PATH to cifar10-jpeg.parquet")
        from fleetprune.training import load_cifar10, make_finetune_hook

        data = load_cifar10(args.data)

        def finetune(device_key: str):  # noqa: ANN202 - a fresh hook per device
            return make_finetune_hook(data, iters_per_step=args.finetune_iters, total_steps=args.steps)

    printed: list[str] = []

    def done(r) -> None:  # noqa: ANN001
        if not printed:
            print(f"{'device':<36} {'dense':>12} {'budget':>12} {'predicted':>12} {'measured':>12}  verdict")
        printed.append(r.device_key)
        v = r.report.get("verification") or {}
        rounds = sum(1 for x in v.get("rounds", []) if not x.get("final"))
        extra = f" ({rounds} round{'s' if rounds != 1 else ''})" if rounds else ""
        note = f"; {v['note']}" if v.get("note") and r.verification != "met" else ""
        # measured on the device: the dense model beside the variant, and the budget taken of it
        dense, budget = r.dense_ms, r.budget_ms
        if v.get("dense_measured_ms") and r.report.get("budget_relative"):
            dense, budget = v["dense_measured_ms"], v["dense_measured_ms"] * r.budget_ms / r.dense_ms
        print(f"{r.device_key:<36} {_fmt(dense):>12} {_fmt(budget):>12} {_fmt(r.predicted_ms):>12} "
              f"{_fmt(r.measured_ms):>12}  {r.verdict}{extra}{note}", flush=True)

    results = prune(
        args.model, tables=args.tables, devices=args.device, budget=args.budget, out=args.out, steps=args.steps,
        weights=args.weights, num_classes=args.num_classes, input_size=input_size(args.input_size),
        method=args.method, solver=args.solver, batch=args.batch, dtype=args.dtype,
        memory_format=args.memory_format, round_to=args.round_to, max_choices=args.max_choices,
        overwrite=args.overwrite, verify_rounds=args.verify_rounds, ray_address=args.ray_address, seed=args.seed,
        service=args.service,
        finetune=finetune, measure=not args.no_measure, latency_fit=args.latency_fit,
        importance_kwargs={"coupled_reduce": args.coupled_reduce} if args.coupled_reduce else None,
        protocol=quick_protocol() if args.quick else None, on_device_done=done,
    )
    print(f"{len(results)} variant{'s' if len(results) != 1 else ''} written to {args.out}")
    if not args.no_report:
        from fleetprune.errors import ReportError
        from fleetprune.report import write_variants_report

        try:
            print(f"report: {write_variants_report(args.out)}")
        except ReportError as exc:  # the variants are written; a failed report must not fail the prune
            print(f"warning: no report: {exc}", file=sys.stderr)
    return 0
