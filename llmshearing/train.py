"""Builders: a validated TrainConfig -> tokenizer, data, model, optimizer, callbacks, Composer Trainer.

Order matters: everything that can fail on bad input (config, paths, target, tokenizer, data) is
checked before the weights are read, so a typo costs seconds.
"""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import time

import torch

from llmshearing.arch import load_hf_config, resolve_target, shape_of
from llmshearing.config import TrainConfig, load_config, to_yaml
from llmshearing.errors import ConfigError
from llmshearing.io import atomic_write_text


def load_tokenizer(model_cfg):
    """The run's tokenizer: model.tokenizer, else the model's own (from its GGUF file when it has one)."""
    from llmshearing.shards import load_tokenizer as load

    path = model_cfg.tokenizer or model_cfg.path
    if not os.path.exists(path):
        raise ConfigError(f"model.tokenizer '{path}' does not exist")
    same = model_cfg.tokenizer in (None, model_cfg.path)
    return load(path, model_cfg.gguf_file if same else None)


def run_dir(cfg: TrainConfig) -> str:
    return cfg.save_folder or os.path.join("runs", cfg.run_name)


def batches(duration: str) -> int:
    if not duration.endswith("ba"):
        raise ConfigError(f"expected a duration in batches like '320ba', got '{duration}'")
    return int(duration[:-2])


def build_model(cfg: TrainConfig, source_config=None, target=None, load_weights: bool = True):
    """The ShearingModel: pretrained weights (or an empty shell to load a checkpoint into) + masks."""
    from llmshearing.composer_model import ShearingModel
    from llmshearing.l0 import L0Module
    from llmshearing.model import DecoderLM, from_pretrained

    source_config = source_config or load_hf_config(cfg.model.path, cfg.model.gguf_file)
    if load_weights:
        lm = from_pretrained(cfg.model.path, cfg.model.gguf_file, cfg.model.attn_impl)
    else:
        with torch.device("meta"):
            lm = DecoderLM(source_config, cfg.model.attn_impl)
        lm.to_empty(device="cpu")
        lm.tie_weights()
    l0 = None
    if cfg.pruning is not None:
        target = target or resolve_target(cfg.pruning.target, source_config)
        l0 = L0Module(shape_of(source_config), target, batches(cfg.pruning.lagrangian_warmup), cfg.pruning.init_drop,
                     seed=cfg.seed)
    return ShearingModel(lm, l0)


