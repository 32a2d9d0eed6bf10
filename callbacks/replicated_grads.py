"""Averages the gradients of parameters that FSDP leaves unsharded (the L0 masks and multipliers) across ranks."""
from __future__ import annotations

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


class ReplicatedGrads(Callback):
    """Under FSDP the model's `l0` child is not wrapped (it must stay whole on every rank), so nothing averages
    its gradients: each rank would step its own masks and the ranks drift apart. After the last microbatch's
    backward and before the optimizer steps (Composer's AFTER_TRAIN_BATCH), sum each gradient over the ranks and
    divide by their number (gloo has no AVG), which is what DDP would have done."""

    def after_train_batch(self, state: State, logger: Logger) -> None:
        world = dist.get_world_size()
        l0 = getattr(state.model, "l0", None)
        if world == 1 or l0 is None:
            return
        grads = [p.grad for p in l0.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all masks
        dist.all_reduce(flat, reduce_operation="SUM")
        flat /= world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
