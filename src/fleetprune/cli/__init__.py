"""The ``fleetprune`` command. Each verb lives in its own module with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fleetprune.errors import FleetpruneError

# Verb modules under fleetprune.cli; each defines register(subparsers) which sets ``func``.
VERBS = ("profile", "fleet", "tables", "prune", "train", "validate", "report", "serve")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb that imports cleanly on this machine."""
    parser = argparse.ArgumentParser(
        prog="fleetprune",
        description="Profile layer latencies on every device of a fleet and prune one network per device.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb in VERBS:
        try:
            module = importlib.import_module(f"fleetprune.cli.{verb}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("fleetprune.cli."):
                continue  # verb not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a :class:`FleetpruneError` prints its message and exits non-zero."""
    # torch.utils.benchmark imports cpp_extension, which warns on every start of a machine that has a
    # CUDA toolkit but no CUDA runtime; it says nothing about fleetprune's work.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
    except FleetpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: everything measured so far is saved; rerun to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
