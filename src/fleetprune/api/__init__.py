"""fleetprune.api: the verbs of the ``fleetprune`` command as Python functions."""

from fleetprune.api._common import quick_protocol
from fleetprune.api.profile import fleet, profile
from fleetprune.api.prune import DeviceResult, load_variant, prune
from fleetprune.api.validate import ValidationSummary, validate
from fleetprune.report import write_report as report

__all__ = ["DeviceResult", "ValidationSummary", "fleet", "load_variant", "profile", "prune", "quick_protocol", "report",
           "validate"]
