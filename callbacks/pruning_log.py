"""Records the expected shape, sparsities and multipliers of the masks every batch, and plots them at the end."""
from __future__ import annotations

import os

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmshearing.pruning.shapes import param_count, SHAPE_KEYS
from llmshearing.train.composer_model import unwrap
from llmshearing.io import append_jsonl, truncate_jsonl
from llmshearing.plots import plot_pruning_log


class PruningLog(Callback):
    """Every batch: logs expected layers/heads/kv heads/intermediate/hidden/parameters, the expected and
    target sparsity and both multipliers of every mask; appends them and the batch's losses to
    `<folder>/pruning_log.jsonl`
    and, at the end of training, draws them in `<folder>/pruning_shape.png` and `pruning_lambdas.png`.
    """

    def __init__(self, folder: str | None = None):
        self.folder = folder

    def fit_start(self, state: State, logger: Logger) -> None:
        resumed = int(state.timestamp.batch)
        if self.folder and dist.get_global_rank() == 0:  # drop rows an interrupted run wrote after the checkpoint
            truncate_jsonl(os.path.join(self.folder, "pruning_log.jsonl"), lambda row: row["step"] < resumed)

    def batch_end(self, state: State, logger: Logger) -> None:
        model = unwrap(state.model)
        l0 = model.l0
        _, metrics = l0.lagrangian()
        expected = l0.expected_shape()
        metrics.update({f"expected/{k}": v for k, v in expected.items()})
        metrics["expected/params"] = param_count(l0.target, model.model.config, floats=expected)
        logger.log_metrics(metrics)
        if self.folder and dist.get_global_rank() == 0:  # the batch's losses, averaged over ranks by Composer
            losses = {k: float(v) for k, v in (state.total_loss_dict or {}).items()}
            append_jsonl(os.path.join(self.folder, "pruning_log.jsonl"), {"step": l0.step, **losses, **metrics})

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.folder and dist.get_global_rank() == 0:
            l0 = unwrap(state.model).l0
            plot_pruning_log(os.path.join(self.folder, "pruning_log.jsonl"), self.folder,
                             source={k: getattr(l0.source, k) for k in SHAPE_KEYS},
                             target={k: getattr(l0.target, k) for k in SHAPE_KEYS})
