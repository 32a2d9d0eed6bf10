"""Composer callbacks of llmshearing, registered by name in `llmshearing.registry`. The trainer builds these
from their recipe sections (`data.dynamic`, `pruning`, `save_on_sigterm`/`stop_on_nonfinite`, `fsdp`,
`optimizer.clip_grad_norm`)."""
from llmshearing.callbacks.dynamic_loading import DynamicLoading
from llmshearing.callbacks.grad_clip import ClipGradNorm
from llmshearing.callbacks.pruning_log import PruningLog
from llmshearing.callbacks.replicated_grads import ReplicatedGrads
from llmshearing.callbacks.run_guard import RanksAgree, RunGuard, StopOnNonFinite, StopOnSignal, guards

__all__ = ["ClipGradNorm", "DynamicLoading", "PruningLog", "RanksAgree", "ReplicatedGrads", "RunGuard", "StopOnNonFinite",
           "StopOnSignal", "guards"]
