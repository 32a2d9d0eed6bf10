"""The Composer wrapper: the decoder, its L0 masks (when pruning), the loss and the metrics."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel

from llmshearing.pruning.masks import L0Module
from llmshearing.model.decoder import DecoderLM
from llmshearing.model.distill import Teacher, cross_entropy_sum, kd_loss, lm_loss

TEACHER = "teacher."  # state-dict prefix of the distillation teacher: in training checkpoints, not in exports


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels shifted one left so position t holds the token after t, the last position -100 (no next token):
    aligned with the full logits, so the losses need no `[:, :-1]` view (whose gradient is one more copy)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


class ChunkedCrossEntropy(LanguageCrossEntropy):
    """Composer's LanguageCrossEntropy (same states, same compute) updated a chunk of positions at a time, in
    fp32, without a contiguous or fp32 copy of the whole microbatch's logits."""

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        rows = (target != self.ignore_index).nonzero(as_tuple=True)
        total, _ = cross_entropy_sum(output.detach(), target[rows], rows)
        self.sum_loss += total
        self.total_items += rows[0].numel()


class ChunkedPerplexity(ChunkedCrossEntropy, LanguagePerplexity):
    """LanguagePerplexity (exp of the mean cross-entropy) with ChunkedCrossEntropy's update."""


class ComposerLM(ComposerModel):
    """`model` is the HF-layout decoder; `l0` the masks and Lagrange multipliers (None: plain LM training);
    `teacher` the frozen distillation teacher (None: the loss is the plain LM loss).

    Masks are drawn inside `forward`: stochastic in training, the exact test-time masks in eval, so
    evaluation during pruning measures the model that export will write.
    """

    def __init__(self, model: DecoderLM, l0: L0Module | None = None, teacher: Teacher | None = None):
        super().__init__()
        self.model, self.l0, self.teacher = model, l0, teacher
        self.train_metrics = {"LanguageCrossEntropy": ChunkedCrossEntropy()}
        self.eval_metrics = {"LanguageCrossEntropy": ChunkedCrossEntropy(), "LanguagePerplexity": ChunkedPerplexity()}

    def forward(self, batch):
        ids = batch["input_ids"]
        if self.l0 is None:
            return self.model(ids)
        # The pruning step (target ramp, mask noise) is the global batch index the data carries, so it needs
        # no callback and survives resume and FSDP wrapping; callers without it set `l0.step` themselves.
        step = batch.get("batch_index") if self.training else None
        return self.model(ids, self.l0(len(ids), None if step is None else int(step[0])))

    def loss(self, outputs, batch):
        """`total` is minimised: the LM cross-entropy, with a teacher (1 - alpha) * ce + alpha * kd (both logged),
        plus the Lagrangian when pruning (the cross-entropy is then logged as `lm` too, as without a teacher).
        Both losses take the logits as the model returned them (bf16 under autocast) and convert a chunk of
        positions at a time (distill.lm_loss, distill.kd_loss): no fp32 copy of the whole microbatch's logits."""
        labels = next_token_labels(batch["labels"])
        ce = lm_loss(outputs, labels)
        losses = {"total": ce}
        if self.teacher is not None:
            t = self.teacher
            with torch.no_grad():
                teacher_logits = t(batch["input_ids"])
            kd = kd_loss(outputs, teacher_logits, labels, t.temperature, t.top_k)
            losses = {"total": (1 - t.alpha) * ce + t.alpha * kd, "ce": ce, "kd": kd}
        if self.l0 is None:
            return losses if self.teacher is not None else ce
        lagrangian, _ = self.l0.lagrangian(logs=False)
        return {**losses, "total": losses["total"] + lagrangian, "lm": ce, "lagrangian": lagrangian}

    def eval_forward(self, batch, outputs=None):
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False):
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch, outputs, metric) -> None:
        metric.update(outputs, next_token_labels(batch["labels"]))

    def param_groups(self, lr: float, weight_decay: float, mask_lr: float, lambda_lr: float) -> list[dict]:
        """Separate learning rates for weights, mask log-alphas and Lagrange multipliers (no decay on the latter)."""
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay}]
        if self.l0 is not None:
            groups.append({"params": [m.log_alpha for m in self.l0.masks.values()], "lr": mask_lr, "weight_decay": 0.0})
            groups.append({"params": [self.l0.lambdas], "lr": lambda_lr, "weight_decay": 0.0})
        return groups


def student_state(state_dict: dict) -> dict:
    """A ComposerLM state dict without the teacher's weights (what an unwrapped student model loads)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(TEACHER)}
