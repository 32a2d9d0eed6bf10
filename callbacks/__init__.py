"""Composer callbacks of llmshearing, registered by name for the yaml recipes."""
from callbacks.dynamic_loading import DynamicLoading
from callbacks.pruning_log import PruningLog
from callbacks.run_guard import RunGuard

__all__ = ["DynamicLoading", "PruningLog", "RunGuard"]
