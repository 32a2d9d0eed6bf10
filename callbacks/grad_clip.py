"""Clips the global gradient norm before the optimizer steps (the paper recipes clip at 1.0, both stages)."""
from __future__ import annotations

import math

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from torch.distributed.fsdp import FullyShardedDataParallel


class ClipGradNorm(Callback):
    """At Composer's AFTER_TRAIN_BATCH (after the last microbatch's backward, before the optimizer step) scale every
    gradient by min(1, max_norm / (norm + 1e-6)), where norm is the L2 norm over all parameters, masks and
    multipliers included, as the released code's Composer gradient clipping. Under FSDP the sharded part of the
    norm comes from each FSDP root's `clip_grad_norm_` (which all-reduces it) and the replicated masks add theirs
    once; Composer's own GradientClipping would clip each FSDP root apart and leave the masks out."""

    def __init__(self, max_norm: float):
        self.max_norm = float(max_norm)

    def after_train_batch(self, state: State, logger: Logger) -> None:
        model = state.model
        if not state.fsdp_enabled:
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_norm))
        else:
            children = list(model.children())
            square = sum(float(c.clip_grad_norm_(math.inf)) ** 2 for c in children  # not the frozen teacher
                         if isinstance(c, FullyShardedDataParallel) and any(p.requires_grad for p in c.parameters()))
            square += sum(float(p.grad.detach().float().pow(2).sum()) for c in children
                          if not isinstance(c, FullyShardedDataParallel) for p in c.parameters() if p.grad is not None)
            norm = math.sqrt(square)
            scale = self.max_norm / (norm + 1e-6)
            if scale < 1:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(scale)
        logger.log_metrics({"grad_norm/before_clipping": norm})
