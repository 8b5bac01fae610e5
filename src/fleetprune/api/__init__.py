"""fleetprune.api: the verbs of the ``fleetprune`` command as Python functions."""

from fleetprune.api.prune import DeviceResult, load_variant, prune

__all__ = ["DeviceResult", "load_variant", "prune"]