def build_trainer(cfg: TrainConfig):
    from composer import Evaluator, Trainer
    from composer.callbacks import LRMonitor, SpeedMonitor
    from composer.optim import ConstantScheduler, CosineAnnealingWithWarmupScheduler, LinearWithWarmupScheduler
    from composer.utils import dist, reproducibility
    from torch.utils.data import DataLoader

    from callbacks import DynamicLoading, PruningMonitor, RunGuard
    from callbacks.dynamic_loading import eval_label
    from llmshearing.checkpointing import install_atomic_writes, repair_latest
    from llmshearing.mixture import DomainMixture, DomainSequences, ignore_sigterm, kill_workers_at_exit
    from llmshearing.shards import check_tokenizer

    source_config = load_hf_config(cfg.model.path, cfg.model.gguf_file)
    target = resolve_target(cfg.pruning.target, source_config) if cfg.pruning else None
    tokenizer = load_tokenizer(cfg.model)
    check_tokenizer(cfg.data.shards, tokenizer, source_config.vocab_size, cfg.model.path)
    folder = run_dir(cfg)
    if dist.get_global_rank() == 0:
        atomic_write_text(os.path.join(folder, "run_config.yaml"), to_yaml(cfg))

    reproducibility.seed_all(cfg.seed)  # before the model is built: anything it draws follows the seed
    install_atomic_writes()
    if cfg.autoresume and dist.get_global_rank() == 0:
        repair_latest(cfg.save_folder)
    per_device = cfg.global_train_batch_size // dist.get_world_size()
    model = build_model(cfg, source_config, target)
    if model.l0 is not None:
        model.l0.sample_offset = dist.get_global_rank() * per_device
    o = cfg.optimizer
    groups = model.param_groups(o.lr, o.weight_decay, *(
        (cfg.pruning.mask_lr, cfg.pruning.lambda_lr) if cfg.pruning else (0.0, 0.0)))
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    s = cfg.scheduler
    scheduler = {
        "cosine_with_warmup": lambda: CosineAnnealingWithWarmupScheduler(t_warmup=s.t_warmup, alpha_f=s.alpha_f),
        "linear_with_warmup": lambda: LinearWithWarmupScheduler(t_warmup=s.t_warmup, alpha_f=s.alpha_f),
        "constant": ConstantScheduler,
    }[s.name]()

    d = cfg.data
    train_set = DomainMixture(d.shards, d.split, d.domains, d.proportions, batch_size=per_device, seed=cfg.seed,
                              num_workers=d.num_workers, prefetch_factor=d.prefetch_factor)
    workers = {"prefetch_factor": d.prefetch_factor, "worker_init_fn": ignore_sigterm if cfg.save_on_sigterm else None}
    if d.num_workers and cfg.save_on_sigterm:
        kill_workers_at_exit()
    train_loader = DataLoader(train_set, batch_size=per_device, num_workers=d.num_workers,
                              **(workers if d.num_workers else {}))
    evaluators = []
    for domain in d.domains:
        eval_set = DomainSequences(d.shards, domain, "eval", d.eval_sequences_per_domain)
        loader = DataLoader(eval_set, batch_size=cfg.device_eval_batch_size,
                            sampler=dist.get_sampler(eval_set, shuffle=False))
        evaluators.append(Evaluator(label=eval_label(domain), dataloader=loader,
                                    metric_names=["LanguageCrossEntropy", "LanguagePerplexity"]))
    callbacks = [SpeedMonitor(window_size=10), LRMonitor(),
                 RunGuard(cfg.save_folder, cfg.stop_on_nonfinite, cfg.save_on_sigterm)]
    if cfg.pruning:
        callbacks.append(PruningMonitor(folder))
    dyn = d.dynamic
    callbacks.append(DynamicLoading(d.domains, dyn.reference_losses, dyn.eta, dyn.smoothing, dyn.clamp_min, folder)
                     if dyn else DynamicLoading(d.domains, folder=folder))
    loggers = []
    if cfg.wandb is not None:
        from composer.loggers import WandBLogger

        wandb_dir = cfg.wandb.dir or os.path.join(folder, "wandb")
        os.makedirs(wandb_dir, exist_ok=True)
        init = {"dir": wandb_dir, **({"mode": cfg.wandb.mode} if cfg.wandb.mode else {})}
        loggers.append(WandBLogger(project=cfg.wandb.project, entity=cfg.wandb.entity, init_kwargs=init))

    device = cfg.device or ("gpu" if torch.cuda.is_available() else "cpu")
    if cfg.fsdp and device != "gpu":
        raise ConfigError("fsdp is set but there is no GPU; set fsdp=null to train on CPU")
    trainer = Trainer(
        run_name=cfg.run_name, model=model, train_dataloader=train_loader,
        eval_dataloader=evaluators,
        max_duration=cfg.max_duration, eval_interval=cfg.eval_interval,
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        optimizers=optimizer, schedulers=scheduler, step_schedulers_every_batch=True,
        device=device, precision=cfg.precision, device_train_microbatch_size=cfg.device_train_microbatch_size,
        parallelism_config={"fsdp": dict(cfg.fsdp)} if cfg.fsdp else None,
        seed=cfg.seed, callbacks=callbacks, loggers=loggers, dist_timeout=cfg.dist_timeout,
        save_folder=cfg.save_folder, save_interval=cfg.save_interval, save_overwrite=cfg.save_overwrite,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        load_path=cfg.load_path, autoresume=cfg.autoresume,
        progress_bar=cfg.progress_bar, log_to_console=cfg.log_to_console,
        console_log_interval=cfg.console_log_interval,
    )
    return trainer, tokenizer


def export_model(model, out_dir: str, tokenizer, dtype=None, overwrite: bool = False) -> dict | None:
    """The dense HF model of a ShearingModel: pruning folds and slices the masks, plain training saves as is."""
    from llmshearing.prune import finalize, save_hf

    lm, kept = finalize(model.model, model.l0) if model.l0 is not None else (model.model, None)
    save_hf(lm, out_dir, tokenizer, kept, dtype=dtype, overwrite=overwrite)
    return kept


def export_trained(trainer, tokenizer, out_dir: str, overwrite: bool = False) -> dict | None:
    """Write the trained model as a dense HF model (rank 0) when training ends. Under FSDP the full
    parameters are gathered to rank 0's CPU first (written for GPU runs; not run on CPU, where Composer's
    FSDP is unavailable: `llmshearing export` of the saved full checkpoint is the tested path)."""
    from composer.utils import dist

    from llmshearing.composer_model import unwrap

    kept, gather = None, contextlib.nullcontext()
    if trainer.state.fsdp_enabled:  # FSDP1: materialize the full parameters on rank 0 (CPU) for the export
        from torch.distributed.fsdp import FullyShardedDataParallel

        gather = FullyShardedDataParallel.summon_full_params(trainer.state.model, writeback=False, rank0_only=True,
                                                             offload_to_cpu=True)
    with gather:
        if dist.get_global_rank() == 0:
            kept = export_model(unwrap(trainer.state.model), out_dir, tokenizer, overwrite=overwrite)
    dist.barrier()
    return kept


