"""fleetprune: measure every device of a fleet, prune one network per device."""

from fleetprune.errors import FleetpruneError

__version__ = "0.1.0"

__all__ = ["FleetpruneError", "__version__", "load_variant"]


def load_variant(path):  # noqa: ANN001, ANN201 - thin lazy re-export
    """Rebuild a pruned variant from its folder (see :func:`fleetprune.api.load_variant`)."""
    from fleetprune.api import load_variant as _load

    return _load(path)
