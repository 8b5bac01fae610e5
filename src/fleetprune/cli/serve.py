"""``fleetprune serve``: run the profiling service (Ray Serve) until Ctrl-C or ``fleetprune serve --stop``."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from fleetprune.cli.fleet import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` verb."""
    p = subparsers.add_parser(
        "serve",
        help="run the profiling service: a warm fleet with an HTTP API that many users and jobs share",
        description="Start one warm profiling replica per device of the fleet and an HTTP API (JSON under /v1/) "
                    "for jobs, lookups, predictions, end-to-end measurements and table downloads. Writes need the "
                    "bearer token from FLEETPRUNE_TOKEN or --token-file. Runs until Ctrl-C or `fleetprune serve --stop`.",
    )
    p.add_argument("--tables", default="tables", metavar="ROOT",
                   help="table root the service measures into and serves (default: ./tables); its job journal is "
                        "ROOT/_service/jobs.jsonl")
    p.add_argument("--ray-address", default="local", metavar="ADDR",
                   help="local: embedded Ray on this machine (default); auto or HOST:PORT: an existing cluster")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP API listens on (default: loopback only)")
    p.add_argument("--port", type=positive_int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--token-file", metavar="PATH", help="file whose first line is the bearer token (default: "
                   "$FLEETPRUNE_TOKEN)")
    p.add_argument("--devices", default="all", metavar="TYPES", help="device types to serve (default: all)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="threads each CPU node is measured with (default: all of the node's CPUs)")
    p.add_argument("--queue-limit", type=positive_int, default=100_000, metavar="N",
                   help="configurations waiting before new jobs are refused with 429 (default 100000)")
    p.add_argument("--chunk-size", type=positive_int, metavar="N", help="configurations per chunk (default: automatic)")
    p.add_argument("--stop", action="store_true",
                   help="stop the service running on --tables ROOT (or at --url) and exit")
    p.add_argument("--url", help="with --stop: the service's URL (default: read from ROOT/_service/service.json)")
    p.add_argument("--backend", default="torch", help=argparse.SUPPRESS)  # fake[:SECONDS] for tests and demos
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until stopped, or with ``--stop`` ask the running service to stop."""
    from fleetprune.api.profile import backend_from_text
    from fleetprune.api.serve import resolve_token, serve, stop

    token = resolve_token(args.token_file)
    if args.stop:
        url = stop(args.url, tables=args.tables, token=token)
        print(f"asked the service at {url} to stop")
        return 0
    backend = backend_from_text(args.backend)
    if token is None:
        print("warning: no token (FLEETPRUNE_TOKEN or --token-file): the service will refuse every write",
              file=sys.stderr)

    def ready(info) -> None:  # noqa: ANN001 - a ServiceInfo
        print(f"fleetprune service at {info.url}: {info.replicas} profiling replica(s), tables {info.tables}, "
              f"ready in {info.startup_s:.1f} s", flush=True)
        print(f"stop it with Ctrl-C or `fleetprune serve --stop --tables {info.tables}`", flush=True)

    try:
        serve(args.tables, token=token, ray_address=args.ray_address, host=args.host, port=args.port,
              devices=args.devices, threads=args.threads, backend=backend, queue_limit=args.queue_limit,
              chunk_size=args.chunk_size, on_ready=ready)
    except KeyboardInterrupt:
        print("service stopped (Ctrl-C); queued jobs resume when it starts again", file=sys.stderr)
        return 0
    print("service stopped; queued jobs resume when it starts again")
    return 0


# ---- other verbs through a running service (their `--service URL` flag lands here) ------------------------


def add_service_option(p: argparse.ArgumentParser, what: str) -> None:
    """The ``--service URL`` flag of another verb."""
    p.add_argument("--service", metavar="URL", help=f"{what} through a running `fleetprune serve` at URL "
                   "(writes use the token in FLEETPRUNE_TOKEN)")


def profile_through_service(args: argparse.Namespace) -> int:
    """``fleetprune profile ... --service URL``: submit the job, follow it with one bar per device, print the end."""
    from tqdm import tqdm

    from fleetprune.api.serve import remote_profile
    from fleetprune.errors import ProfileError

    bars: dict[str, Any] = {}

    def show(status: dict) -> None:
        for d in status["devices"]:
            bar = bars.get(d["device_key"])
            if bar is None:
                bar = bars[d["device_key"]] = tqdm(total=d["total"], desc=d["device_type"], unit="cfg",
                                                    position=len(bars), file=sys.stderr, dynamic_ncols=True,
                                                    disable=None)
            if d["done"] + d["failed"] > bar.n:
                bar.update(d["done"] + d["failed"] - bar.n)

    job = dict(batch=args.batch, dtype=args.dtype, memory_format=args.memory_format, round_to=args.round_to,
               input_size=getattr(args, "input_size", None), num_classes=args.num_classes,
               max_choices=args.max_choices, devices=args.devices, threads=args.threads)
    try:
        final = remote_profile(args.service, args.model, progress=show, **job)
    finally:
        for bar in bars.values():
            bar.close()
    print(f"job {final['id']} on {args.service}: {final['state']}")
    for d in final["devices"]:
        print(f"  {d['device_type']:<24} {d['device_key']:<32} {d['done']}/{d['total']} done, {d['failed']} failed")
    if final["state"] != "done":
        raise ProfileError(f"the job ended {final['state']}: {final['message'] or 'see above'}; submit it again to "
                           "retry what is missing")
    return 0


def tables_through_service(func: Callable[[argparse.Namespace], int],
                           devices: Callable[[argparse.Namespace], list[str] | None] = lambda a: None
                           ) -> Callable[[argparse.Namespace], int]:
    """A ``tables`` action that, with ``--service``, reads a local copy of the service's tables (downloaded first)."""
    def run_it(args: argparse.Namespace) -> int:
        if getattr(args, "service", None):
            from fleetprune.api.serve import mirror_tables

            args.tables = mirror_tables(args.service, devices=devices(args))
        return func(args)
    return run_it
