"""Dynamic batch loading as a Composer callback: after every evaluation, move the training mixture
towards the domains whose loss is furthest above its reference (LLM-Shearing, Sec. 2.2)."""
from __future__ import annotations

import json
import os

import numpy as np
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmshearing.io import append_jsonl, atomic_write_text, truncate_jsonl
from llmshearing.data.mixture import DomainMixture
from llmshearing.data.reweighting import RULES, update_weights
from llmshearing.plots import plot_domain_log


def eval_label(domain: str) -> str:
    """The Composer evaluator label of a domain's eval split (its metrics log as metrics/eval_<d>/...)."""
    return f"eval_{domain}"


class DynamicLoading(Callback):
    """At the end of every evaluation (all domains): read each domain's eval cross-entropy, compute the
    new weights with `update_weights` on rank 0, broadcast them so every rank holds the same numbers,
    and hand them to the training `DomainMixture`. With `reference_losses=None` the mixture stays
    fixed and only the losses are logged (the fixed-mixture baseline).

    Logs data/weight/<d>, data/loss/<d> and data/gap/<d>; appends to `<folder>/domain_weights.jsonl`,
    keeps `<folder>/domain_weights.json` (the weights in use, for the next stage) and draws
    `domain_weights.png` and `domain_gaps.png` at the end of training.
    """

    def __init__(self, domains: list[str], reference_losses: list[float] | None = None, eta: float = 1.0,
                 smoothing: float = 1e-4, rule: str = "paper", folder: str | None = None):
        self.domains, self.folder = list(domains), folder
        self.reference = None if reference_losses is None else np.asarray(reference_losses, dtype=np.float64)
        self.eta, self.smoothing, self.clamp_min = eta, smoothing, RULES[rule]
        self.updates = 0

    @staticmethod
    def _mixture(state: State) -> DomainMixture:
        dataset = state.train_dataloader.dataset
        if not isinstance(dataset, DomainMixture):
            raise TypeError("DynamicLoading needs a DomainMixture as the training dataset")
        return dataset

    def fit_start(self, state: State, logger: Logger) -> None:
        resumed = int(state.timestamp.batch)
        if self.folder and dist.get_global_rank() == 0:  # drop rows an interrupted run wrote after the checkpoint
            truncate_jsonl(os.path.join(self.folder, "domain_weights.jsonl"), lambda row: row["batch"] <= resumed)

    def eval_after_all(self, state: State, logger: Logger) -> None:
        if state.train_dataloader is None or int(state.timestamp.batch) == 0:
            return
        mixture = self._mixture(state)
        losses = np.array([float(state.eval_metrics[eval_label(d)]["LanguageCrossEntropy"].compute())
                           for d in self.domains])
        weights = mixture.current_weights
        gaps = np.full(len(losses), np.nan) if self.reference is None else losses - self.reference
        if self.reference is not None:
            weights, gaps = update_weights(weights, losses, self.reference, self.eta, self.smoothing, self.clamp_min)
        box = [weights.tolist()]
        dist.broadcast_object_list(box, src=0)  # rank 0's numbers everywhere, whatever float noise
        weights = np.asarray(box[0])
        done = int(state.timestamp.batch)
        effect = mixture.set_weights(weights, after_batch=done) if self.reference is not None else done
        weights = mixture.current_weights  # as stored (renormalized), so logs and checkpoints agree exactly
        in_use = dist.all_gather_object(weights.tolist())
        if any(w != in_use[0] for w in in_use):
            raise RuntimeError(f"domain weights differ across ranks after batch {done}: {in_use}")
        self.updates += 1
        metrics = {}
        for i, d in enumerate(self.domains):
            metrics[f"data/weight/{d}"] = float(weights[i])
            metrics[f"data/loss/{d}"] = float(losses[i])
            if self.reference is not None:
                metrics[f"data/gap/{d}"] = float(gaps[i])
        logger.log_metrics(metrics)
        if self.folder and dist.get_global_rank() == 0:
            row = {"batch": done, "effect_batch": effect, "ranks_agreeing": len(in_use), "domains": self.domains,
                   "weights": weights.tolist(),
                   "losses": losses.tolist(), "gaps": None if self.reference is None else gaps.tolist()}
            append_jsonl(os.path.join(self.folder, "domain_weights.jsonl"), row)
            atomic_write_text(os.path.join(self.folder, "domain_weights.json"),
                              json.dumps(dict(zip(self.domains, weights.tolist())), indent=1) + "\n")

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.folder and dist.get_global_rank() == 0:
            plot_domain_log(os.path.join(self.folder, "domain_weights.jsonl"), self.folder)

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state.get("updates", 0))
