"""The losses on the logits, a chunk of positions at a time: the LM cross-entropy (every run) and logit
distillation's KD loss with its frozen teacher (the `distill:` section of a run).

Neither makes an fp32 copy of the whole microbatch's logits (2 x 4096 positions x 128k entries is 4 GiB in
fp32, 8 with its gradient): each converts one chunk of `kd_chunk_rows(V)` positions at a time.

The teacher is a second DecoderLM beside the student inside the ComposerLM, so Composer's FSDP wraps it exactly
like the student (a separate FSDP root, every decoder layer its own unit, `sync_module_states` from rank 0). It
is frozen (no gradient, in no optimizer group), always in eval mode and run under `torch.no_grad`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmshearing.model.decoder import DecoderLM


# fp32 elements of one chunk's tensors in kd_loss and lm_loss (16 MiB each): bounds the losses' temporaries
# whatever B*T*V is
KD_CHUNK_ELEMENTS = 2**22


def kd_chunk_rows(vocab: int) -> int:
    """Positions kd_loss and lm_loss handle at once: KD_CHUNK_ELEMENTS worth of one vocabulary-wide row each."""
    return max(1, KD_CHUNK_ELEMENTS // vocab)


def _chunks(rows: tuple[torch.Tensor, ...], vocab: int):
    """(slice of the kept positions, their index tuple) a chunk at a time: the one chunking scheme of both losses."""
    chunk = kd_chunk_rows(vocab)
    for a in range(0, rows[0].numel(), chunk):
        yield slice(a, a + chunk), tuple(r[a:a + chunk] for r in rows)


def kept_rows(labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The index tuple of the positions whose label is not -100 (the ones both losses average over)."""
    return (labels != -100).nonzero(as_tuple=True)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over positions whose label is not -100 of -log softmax(logits)[label] (F.cross_entropy with
    ignore_index=-100; 0 when no position is kept), computed in fp32 a chunk of positions at a time.

    logits: (..., V), any float dtype and layout (a bf16 non-contiguous view is fine); labels (...,) aligned.
    For backward it keeps only each kept position's log-sum-exp (4 bytes per position) besides the logits
    themselves (alive anyway: the trainer holds the model's outputs through backward) and recomputes the
    softmax per chunk, returning the gradient in the logits' dtype.
    """
    rows = kept_rows(labels)
    return _LMLoss.apply(logits, labels[rows], rows)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor,
                      rows: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over the positions `rows` of -log softmax(logits[rows])[targets] in fp32, and each one's log-sum-exp."""
    lse = torch.empty(rows[0].numel(), dtype=torch.float32, device=logits.device)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for part, at in _chunks(rows, logits.shape[-1]):
        s = logits[at].float()
        top = s.amax(dim=-1, keepdim=True)  # log-sum-exp written out: one fp32 temporary beside s
        lse[part] = (s - top).exp_().sum(dim=-1).log_().add_(top.squeeze(-1))
        total += lse[part].sum() - s.gather(-1, targets[part, None]).sum()
        del s, top  # before the next chunk's
    return total, lse


class _LMLoss(torch.autograd.Function):
    """lm_loss's value and its exact gradient d/d logits = (softmax(logits) - onehot(label)) / m on the kept
    positions (m of them), zero elsewhere."""

    @staticmethod
    def forward(ctx, logits, targets, rows):
        total, lse = cross_entropy_sum(logits, targets, rows)
        ctx.save_for_backward(logits, targets, lse, *rows)
        return total / max(lse.numel(), 1)

    @staticmethod
    def backward(ctx, g):
        logits, targets, lse, *rows = ctx.saved_tensors
        out = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        scale = g / max(lse.numel(), 1)
        for part, at in _chunks(tuple(rows), logits.shape[-1]):
            p = logits[at].float().sub_(lse[part, None]).exp_()
            p.scatter_add_(-1, targets[part, None], p.new_full((p.shape[0], 1), -1.0))
            out[at] = p.mul_(scale).to(logits.dtype)
            del p
        return out, None, None


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
            top_k: int | None = None) -> torch.Tensor:
    """T^2 * mean over the positions whose label is not -100 of KL(p_teacher || p_student), with
    p = softmax(logits / T) over the vocabulary, or, with `top_k`, over the teacher's k largest logits at that
    position: both distributions renormalised on that token set (top_k >= vocab is the full-vocabulary KL).

    The renormalised student leaves the mass it puts outside the teacher's top-k to the cross-entropy term; a
    student normalised over the whole vocabulary would instead be pushed to zero outside the set, i.e. to match
    a truncated, overconfident teacher. The T^2 factor (Hinton et al. 2015): the soft targets' gradients scale
    as 1/T^2, so without it a higher T would quietly shift the balance alpha sets towards the cross-entropy.

    student, teacher: (..., V) logits aligned with labels (...,); computed in fp32, a chunk of positions at a
    time, keeping for backward only the gradient (softmax(s) - p_teacher) per kept position: 4 bytes per
    position and token instead of the 28 autograd would hold through the same formula (docs/plan.md).
    """
    return _KDLoss.apply(student, teacher, kept_rows(labels), float(temperature), top_k)


class _KDLoss(torch.autograd.Function):
    """kd_loss's value and its exact gradient d/d student = T^2 / m * (q - p) / T on the kept positions
    (q the student's and p the teacher's softmax over the same token set at temperature T, m kept positions),
    zero elsewhere and outside a top-k set."""

    @staticmethod
    def forward(ctx, student, teacher, rows, temperature, top_k):
        V, m = student.shape[-1], rows[0].numel()
        k = V if top_k is None or top_k >= V else int(top_k)
        grad = torch.empty((m, k), dtype=torch.float32, device=student.device)
        index = None if k == V else torch.empty((m, k), dtype=torch.long, device=student.device)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for part, at in _chunks(rows, V):
            t = teacher[at].float() / temperature
            s = student[at].float() / temperature
            if index is not None:
                t, index[part] = t.topk(k, dim=-1)
                s = s.gather(-1, index[part])
            t_logp, s_logp = F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1)
            p = t_logp.exp()
            total += (p * (t_logp - s_logp)).sum()
            torch.sub(s_logp.exp_(), p, out=grad[part])
            del t, s, t_logp, s_logp, p  # before the next chunk's: one chunk's temporaries at a time
        ctx.save_for_backward(grad, index, *rows)
        ctx.shape, ctx.dtype, ctx.temperature = student.shape, student.dtype, temperature
        return temperature ** 2 * total / max(m, 1)

    @staticmethod
    def backward(ctx, g):
        grad, index, *rows = ctx.saved_tensors
        m = grad.shape[0]
        out = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad.device)
        scale = g * ctx.temperature / max(m, 1)  # T^2 (the factor) / T (s = logits / T) / m (the mean)
        for part, at in _chunks(tuple(rows), ctx.shape[-1]):
            g_part = grad[part] * scale
            if index is not None:
                g_part = g_part.new_zeros((g_part.shape[0], ctx.shape[-1])).scatter_(-1, index[part], g_part)
            out[at] = g_part.to(ctx.dtype)
            del g_part
        return out, None, None, None, None


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
