"""``fleetprune report DIR``: an offline HTML report of a variants folder or a table root."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` verb."""
    parser = subparsers.add_parser(
        "report",
        help="write report.html with plots of pruned variants or latency tables",
        description="Write DIR/report.html (and DIR/report_*.png) for a variants folder from "
        "`fleetprune prune --out DIR`, or ROOT/_report/report.html for a latency table root (a folder "
        "Parquet readers skip, so the root stays readable as a dataset). Opens offline.",
    )
    parser.add_argument("dir", metavar="DIR", help="a variants folder or a latency table root")
    parser.add_argument(
        "--layer",
        metavar="KEY-or-FILTER",
        help="table roots: the configuration whose latency staircase to draw, as a table key or "
        "comma-separated field=value filters and key fragments (e.g. 'op=conv,kh=3,cin=64'); "
        "default: the family with most output widths measured on every device",
    )
    parser.add_argument(
        "--devices",
        metavar="A,B",
        help="only these devices, comma-separated; the first is the reference of latency ratios",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report and print its path."""
    from fleetprune.api import report as write_report

    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    page = write_report(args.dir, layer=args.layer, devices=devices)
    print(page)
    return 0
