"""fleetprune.tables."""
