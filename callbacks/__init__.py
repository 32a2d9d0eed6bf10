"""Composer callbacks of llmshearing, registered by name for the yaml recipes."""
from callbacks.dynamic_loading import DynamicLoading
from callbacks.pruning_monitor import PruningMonitor
from callbacks.run_guard import RunGuard

__all__ = ["DynamicLoading", "PruningMonitor", "RunGuard"]
