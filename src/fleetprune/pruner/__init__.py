"""fleetprune.pruner: channel groups and plans, SP-LAMP scores, the knapsack, progressive pruning."""

from fleetprune.pruner.plan import ChannelGroup, Plan, PlannedLayer, build_plan, unit_and_choices

__all__ = ["ChannelGroup", "Plan", "PlannedLayer", "build_plan", "unit_and_choices"]
