"""fleetprune.models."""
