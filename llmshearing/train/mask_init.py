"""`pruning.init: activation`: the masks start on the one-shot activation-importance choice (the oneshot_act arm's
keep set) instead of all open, and the Lagrangian refines them from there.

Rank 0 scores the units (llmshearing.pruning.oneshot.activation_scores) on the first `pruning.init_sequences`
sequences of every domain of the run's training split, maps the scores to log_alpha bands
(masks.init_bands, oneshot.set_scores), logs the calibration tokens and records them in `<run folder>/mask_init.json`
(forward passes only: they are not training tokens). Rank 0 computes because under FSDP only rank 0 reads the
weights; `share_masks` then broadcasts its log_alpha to every rank. A run that resumes (load_path, or autoresume
with a checkpoint) skips the scoring: its log_alpha come from the checkpoint.
"""
from __future__ import annotations

import json
import os
import time

import torch
from composer.utils import dist

from llmshearing.io import atomic_write_text
from llmshearing.checkpoint_files import LATEST_NAME

REPORT = "mask_init.json"


def resumes(cfg) -> bool:
    """Composer will load a checkpoint: `load_path`, or autoresume with a `latest` link in save_folder (repaired
    before, checkpoint_files.repair_latest)."""
    latest = cfg.save_folder and os.path.exists(os.path.join(cfg.save_folder, LATEST_NAME.format(rank=0)))
    return cfg.load_path is not None or bool(cfg.autoresume and latest)


@torch.no_grad()
def init_masks(cfg, model, folder: str, device: str) -> dict | None:
    """Set the masks of a fresh `pruning.init: activation` run from activation scores (rank 0 only; see
    `share_masks`). Returns the record written to `<folder>/mask_init.json`, or None when there is nothing to do."""
    from llmshearing.pruning.masks import init_bands  # heavy: transformers
    # heavy: transformers
    from llmshearing.pruning.oneshot import SCORING, activation_scores, calibration_ids, set_scores

    p = cfg.pruning
    if p is None or p.init != "activation" or dist.get_global_rank() != 0 or resumes(cfg):
        return None
    start = time.time()
    d = cfg.data
    ids = calibration_ids(d.root, d.domains, p.init_sequences, d.split, remote=d.remote)
    lm = model.model
    where = next(lm.parameters()).device
    on = torch.device("cuda", dist.get_local_rank()) if device == "gpu" else where
    scores = activation_scores(lm.to(on), ids.to(on))
    lm.to(where)  # Composer moves or shards the model itself
    kept, dropped = init_bands(p.log_alpha_clamp)
    set_scores(model.l0, {k: v.to(model.l0.lambdas.device) for k, v in scores.items()}, kept, dropped)  # where l0 is
    if p.init_at_target:
        model.l0.lower_kept_to_target()
    record = {"init": "activation", "scoring": SCORING["activation"], "split": d.split, "domains": list(d.domains),
              "sequences_per_domain": p.init_sequences, "calibration_sequences": int(ids.shape[0]),
              "calibration_tokens": int(ids.numel()), "kept_band": list(kept), "dropped_band": list(dropped),
              "init_at_target": p.init_at_target,
              "expected_shape_step0": model.l0.expected_shape(), "seconds": round(time.time() - start, 2)}
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(os.path.join(folder, REPORT), json.dumps(record, indent=1) + "\n")
    shape = " / ".join(f"{v:.1f}" for v in record["expected_shape_step0"].values())
    print(f"mask init: activation importance on {ids.shape[0]} calibration sequences ({ids.numel():,} tokens of the "
          f"'{d.split}' split; forward passes only, not counted as training tokens) in {record['seconds']:.1f}s; "
          f"expected layers / hidden / heads / KV heads / intermediate at step 0: {shape}", flush=True)
    return record


@torch.no_grad()
def share_masks(cfg, model) -> None:
    """Every rank takes rank 0's log_alpha (all ranks call this once the Trainer, and so the process group,
    exists). After a resume all ranks already hold the checkpoint's values, and this changes nothing."""
    if cfg.pruning is None or cfg.pruning.init != "activation" or dist.get_world_size() == 1:
        return
    for mask in model.l0.masks.values():
        dist.broadcast(mask.log_alpha.data, src=0)
