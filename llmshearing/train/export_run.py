"""A training run's export as a dense HF model: from the live trainer when training ends (`export_trained`) or from a
Composer checkpoint (`export_checkpoint`, `llmshearing export`). The export itself (fold, slice, write) is
`pruning/export.py`; this module reads the run (its config, trainer or checkpoint) and hands the tensors over."""
from __future__ import annotations

import os
from dataclasses import replace

import torch
from composer.utils import dist

from llmshearing.data.tokenizer import model_tokenizer
from llmshearing.devices import dtype_of
from llmshearing.pruning import card
from llmshearing.pruning.export import (PRECISION_DTYPES, ExportOptions, TensorGetter, _fsdp_scope, _whole, check_export_dir,
                                        check_fits, dense_tensors, export_selection, state_getter, write_export)
from llmshearing.train.builders import build_l0
from llmshearing.checkpoint_files import read_tensor
from llmshearing.compat import unwrap
from llmshearing.train.config import run_dir  # the logs the card reads (save_folder or runs/<run_name>)
from llmshearing.train.restore import open_checkpoint
from llmshearing.errors import ConfigError


def recipe_dtype(cfg) -> torch.dtype:
    """The dtype an export of a run is written in by default: the run's training precision (bf16 for amp_bf16)."""
    return PRECISION_DTYPES[cfg.precision]


def export_trained(trainer, cfg, tokenizer, out_dir: str, overwrite: bool = False,
                   options: ExportOptions | None = None) -> dict | None:
    """Write the trained model as a dense HF model (rank 0) when training ends, from the live model: one layer at a
    time is folded and sliced into the export, so rank 0 holds the export plus one source layer beside the training
    state (no second copy of the student, none of the teacher). Under FSDP every rank takes part in gathering each
    layer (`_fsdp_scope`)."""
    model = unwrap(trainer.state.model)
    config = model.model.config
    masks, kept, target = export_selection(model.l0, config)
    device = model.l0.lambdas.device if model.l0 is not None else next(model.model.parameters()).device
    if trainer.state.fsdp_enabled:
        get, scope = _fsdp_scope(model.model)
    else:
        get, scope = state_getter(model.model.state_dict()), _whole
    tensors = dense_tensors(get, config, masks, kept, scope, device)
    failed = None
    if dist.get_global_rank() == 0:
        options = replace(options or ExportOptions(), dtype=(options and options.dtype) or recipe_dtype(cfg))
        ts = trainer.state.timestamp
        options.card = {**card.run_facts(cfg, int(ts.token), run_dir(cfg), batch=int(ts.batch)), **options.card}
        feed = (t for t in tensors)  # closing `feed` on an error (`yield from` does) leaves `tensors` to drain
        try:
            write_export(out_dir, target, feed, tokenizer, kept if model.l0 is not None else None, options,
                         overwrite, cfg.model.path)
        except Exception as e:  # a full disk, a write error: the other ranks are in the gathers, finish them first
            if dist.get_world_size() == 1:
                raise
            failed = e
    if trainer.state.fsdp_enabled:
        for _ in tensors:  # the same gathers as rank 0, in the same order (rank 0: those its failed write left)
            pass
    if dist.get_world_size() > 1:  # every rank learns how rank 0's write went, and each fails with it at once,
        # instead of waiting in the trainer's closing barrier for a rank 0 that is gone (until dist_timeout)
        outcome = [None if failed is None else (isinstance(failed, ConfigError), str(failed))]
        dist.broadcast_object_list(outcome, src=0)
        if failed is not None:
            raise failed
        if outcome[0] is not None:
            config_error, message = outcome[0]
            raise (ConfigError if config_error else RuntimeError)(f"rank 0's export failed: {message}")
    return kept if model.l0 is not None else None


def export_checkpoint(checkpoint: str, out_dir: str, config_path: str | None = None,
                      dtype: str | None = None, overwrite: bool = False,
                      options: ExportOptions | None = None, model_path: str | None = None) -> dict | None:
    """`llmshearing export`: a Composer checkpoint -> dense HF model (of the target shape when pruning);
    `model_path`: the run's source model folder where it lives now, if it moved since the run.

    Only the student's tensors and masks are read (compat.CheckpointModel: memory-mapped `.pt`, or DCP reads of
    exactly those keys), one at a time into the fold, so the host holds the export plus one source tensor and its
    slices: never the optimizer state, the teacher or a second model."""
    check_export_dir(out_dir, "out_dir", overwrite)  # before the checkpoint is read
    cfg, reader = open_checkpoint(checkpoint, config_path, model_path)
    config = cfg.source_config
    l0 = build_l0(cfg)
    check_fits(reader, config, l0)
    if l0 is not None:
        l0.load_state_dict({k: read_tensor(reader, "l0." + k) for k in l0.state_dict()})
    masks, kept, target = export_selection(l0, config)
    names = [n.removeprefix("model.") for n in reader.names if n.startswith("model.")]
    get = TensorGetter(lambda name: read_tensor(reader, "model." + name), names)
    tokens = reader.value("timestamp", "Timestamp", "token")
    options = options or ExportOptions()
    options = replace(options, dtype=dtype_of(dtype) if dtype else options.dtype or recipe_dtype(cfg))
    options.card = {**card.run_facts(cfg, tokens, os.path.dirname(os.path.realpath(reader.path)), checkpoint=checkpoint,
                                     batch=reader.value("timestamp", "Timestamp", "batch")), **options.card}
    write_export(out_dir, target, dense_tensors(get, config, masks, kept), model_tokenizer(cfg.model),
                 kept if l0 is not None else None, options, overwrite, cfg.model.path)
    return kept if l0 is not None else None
