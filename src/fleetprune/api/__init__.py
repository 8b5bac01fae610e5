"""fleetprune.api."""
