"""fleetprune.cluster."""
