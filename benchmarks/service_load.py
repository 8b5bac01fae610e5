"""Load on the profiling service: lookups per second with p50/p99, and warm-service vs cold profile time.

1. Cold: ``fleetprune profile MODEL --ray-address local`` in a fresh process into an empty root
   (Ray start-up, actor start-up and measuring, as a user pays them today).
2. Starts the service (embedded Ray, loopback, this machine's CPU) on another empty root and
   reports its start-up time, then times the same profile as a job: submit -> done.
3. Drives ``POST /v1/lookup`` from ``--clients`` threads for ``--seconds`` (both bounded) and
   reports lookups per second and the p50 / p99 latency of a request.

Everything runs on loopback; real timing with the profiler's quick protocol by default
(``--protocol default`` for the real one). Figures depend on the machine and what else runs on it.

    python benchmarks/service_load.py --model resnet20 --batch 16 --clients 4 --seconds 10
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

MAX_CLIENTS = 16
MAX_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cold_profile(args: argparse.Namespace, root: str) -> tuple[float, int]:
    """Seconds and exit status of one `fleetprune profile` in a fresh process (what every user pays without
    the service); failed configurations (exit 2) still count, as the warm job meets the same ones."""
    cmd = [sys.executable, "-m", "fleetprune", "profile", args.model, "--batch", str(args.batch), "--tables", root,
           "--threads", str(args.threads), "--ray-address", "local"] + (["--quick"] if args.protocol == "quick" else [])
    started = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    return time.perf_counter() - started, done.returncode


def lookups(url: str, device: str, keys: list[str], clients: int, seconds: float) -> tuple[int, list[float], int]:
    """(requests done, per-request seconds, errors) of ``clients`` threads looking up ``keys`` for ``seconds``."""
    from fleetprune.client import ServiceClient, ServiceError

    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(i: int) -> None:
        client = ServiceClient(url, timeout_s=30)
        mine: list[float] = []
        n = 0
        while time.perf_counter() < stop_at:
            batch = [keys[(i + n + j) % len(keys)] for j in range(4)]
            t0 = time.perf_counter()
            try:
                client.lookup(device, keys=batch)
                mine.append(time.perf_counter() - t0)
            except ServiceError:
                with lock:
                    errors[0] += 1
            n += 1
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    return len(lat), lat, errors[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="threads the CPU is measured with")
    ap.add_argument("--protocol", choices=("quick", "default"), default="quick")
    ap.add_argument("--clients", type=int, default=4, help=f"concurrent lookup clients (at most {MAX_CLIENTS})")
    ap.add_argument("--seconds", type=float, default=10.0, help=f"lookup load duration (at most {MAX_SECONDS:g})")
    args = ap.parse_args()
    clients = max(1, min(args.clients, MAX_CLIENTS))
    seconds = max(1.0, min(args.seconds, MAX_SECONDS))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from fleetprune.api.serve import build_network, plan_job, predict
    from fleetprune.client import ServiceClient
    from fleetprune.cluster.connect import connect
    from fleetprune.cluster.service import start_service, stop_service
    from fleetprune.cluster.service.ingress import token_digest
    from fleetprune.cluster.spec import BackendSpec
    from fleetprune.profiler import TimingProtocol
    from fleetprune.tables import TableStore

    work = tempfile.mkdtemp(prefix="fleetprune-service-load-")
    token = "benchmark-token"
    try:
        cold_s, cold_rc = cold_profile(args, os.path.join(work, "cold"))
        protocol = TimingProtocol.quick() if args.protocol == "quick" else None
        root = os.path.join(work, "warm")
        with connect("local", num_cpus=max(2, args.threads)) as _:
            info = start_service(root, token_sha256=token_digest(token), threads=args.threads,
                                 backend=BackendSpec.torch(protocol), port=free_port(), planner=plan_job,
                                 predictor=predict, build_network=build_network)
            try:
                client = ServiceClient(info.url, token)
                started = time.perf_counter()
                job = client.submit({"model": args.model, "batch": args.batch, "threads": args.threads})
                final = client.follow(job["id"], poll_s=0.2, timeout_s=900)
                warm_s = time.perf_counter() - started
                device = final["devices"][0]["device_key"]
                keys = TableStore(root).read(device).keys()
                n, lat, errors = lookups(info.url, device, keys, clients, seconds)
            finally:
                stop_service(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lat_ms = sorted(x * 1e3 for x in lat)
    p99 = lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))] if lat_ms else float("nan")
    print(f"service_load  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  {platform.processor() or platform.machine()}"
          f"  {os.cpu_count()} CPUs  python {platform.python_version()}")
    print(f"model {args.model}, batch {args.batch}, {args.threads} thread(s), protocol {args.protocol}; "
          f"job: {final['state']}, {final['total']} configurations on {device} ({final['failed']} failed)")
    print(f"cold `fleetprune profile` (fresh process, embedded Ray): {cold_s:.1f} s (exit {cold_rc})")
    print(f"service start-up (paid once):                            {info.startup_s:.1f} s")
    print(f"warm service, same profile as a job (submit -> done):    {warm_s:.1f} s")
    print(f"lookups: {clients} clients x {seconds:g} s, 4 keys per request: {n / seconds:.1f} requests/s, "
          f"p50 {statistics.median(lat_ms) if lat_ms else float('nan'):.1f} ms, p99 {p99:.1f} ms, {errors} errors")


if __name__ == "__main__":
    main()
