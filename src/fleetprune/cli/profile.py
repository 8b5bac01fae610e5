"""``fleetprune profile MODEL``: measure a model's layer configurations on every device type into tables."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from typing import Any, Iterator

from fleetprune.cli.fleet import add_cluster_options, input_size, positive_int

DTYPE_CHOICES = ("fp32", "fp16", "bf16")
# 128 + SIGTERM, what a shell reports for a process SIGTERM ended.
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM during a run: unwinds like Ctrl-C (chunks written stay, actors and Ray are shut down)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn the first SIGTERM into :class:`Terminated` for the ``with`` block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let the clean-up finish
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
MEMORY_FORMAT_CHOICES = ("nchw", "nhwc")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``profile`` verb."""
    p = subparsers.add_parser(
        "profile",
        help="measure every layer configuration of a model on each device type of the fleet",
        description="Measure every layer configuration the pruner may choose for MODEL on each device type "
                    "of the fleet, into one latency table per device. Configurations a table already holds "
                    "are skipped, so an interrupted run resumes where it stopped.",
    )
    p.add_argument("model", metavar="MODEL", help="model name (e.g. resnet20, resnet18, mobilenet_v2)")
    p.add_argument("--batch", type=positive_int, default=1, metavar="B", help="batch size (default 1)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="dtype (default: fp32 on CPUs, fp16 on GPUs)")
    p.add_argument("--memory-format", choices=MEMORY_FORMAT_CHOICES, default="nhwc",
                   help="memory format (default nhwc: channels_last)")
    p.add_argument("--round-to", type=positive_int, metavar="N",
                   help="channel alignment of width choices (default 16 for fp32, 8 for fp16/bf16)")
    p.add_argument("--input-size", metavar="H[xW]",
                   help="input size instead of the model's default (e.g. 64); prune with the same")
    p.add_argument("--num-classes", type=positive_int, metavar="N",
                   help="classifier outputs, if not the model's default; prune with the same")
    p.add_argument("--max-choices", type=positive_int, default=32, metavar="N",
                   help="most width choices per channel group (default 32); prune with the same")
    p.add_argument("--tables", default="tables", metavar="ROOT",
                   help="table root: a folder or a pyarrow filesystem URI (default: ./tables)")
    p.add_argument("--devices", default="all", metavar="TYPES",
                   help="all (default), or comma-separated device types or table keys (see `fleetprune fleet`), "
                        "or cpu / gpu")
    add_cluster_options(p)
    from fleetprune.cli.serve import add_service_option

    add_service_option(p, "submit the job and follow it")
    p.add_argument("--quick", action="store_true", help="quick, rough timing protocol (smoke runs, not real tables)")
    p.add_argument("--timing-cache", choices=["warm", "cold"], default="warm",
                   help="time each layer with its weights and input in cache (warm, default) or out of it (cold)")
    p.add_argument("--chunk-size", type=positive_int, metavar="N",
                   help="configurations per chunk; each chunk is one part file (default: automatic)")
    # For tests and demos: time nothing, make latencies up (tables are marked fake). fake[:SECONDS].
    p.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _backend(text: str) -> Any:
    from fleetprune.api.profile import backend_from_text

    return backend_from_text(text)  # a bad text is a FleetpruneError: one line, exit 2


class ProgressBars:
    """One tqdm bar per device type (done/total with an ETA), created when the type starts."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, event: Any) -> None:
        from tqdm import tqdm

        bar = self.bars.get(event.device_key)
        if bar is None:
            bar = tqdm(total=event.total, initial=event.done, desc=event.device_type, unit="cfg",
                       position=len(self.bars), leave=True, file=sys.stderr, dynamic_ncols=True,
                       disable=None)  # None: no bars when stderr is not a terminal (logs, CI)
            self.bars[event.device_key] = bar
        if event.done > bar.n:
            bar.update(event.done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def run(args: argparse.Namespace) -> int:
    """Profile, print the summary; exit non-zero when configurations failed."""
    if getattr(args, "service", None):
        from fleetprune.cli.serve import profile_through_service

        return profile_through_service(args)
    from fleetprune.api.profile import profile
    from fleetprune.errors import ProfileError

    if not getattr(args, "verbose", False):
        # Noisy rows are counted in the summary; one warning per row would drown the bars.
        logging.getLogger("fleetprune.profiler.run").setLevel(logging.ERROR)
    bars = ProgressBars()
    try:
        with sigterm_as_interrupt():
            summary = profile(
                args.model, batch=args.batch, dtype=args.dtype, memory_format=args.memory_format,
                round_to=args.round_to, input_size=input_size(args.input_size), num_classes=args.num_classes,
                max_choices=args.max_choices, tables=args.tables, devices=args.devices,
                ray_address=args.ray_address, threads=args.threads, quick=args.quick, timing_cache=args.timing_cache,
                backend=_backend(args.backend), chunk_size=args.chunk_size, progress=bars,
            )
    except Terminated:
        bars.close()
        print("terminated: everything measured so far is saved; rerun the same command to resume", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        bars.close()
    print(summary.format())
    if summary.measured == 0 and summary.ok:
        print("nothing to measure: the tables already hold every configuration")
    if not summary.ok:
        raise ProfileError(
            f"{summary.failed} configuration(s) could not be measured (see above); what was measured is saved, "
            "rerun the same command to retry the rest"
        )
    return 0
