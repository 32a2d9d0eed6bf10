"""Logit distillation: the frozen teacher and the KD loss (the `distill:` section of a run).

The teacher is a second DecoderLM beside the student inside the ComposerLM, so Composer's FSDP wraps it exactly
like the student (a separate FSDP root, every decoder layer its own unit, `sync_module_states` from rank 0). It
is frozen (no gradient, in no optimizer group), always in eval mode and run under `torch.no_grad`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmshearing.model.decoder import DecoderLM


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
            top_k: int | None = None) -> torch.Tensor:
    """T^2 * mean over the positions whose label is not -100 of KL(p_teacher || p_student), with
    p = softmax(logits / T) over the vocabulary, or, with `top_k`, over the teacher's k largest logits at that
    position: both distributions renormalised on that token set (top_k >= vocab is the full-vocabulary KL).

    The renormalised student leaves the mass it puts outside the teacher's top-k to the cross-entropy term; a
    student normalised over the whole vocabulary would instead be pushed to zero outside the set, i.e. to match
    a truncated, overconfident teacher. The T^2 factor (Hinton et al. 2015): the soft targets' gradients scale
    as 1/T^2, so without it a higher T would quietly shift the balance alpha sets towards the cross-entropy.

    student, teacher: (..., V) logits aligned with labels (...,); computed in fp32.
    """
    keep = labels != -100
    s, t = student[keep].float() / temperature, teacher[keep].float() / temperature
    if top_k is not None and top_k < t.shape[-1]:
        t, idx = t.topk(top_k, dim=-1)
        s = s.gather(-1, idx)
    t_logp, s_logp = F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return temperature ** 2 * kl.sum() / keep.sum().clamp(min=1)


class Teacher(nn.Module):
    """A frozen DecoderLM plus the distillation settings. `train()` leaves it in eval mode (Composer calls
    model.train() on the whole ComposerModel); its parameters never require a gradient."""

    def __init__(self, lm: DecoderLM, alpha: float = 1.0, temperature: float = 1.0, top_k: int | None = None):
        super().__init__()
        self.lm = lm.requires_grad_(False)
        self.alpha, self.temperature, self.top_k = float(alpha), float(temperature), top_k
        self.train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    # Composer's FSDP wraps the teacher with this policy, as the student: every decoder layer is an FSDP unit.
    # There is no activation_checkpointing_fn: nothing of a no_grad forward is kept for a backward.
    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        return self.lm.fsdp_wrap_fn(module)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids)
