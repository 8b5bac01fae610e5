"""fleetprune.pruner."""
