"""fleetprune.training."""
