"""Composer callbacks of llmshearing, registered by name in `llmshearing.registry`. The trainer builds these
from their recipe sections (`data.dynamic`, `pruning`, `save_on_sigterm`/`stop_on_nonfinite`, `fsdp`,
`optimizer.clip_grad_norm`)."""
from callbacks.dynamic_loading import DynamicLoading
from callbacks.grad_clip import ClipGradNorm
from callbacks.pruning_log import PruningLog
from callbacks.replicated_grads import ReplicatedGrads
from callbacks.run_guard import RunGuard
from llmshearing.registry import callbacks as _registry

_registry.register("dynamic_loading", DynamicLoading, configured_by="data.dynamic")
_registry.register("pruning_log", PruningLog, configured_by="pruning")
_registry.register("run_guard", RunGuard, configured_by="save_on_sigterm / stop_on_nonfinite")
_registry.register("replicated_grads", ReplicatedGrads, configured_by="fsdp")
_registry.register("clip_grad_norm", ClipGradNorm, configured_by="optimizer.clip_grad_norm")

__all__ = ["ClipGradNorm", "DynamicLoading", "PruningLog", "ReplicatedGrads", "RunGuard"]
