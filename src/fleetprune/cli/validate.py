"""``fleetprune validate``: measured against predicted latency of random variants on this machine."""

from __future__ import annotations

import argparse
import math
from typing import Any, Mapping

from tqdm import tqdm

from fleetprune.cli.fleet import input_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="measure random width plans on this machine and report how well the table predicts them",
        description="Draw N random width plans (plus the dense model), predict each from the device's "
        "table, measure each end to end here, report the error, fit a correction measured ~ a * layer_sum "
        "+ b and one factor per op kind on the dense model and half the variants, report both on the rest, and store "
        "the better in the table. Rows go to "
        "ROOT/validation.parquet.",
    )
    p.add_argument("model", metavar="MODEL", help="model name, e.g. resnet56, resnet18, mobilenet_v2")
    p.add_argument("--tables", default="tables", metavar="ROOT", help="table root (default: ./tables)")
    p.add_argument("--device", required=True, metavar="DEV", help="device key of the table; must be this machine")
    p.add_argument("--variants", type=int, default=20, metavar="N", help="random width plans (default 20)")
    p.add_argument("--input-size", metavar="H[xW]", help="input size instead of the model's default (e.g. 64)")
    p.add_argument("--batch", type=int, help="batch size (default: the table's only one)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="dtype (default: the table's only one)")
    p.add_argument("--memory-format", choices=["nchw", "nhwc"], help="memory format (default: the table's only one)")
    p.add_argument("--round-to", type=int, help="channel alignment of units (default 16 for fp32, else 8)")
    p.add_argument("--max-choices", type=int, default=32,
                   help="most width choices per channel group (default 32); as the table was profiled with")
    p.add_argument("--threads", type=int, help="CPU threads (default: the table's thread count)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random width plans (default 0)")
    p.add_argument("--quick", action="store_true", help="short timing protocol (noisier; default: the table's)")
    p.add_argument("--no-fit", action="store_true", help="do not fit or store a correction")
    p.add_argument("--passes", type=int, default=2,
                   help="measure every network this many times, in passes over all of them, keeping the fastest "
                        "(default 2)")
    p.set_defaults(func=run)


def parse_input_size(text: str | None, model_name: str, shape: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """``"64"`` or ``"64x48"`` as a ``(C, H, W)`` input shape with the model's channels; None stays None."""
    size = input_size(text)
    if size is None:
        return None
    from fleetprune import models

    channels = (shape or models.input_shape(model_name))[0]
    return (channels, *size)


def line(label: str, f: Mapping[str, Any]) -> str:
    """One line of fidelity figures."""
    rho = f["spearman"]
    return (
        f"{label:<22} n={f['n']:<3} within 5%: {_pct(f['within_5'])}  within 10%: {_pct(f['within_10'])}  "
        f"median |err|: {_pct(f['median_abs_error'], 2)}  bias: {_pct(f['bias'], 2, signed=True)}  "
        f"spearman: {'  n/a' if math.isnan(rho) else f'{rho:.3f}'}"
    )


def _pct(x: float, digits: int = 1, signed: bool = False) -> str:
    if x is None or math.isnan(x):
        return "   n/a"
    return f"{x:{'+' if signed else ''}7.{digits}%}"


def run(args: argparse.Namespace) -> int:
    from fleetprune.api import quick_protocol
    from fleetprune.api.validate import validate

    shape = parse_input_size(args.input_size, args.model)
    bars: list[tqdm] = []  # created once the checks pass, so an error is not printed under a bar

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=f"validate {args.model} on {args.device}", unit="measurement",
                             leave=False))
        bars[0].n = done
        bars[0].refresh()

    try:
        s = validate(
            args.model, args.tables, args.device, variants=args.variants, batch=args.batch, dtype=args.dtype,
            memory_format=args.memory_format, input_shape=shape, round_to=args.round_to,
            max_choices=args.max_choices, seed=args.seed,
            threads=args.threads, protocol=quick_protocol() if args.quick else None,
            fit=not args.no_fit, progress=progress, passes=args.passes,
        )
    finally:
        for bar in bars:
            bar.close()
    shape_text = "x".join(str(v) for v in s.input_shape)
    print(f"{s.model} ({shape_text}, batch {s.batch} {s.dtype} {s.memory_format}) on {s.device_key}, run {s.run_id}")
    print(f"dense: measured {s.dense_measured_ms:.4g} ms, layer sum {s.dense_layer_sum_ms:.4g} ms, "
          f"fixed part {s.fixed_ms:.4g} ms")
    print(line("layer sum only", s.raw))
    print(line("table + fixed part", s.to_dict()))
    if s.correction:
        c = s.correction
        print(f"fitted on the dense model + {c['n'] - 1} variants: measured = {c['a']:.4f} * layer_sum "
              f"{'+' if c['b'] >= 0 else '-'} {abs(c['b']):.4f} ms ({s.correction_note})")
        print(line("  held out, before", s.held_out_before))
        print(line("  held out, corrected", s.after))
    if s.per_kind:
        pk = s.per_kind
        factors = "  ".join(f"{k} {f:.3f}" for k, f in sorted(pk["factors"].items()))
        used = "stored" if s.correction_stored and "per_kind" in (s.correction or {}) else "not stored"
        print(f"per op kind ({used}): {factors}  constant {pk['b']:+.4f} ms")
        print(line("  held out, per kind", s.per_kind_after))
    if not s.priced_ops:
        print("note: the table has no op rows (adds, pools, activations...): priced from convs and linears alone")
    print(f"rows written to {s.path}")
    return 0
