"""``fleetprune fleet``: the device types of the cluster (or this machine), their nodes and device counts."""

from __future__ import annotations

import argparse


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """``--ray-address`` and ``--threads``, shared by ``profile`` and ``fleet``."""
    p.add_argument(
        "--ray-address", default="local", metavar="ADDR",
        help="local: start Ray on this machine for the run (default); auto: attach to the cluster "
             "`ray start` runs here; HOST:PORT: attach to that cluster; none: no Ray, this machine's "
             "devices in-process",
    )
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="threads each CPU node is measured with (default: all of the node's CPUs)")


def input_size(text: str | None) -> tuple[int, int] | None:
    """``--input-size``: ``"64"`` or ``"64x48"`` as (H, W); None stays None.

    Raises:
        FleetpruneError: not one or two positive whole numbers.
    """
    from fleetprune.errors import FleetpruneError

    if text is None:
        return None
    try:
        size = tuple(int(s) for s in text.lower().replace(",", "x").split("x"))
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise FleetpruneError(f"--input-size must be H or HxW with positive sizes (e.g. 64 or 64x48), got {text!r}")
    return size[0], size[1]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``fleet`` verb."""
    p = subparsers.add_parser("fleet", help="list the device types of the cluster with their nodes")
    add_cluster_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print every device type with its nodes and GPU or CPU counts."""
    from fleetprune.api.profile import fleet

    found = fleet(args.ray_address, threads=args.threads)
    print(format_fleet(found, args.ray_address))
    return 0


def format_fleet(found, address: str) -> str:  # noqa: ANN001 - a cluster.devices.Fleet
    """The fleet as text: one block per device type, then the nodes that cannot measure."""
    where = {"none": "this machine (no Ray)", "local": "this machine (embedded Ray)"}.get(
        address.strip().lower(), f"the Ray cluster at {found.address or address}")
    n_nodes = len({n.node_id for t in found.types for n in t.nodes} | {n.node_id for n, _ in found.unusable})
    lines = [f"{where}: {len(found.types)} device type(s) on {n_nodes} node(s)"]
    for t in found.types:
        key = t.key or "unknown until an actor reads it"
        if t.kind == "cuda":
            lines.append(f"{t.name}  GPU  {len(t.nodes)} node(s), {t.slots} GPU(s)  "
                         f"[{t.label or t.name}; table key {key}]")
            for n in t.nodes:
                lines.append(f"    node {n.short_id}  {n.address}  {n.gpus} GPU(s), {n.cpus} CPU(s)")
        else:
            cpus = sum(n.cpus for n in t.nodes)
            lines.append(f"{t.name}  CPU  {len(t.nodes)} node(s), {cpus} CPU(s), {t.threads} thread(s) per node  "
                         f"[{t.label}; table key {key}]")
            for n in t.nodes:
                lines.append(f"    node {n.short_id}  {n.address}  {n.cpus} CPU(s)")
    if found.unusable:
        lines.append("not usable:")
        for n, why in found.unusable:
            lines.append(f"    node {n.short_id}  {n.address}  {why}")
    if not found.types:
        lines.append("no usable device: add a node with GPUs or free CPUs, or lower --threads")
    return "\n".join(lines)
