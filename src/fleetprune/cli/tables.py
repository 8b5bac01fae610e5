"""``fleetprune tables ls|show|validate|merge|diff``: look after the latency tables under a root."""

from __future__ import annotations

import argparse
import math
from typing import Any

DEFAULT_ROOT = "tables"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tables`` verb and its sub-verbs to the ``fleetprune`` parser."""
    root = argparse.ArgumentParser(add_help=False)
    root.add_argument(
        "--tables",
        metavar="ROOT",
        default=DEFAULT_ROOT,
        help=f"table root: a folder or a pyarrow filesystem URI (default: ./{DEFAULT_ROOT})",
    )
    p = subparsers.add_parser("tables", help="list, show, validate, merge and compare latency tables")
    sub = p.add_subparsers(dest="tables_verb", metavar="ACTION")
    sub.required = True

    ls = sub.add_parser("ls", parents=[root], help="list the devices with their row counts and provenance")
    from fleetprune.api.tables import OPS
    from fleetprune.cli.serve import add_service_option, tables_through_service

    add_service_option(ls, "read the tables")
    ls.set_defaults(func=tables_through_service(_ls))

    show = sub.add_parser("show", parents=[root], help="print the rows of one device")
    show.add_argument("device", metavar="DEVICE", help="device key (see `fleetprune tables ls`)")
    show.add_argument("--op", choices=OPS)
    show.add_argument("--batch", type=int)
    show.add_argument("--dtype", choices=("fp32", "fp16", "bf16"))
    show.add_argument("--memory-format", choices=("nchw", "nhwc"))
    show.add_argument("--limit", type=int, default=50, metavar="N", help="rows to print, 0 for all (default 50)")
    add_service_option(show, "read the table")
    show.set_defaults(func=tables_through_service(_show, lambda a: [a.device]))

    val = sub.add_parser("validate", parents=[root], help="report every defect; exit 1 if there is any")
    val.set_defaults(func=_validate)

    merge = sub.add_parser("merge", parents=[root], help="copy the rows of another root into --tables")
    merge.add_argument("source", metavar="SRC", help="table root to copy from (folder or URI)")
    merge.set_defaults(func=_merge)

    diff = sub.add_parser("diff", parents=[root], help="compare two devices on their common configurations")
    diff.add_argument("device_a", metavar="DEV_A")
    diff.add_argument("device_b", metavar="DEV_B")
    diff.add_argument("--limit", type=int, default=50, metavar="N", help="rows to print, 0 for all (default 50)")
    diff.add_argument("--sort", choices=("config", "ratio"), default="config", help="row order (default config)")
    add_service_option(diff, "read the tables")
    diff.set_defaults(func=tables_through_service(_diff, lambda a: [a.device_a, a.device_b]))


def _ls(args: argparse.Namespace) -> int:
    # The api is imported here so `fleetprune --help` does not pay for pyarrow and pandas.
    from fleetprune.api.tables import list_tables

    summaries = list_tables(args.tables)
    if not summaries:
        print(f"no device tables under {args.tables}")
        return 0
    rows = []
    for s in summaries:
        prov = s.provenance
        rows.append(
            [
                s.device_key,
                str(s.rows),
                str(s.files),
                s.last_measured.strftime("%Y-%m-%d %H:%M") if s.last_measured else "-",
                _text(prov.get("device_name")),
                _text(prov.get("torch")),
                _text(prov.get("cuda")),
                _text(prov.get("threads")),
                "yes" if prov.get("correction") is not None else "no",
            ]
        )
    header = ["DEVICE", "ROWS", "FILES", "LAST MEASURED UTC", "NAME", "TORCH", "CUDA", "THREADS", "CALIBRATED"]
    print(_grid(header, rows, right={1, 2}))
    bad = [(s.device_key, f) for s in summaries for f in s.bad_files]
    for device, f in bad:
        print(f"unreadable file of {device}: {f}")
    if bad:
        print(f"{len(bad)} unreadable file(s): `fleetprune tables validate --tables {args.tables}` tells more")
    return 0


def _show(args: argparse.Namespace) -> int:
    from fleetprune.api.tables import show_table

    shown_rows = show_table(args.tables, args.device, op=args.op, batch=args.batch, dtype=args.dtype,
                            memory_format=args.memory_format)
    table, frame = shown_rows.table, shown_rows.frame
    total = len(frame)
    shown = frame if args.limit <= 0 else frame.head(args.limit)
    rows = [
        [
            r.op, f"{r.kh}x{r.kw}", f"{r.sh}x{r.sw}", f"{r.ph}x{r.pw}", str(r.dilation), str(r.groups),
            f"{r.in_h}x{r.in_w}", str(r.batch), r.dtype, r.memory_format, r.act, str(r.cin), str(r.cout),
            _ms(r.lat_ms), _ms(r.lat_ms_min), _ms(r.lat_ms_median), _ms(r.lat_ms_p10), _ms(r.lat_ms_p90),
            str(r.n_samples),
            "noisy" if r.noisy else "", r.measured_at.strftime("%Y-%m-%d %H:%M:%S"),
        ]
        for r in shown.itertuples(index=False)
    ]
    header = ["OP", "K", "S", "P", "D", "G", "IN", "BATCH", "DTYPE", "FMT", "ACT", "CIN", "COUT",
              "LAT_MS", "MIN_MS", "MEDIAN_MS", "P10_MS", "P90_MS", "N", "NOISY", "MEASURED UTC"]
    if rows:
        print(_grid(header, rows, right={4, 5, 7, *range(11, 19)}))
    more = "" if len(shown) == total else " (--limit 0 shows all)"
    print(f"{table.device_key}: {len(shown)} of {total} matching rows shown ({len(table)} in the table){more}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from fleetprune.api.tables import check_tables

    check = check_tables(args.tables)
    defects = check.defects
    for d in defects:
        print(d)
    if defects:
        files = len({d.file for d in defects})
        print(f"{len(defects)} defect(s) in {files} file(s) under {args.tables}")
        return 1
    summaries = check.devices
    print(f"ok: {len(summaries)} device(s), {sum(s.rows for s in summaries)} configurations, no defects")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from fleetprune.api.tables import merge_tables

    copied = merge_tables(args.tables, args.source)
    print(f"copied {copied} row(s) from {args.source} into {args.tables}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    import numpy as np

    from fleetprune.api.tables import diff_tables

    diff = diff_tables(args.tables, args.device_a, args.device_b)
    joined, ms_a, ms_b, ratio = diff.frame, diff.ms_a, diff.ms_b, diff.ratio
    order = np.argsort(ratio, kind="stable") if args.sort == "ratio" else np.arange(len(ratio))
    if args.limit > 0:
        order = order[: args.limit]
    rows = [[joined.index[i], _ms(ms_a[i]), _ms(ms_b[i]), _ratio(ratio[i])] for i in order]
    if rows:
        print(_grid(["CONFIGURATION", f"{args.device_a} MS", f"{args.device_b} MS", "B/A"], rows, right={1, 2, 3}))
    print(
        f"common configurations: {len(joined)} ({len(rows)} shown); "
        f"only in {args.device_a}: {diff.only_a}; only in {args.device_b}: {diff.only_b}"
    )
    finite = ratio[np.isfinite(ratio)]
    if len(finite):
        print(
            f"latency ratio {args.device_b}/{args.device_a}: median {np.median(finite):.3f}, "
            f"min {finite.min():.3f}, max {finite.max():.3f}"
        )
    else:
        print("latency ratio: no common configuration to compare")
    return 0


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _ms(value: float) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _ratio(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.3f}"


def _grid(header: list[str], rows: list[list[str]], *, right: set[int] = frozenset()) -> str:
    """Rows as aligned columns (numbers right-aligned), header first."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
