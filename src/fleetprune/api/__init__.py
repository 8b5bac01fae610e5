"""fleetprune.api: the verbs of the ``fleetprune`` command as Python functions."""

from fleetprune.api._common import quick_protocol
from fleetprune.api.profile import fleet, profile
from fleetprune.api.prune import DeviceResult, load_variant, prune
from fleetprune.api.tables import check_tables, diff_tables, list_tables, merge_tables, show_table
from fleetprune.api.validate import ValidationSummary, validate
from fleetprune.report import write_report as report

__all__ = ["DeviceResult", "ValidationSummary", "check_tables", "diff_tables", "fleet", "list_tables", "load_variant",
           "merge_tables", "profile", "prune", "quick_protocol", "report", "show_table", "validate"]
