"""fleetprune.report."""
