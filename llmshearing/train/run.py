"""Running a stage: train (pruning or continued pretraining), export, free the memory; the `composer train.py` entry."""
from __future__ import annotations

import ctypes
import gc
import sys
import time

from llmshearing.errors import run_entry
from llmshearing.train.run_folder import claim, unlock
from llmshearing.train.config import parse_config, run_dir, TrainConfig, validate


def run(cfg: TrainConfig) -> dict:
    """Train one stage (pruning or continued pretraining) and export it when `export_dir` is set.
    A run stopped by SIGTERM returns {'stopped_after': batch} and exports nothing. The trainer is closed and
    its memory freed before returning, so one process can run several stages (the demo, reproduce-mini)."""
    from llmshearing.compat import close_trainer  # heavy: torch
    from llmshearing.train.builders import build_trainer  # Composer: imported only once the config is known good

    try:
        trainer, tokenizer = build_trainer(cfg)
        result = _fit_and_export(trainer, tokenizer, cfg)
        close_trainer(trainer)
    finally:
        unlock(run_dir(cfg))
    del trainer  # the last reference: free_memory can now collect the model, optimizer and dataloaders
    free_memory()
    return result


def _fit_and_export(trainer, tokenizer, cfg: TrainConfig) -> dict:
    from llmshearing.callbacks.run_guard import Preempted  # heavy: composer, torch, transformers
    from llmshearing.train.export_run import export_trained  # heavy: composer, torch, transformers

    start = time.time()
    try:
        trainer.fit()
    except Preempted as stop:  # SIGTERM / SIGINT: checkpoint written, nothing else to do (no eval, no export)
        return {"seconds": time.time() - start, "kept": None, "stopped_after": stop.batch, "signal": stop.signum}
    from composer.utils import dist  # heavy: composer

    seconds = time.time() - start
    say = print if dist.get_global_rank() == 0 else (lambda *_: None)  # once per run, not once per rank
    say(f"training finished in {seconds:.1f}s")
    kept = None
    if cfg.export_dir:
        kept = export_trained(trainer, cfg, tokenizer, cfg.export_dir, overwrite=True)
        say(f"exported the {'pruned' if cfg.pruning else 'trained'} model to {cfg.export_dir}")
    return {"seconds": seconds, "kept": kept, "stopped_after": None}


def free_memory() -> None:
    """Collect garbage and hand freed memory back: the CUDA cache, and glibc's heap pages (kept otherwise, so
    RSS would not fall after a stage)."""
    import torch  # heavy: torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    malloc_trim()


def malloc_trim() -> None:
    """glibc's malloc_trim(0); nothing on other C libraries."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: composer train.py <recipe.yaml> [key=value ...]")
        return 0 if argv else 2
    return run_entry(_main, argv)


def _main(argv: list[str]) -> int:
    cfg = parse_config(argv[0], argv[1:])
    folder = run_dir(cfg)
    try:
        claim(folder, cfg)  # before the slow checks: a second launch on a busy or finished folder refuses at once
        cfg = validate(cfg)
        from llmshearing.callbacks.run_guard import NonFiniteLossError  # Composer (seconds): only once the config is good

        try:
            result = run(cfg)
        except NonFiniteLossError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
    finally:
        unlock(folder)
    return 128 + result["signal"] if result["stopped_after"] is not None else 0
