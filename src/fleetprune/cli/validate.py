"""``fleetprune validate``: measured against predicted latency of random variants on this machine."""

from __future__ import annotations

import argparse

from tqdm import tqdm


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="measure random width plans on this machine and report how well the table predicts them",
        description="Draw N random width plans (plus the dense model), predict each from the device's "
        "table, measure each end to end here, report the error and fit a correction.",
    )
    p.add_argument("model", help="model name (see `fleetprune profile --help` for the list)")
    p.add_argument("--tables", default="tables", help="table root (default: ./tables)")
    p.add_argument("--device", required=True, help="device key of the table; must be this machine")
    p.add_argument("--variants", type=int, default=20, help="random width plans (default 20)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--memory-format", default="nhwc", choices=["nchw", "nhwc"])
    p.add_argument("--round-to", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all of this machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="short timing protocol (noisier)")
    p.add_argument("--no-fit", action="store_true", help="do not fit or store a correction")
    p.set_defaults(func=run)


def _line(label: str, f: dict) -> str:
    return (
        f"{label:<10} n={f['n']:<3} within 5%: {f['within_5']:6.1%}  within 10%: {f['within_10']:6.1%}  "
        f"median |err|: {f['median_abs_error']:6.2%}  bias: {f['bias']:+6.2%}  spearman: {f['spearman']:.3f}"
    )


def run(args: argparse.Namespace) -> int:
    from fleetprune.api.validate import validate
    from fleetprune.profiler import TimingProtocol

    bar = tqdm(total=args.variants + 1, desc=f"validate {args.device}", unit="net")

    def progress(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    try:
        s = validate(
            args.model, args.tables, args.device, variants=args.variants, batch=args.batch,
            dtype=args.dtype, memory_format=args.memory_format, round_to=args.round_to, seed=args.seed,
            threads=args.threads, protocol=TimingProtocol.quick() if args.quick else None,
            fit=not args.no_fit, progress=progress,
        )
    finally:
        bar.close()
    print(f"{s.model} on {s.device_key}: dense measured {s.rows[0]['measured_ms']:.3f} ms")
    print(_line("table", s.to_dict()))
    if s.correction:
        c = s.correction
        print(f"fitted correction: measured = {c['a']:.4f} * layer_sum + {c['b']:.4f} ms (stored in the table)")
        print(_line("corrected", s.after) + f"  (held-out: {s.after['held_out']})")
    print(f"rows written to {args.tables.rstrip('/')}/validation.parquet")
    return 0
