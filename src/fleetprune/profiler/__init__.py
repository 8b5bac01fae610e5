"""fleetprune.profiler."""