def run(cfg: TrainConfig) -> dict:
    """Train one stage (pruning or continued pretraining) and export it when `export_dir` is set.
    A run stopped by SIGTERM returns {'stopped_after': batch} and exports nothing. The trainer is closed and
    its memory freed before returning, so one process can run several stages (the demo, reproduce-mini)."""
    trainer, tokenizer = build_trainer(cfg)
    result = _fit_and_export(trainer, tokenizer, cfg)
    close_trainer(trainer)
    del trainer  # the last reference: free_memory can now collect the model, optimizer and dataloaders
    free_memory()
    return result


def _fit_and_export(trainer, tokenizer, cfg: TrainConfig) -> dict:
    from callbacks.run_guard import Preempted

    start = time.time()
    try:
        trainer.fit()
    except Preempted as stop:  # SIGTERM: checkpoint written, nothing else to do (no eval, no export)
        return {"seconds": time.time() - start, "kept": None, "stopped_after": stop.batch}
    seconds = time.time() - start
    print(f"training finished in {seconds:.1f}s")
    kept = None
    if cfg.export_dir:
        kept = export_trained(trainer, tokenizer, cfg.export_dir, overwrite=True)
        print(f"exported the {'pruned' if cfg.pruning else 'trained'} model to {cfg.export_dir}")
    return {"seconds": seconds, "kept": kept, "stopped_after": None}


def close_trainer(trainer) -> None:
    """Close a trainer and drop the references that outlive it. Two of them kept every trainer's state (model,
    optimizer, dataloaders: 2-3 GB per SmolLM2 stage, 16.5 GB peak over reproduce-mini's six arms) until the
    process exited: Composer 0.32's Engine registers `atexit(Engine._close, state, logger)`, and torch 2.7's
    `torch.distributed.checkpoint.state_dict._get_fqns` is an lru_cache keyed by the model. After close() the
    hook has nothing left to do, so it is unregistered (this also drops the hook of any other open trainer:
    close those yourself), and the cache is cleared (it only saves recomputing parameter names).
    """
    import atexit

    from composer.core.engine import Engine
    from torch.distributed.checkpoint import state_dict as dcp_state_dict

    trainer.close()
    atexit.unregister(Engine._close)
    cached = getattr(dcp_state_dict, "_get_fqns", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


def free_memory() -> None:
    """Collect garbage and hand freed memory back: the CUDA cache, and glibc's heap pages (kept otherwise, so
    RSS would not fall after a stage)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    malloc_trim()


def malloc_trim() -> None:
    """glibc's malloc_trim(0); nothing on other C libraries."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: composer train.py <recipe.yaml> [key=value ...]")
        return 0 if argv else 2
    from callbacks.run_guard import NonFiniteLossError

    try:
        cfg = load_config(argv[0], argv[1:])
        result = run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 128 + signal.SIGTERM if result["stopped_after"] is not None else 0


def load_checkpoint(checkpoint: str, config_path: str | None = None):
    """(run config, ShearingModel) from a Composer checkpoint of a pruning or continued-pretraining run.

    The run's `run_config.yaml` (written beside the checkpoints at the start of training) says
    which model, tokenizer and target the checkpoint belongs to.
    """
    from omegaconf import OmegaConf

    from llmshearing.config import TrainConfig, _build

    if not os.path.exists(checkpoint):
        raise ConfigError(f"checkpoint '{checkpoint}' does not exist")
    config_path = config_path or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "run_config.yaml")
    if not os.path.exists(config_path):
        raise ConfigError(f"no run config at '{config_path}'; pass --config <run_config.yaml> of the training run")
    cfg = _build(TrainConfig, OmegaConf.to_container(OmegaConf.load(config_path), resolve=True), "")
    model = build_model(cfg, load_weights=False)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weights = state["state"]["model"] if "state" in state else state
    model.load_state_dict({k.removeprefix("module."): v for k, v in weights.items()}, strict=True)
    return cfg, model.eval()


def export_checkpoint(checkpoint: str, out_dir: str, config_path: str | None = None,
                      dtype: str | None = None, overwrite: bool = False) -> dict | None:
    """`llmshearing export`: a Composer checkpoint -> dense HF model (of the target shape when pruning)."""
    cfg, model = load_checkpoint(checkpoint, config_path)
    return export_model(model, out_dir, load_tokenizer(cfg.model), getattr(torch, dtype) if dtype else None, overwrite)
