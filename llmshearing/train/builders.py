"""Builders: a validated TrainConfig -> tokenizer, data, model, optimizer, callbacks, Composer Trainer.

Order matters: everything that can fail on bad input (config, paths, target, tokenizer, data) is
checked before the weights are read, so a typo costs seconds.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
from composer import Evaluator, Trainer
from composer.utils import dist, reproducibility
from torch.utils.data import DataLoader

from llmshearing.callbacks import ClipGradNorm, DynamicLoading, PruningLog, ReplicatedGrads, guards
from llmshearing.callbacks.dynamic_loading import eval_label
from llmshearing import registry
from llmshearing.compat import (enable_fsdp_on_cpu, ignore_stop_signals, install_atomic_writes, kill_workers_at_exit,
                               per_node_signal_files)
from llmshearing.data.layout import DomainSequences
from llmshearing.data.mixture import DomainMixture, MixtureLoader
from llmshearing.data.tokenizer import check_tokenizer, model_tokenizer
from llmshearing.io import atomic_write_text
from llmshearing.train.composer_model import ComposerLM
from llmshearing.model.decoder import attention_kernel
from llmshearing.model.distill import Teacher
from llmshearing.model.hf import load_hf_config
from llmshearing.model.loading import empty_model, from_pretrained
from llmshearing.pruning.masks import L0Module
from llmshearing.pruning.shapes import shape_of
from llmshearing.checkpoint_files import repair_latest
from llmshearing.train.config import TrainConfig, batches, microbatch_size, run_device, run_dir, to_yaml
from llmshearing.train.mask_init import init_masks, share_masks
from llmshearing.train.run_folder import CONFIG_NAME, check_binding, lock


def build_model(cfg: TrainConfig, load_weights: bool = True) -> ComposerLM:
    """The ComposerLM: pretrained weights (or an empty shell to load a checkpoint into) + masks."""
    if load_weights:
        lm = from_pretrained(cfg.model.path, cfg.model.gguf_file, cfg.model.attn_impl, config=cfg.source_config)
    else:
        lm = empty_model(cfg.source_config, cfg.model.attn_impl)
    return ComposerLM(lm, build_l0(cfg))


def build_l0(cfg: TrainConfig) -> L0Module | None:
    """The run's masks and multipliers (None without pruning), at their initial values."""
    if cfg.pruning is None:
        return None
    p = cfg.pruning
    l0 = L0Module(shape_of(cfg.source_config), cfg.target_shape, batches(p.lagrangian_warmup), p.init_drop, seed=cfg.seed,
                  log_alpha_range=p.log_alpha_clamp, eval_target_model=p.eval_target_model, hidden_mask=p.hidden_mask,
                  penalty=p.penalty)
    if p.init == "uniform" and p.init_at_target:  # (init=activation lowers its kept band instead: train.mask_init)
        l0.open_at_target()
    return l0


def build_teacher(cfg: TrainConfig, load_weights: bool = True) -> Teacher | None:
    """The frozen teacher of `distill:` (None without): `source` reads model.path again (the unmasked source),
    otherwise the named folder; fp32 like the student, so both run in the run's precision (autocast / FSDP's
    mixed precision apply to both alike). Ranks that receive weights from rank 0 get an unwritten shell."""
    d = cfg.distill
    if d is None:
        return None
    path, gguf = (cfg.model.path, cfg.model.gguf_file) if d.teacher == "source" else (d.teacher, None)
    config = cfg.source_config if d.teacher == "source" else load_hf_config(path)
    if load_weights:
        lm = from_pretrained(path, gguf, cfg.model.attn_impl, config=config)
    else:
        lm = empty_model(config, cfg.model.attn_impl)
    return Teacher(lm, d.alpha, d.temperature, d.top_k)


def build_optimizer(cfg: TrainConfig, model: ComposerLM) -> torch.optim.Optimizer:
    o = cfg.optimizer
    lrs = (cfg.pruning.mask_lr, cfg.pruning.lambda_lr) if cfg.pruning else (0.0, 0.0)
    groups = model.param_groups(o.lr, o.weight_decay, *lrs)
    optimizer = torch.optim.AdamW  # its class name keys the optimizer state in checkpoints: kept for the default
    if cfg.pruning and cfg.pruning.mask_beta1 is not None:
        groups[1]["betas"] = (cfg.pruning.mask_beta1, tuple(o.betas)[1])
    if cfg.pruning and cfg.pruning.mask_eps is not None:
        groups[1]["eps"] = cfg.pruning.mask_eps
    if cfg.pruning and cfg.pruning.lambda_optimizer == "sgd":
        groups[-1]["plain"] = True
        optimizer = PlainGroupsAdamW
    return optimizer(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


class PlainGroupsAdamW(torch.optim.AdamW):
    """AdamW, except that param groups marked `plain` take plain gradient steps p -= lr * grad (the multipliers
    under `pruning.lambda_optimizer: sgd`, whose reversed gradient makes that ascent on the gap). Adam normalises
    each step to ~lr whatever the gradient's size, so a multiplier keeps winding up at full speed while the masks
    sit a hair off the target; a plain step is proportional to the gap and vanishes at the target.

    Each plain parameter keeps one state entry, its step count: torch's checkpoint state dict
    (`set_optimizer_state_dict`, what Composer resumes through) needs a state for every trainable parameter and
    raised KeyError 'l0.lambdas' on resume when there was none."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        for group in groups:
            if group.get("plain"):
                for p in group["params"]:
                    count = self.state[p].setdefault("step", torch.tensor(0.0))
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])
                        count += 1
        self.param_groups = [g for g in groups if not g.get("plain")]
        try:
            super().step()
        finally:
            self.param_groups = groups
        return loss


def build_scheduler(cfg: TrainConfig):
    """The scheduler named by `scheduler.name`, given those of t_warmup / alpha_f that it takes."""
    s = cfg.scheduler
    factory = registry.schedulers.get(s.name, "scheduler.name")
    accepted = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in (("t_warmup", s.t_warmup), ("alpha_f", s.alpha_f)) if k in accepted})


def build_dataloaders(cfg: TrainConfig, per_device: int) -> tuple[DataLoader, list[Evaluator]]:
    """The training DataLoader over the domain mixture and one Composer Evaluator per domain."""
    d = cfg.data
    train_set = DomainMixture(d.root, d.split, d.domains, d.proportions, batch_size=per_device, seed=cfg.seed,
                              remote=d.remote)
    workers = {}
    if d.num_workers:
        workers = {"prefetch_factor": d.prefetch_factor,
                   "worker_init_fn": functools.partial(ignore_stop_signals, sigterm=cfg.save_on_sigterm)}
        if cfg.save_on_sigterm:
            kill_workers_at_exit()
    train_loader = MixtureLoader(train_set, num_workers=d.num_workers, **workers)
    evaluators = []
    for domain in d.domains:
        eval_set = DomainSequences(d.root, domain, "eval", d.eval_sequences_per_domain, d.remote)
        loader = DataLoader(eval_set, batch_size=cfg.device_eval_batch_size,
                            sampler=dist.get_sampler(eval_set, shuffle=False))
        evaluators.append(Evaluator(label=eval_label(domain), dataloader=loader,
                                    metric_names=["LanguageCrossEntropy", "LanguagePerplexity"]))
    return train_loader, evaluators


def build_callbacks(cfg: TrainConfig, folder: str) -> list:
    """The project's callbacks (from their sections) and those named in `callbacks:`."""
    built = guards(cfg.save_folder, to_yaml(cfg), cfg.stop_on_nonfinite, cfg.save_on_sigterm)
    if cfg.fsdp is not None:
        built.append(ReplicatedGrads())
    if cfg.optimizer.clip_grad_norm is not None:  # after ReplicatedGrads: the masks' gradients are averaged first
        built.append(ClipGradNorm(cfg.optimizer.clip_grad_norm))
    if cfg.pruning:
        built.append(PruningLog(folder))
    d, dyn = cfg.data, cfg.data.dynamic
    built.append(DynamicLoading(d.domains, dyn.reference_losses, dyn.eta, dyn.smoothing, dyn.rule, folder)
                 if dyn else DynamicLoading(d.domains, folder=folder))
    built += [registry.callbacks.build(name, kwargs, "callbacks") for name, kwargs in (cfg.callbacks or {}).items()]
    return built


def build_loggers(cfg: TrainConfig, folder: str) -> list:
    """`wandb:` (offline with WANDB_MODE=offline; its folder is created first) and those named in `loggers:`."""
    built = []
    if cfg.wandb is not None:
        wandb_dir = cfg.wandb.dir or os.path.join(folder, "wandb")
        os.makedirs(wandb_dir, exist_ok=True)
        init = {"dir": wandb_dir, **({"mode": cfg.wandb.mode} if cfg.wandb.mode else {})}
        built.append(registry.loggers.build("wandb", {"project": cfg.wandb.project, "entity": cfg.wandb.entity,
                                                      "init_kwargs": init}, "wandb"))
    built += [registry.loggers.build(name, kwargs, "loggers") for name, kwargs in (cfg.loggers or {}).items()]
    return built


def fsdp_settings(cfg: TrainConfig, device: str) -> dict | None:
    """Composer's `parallelism_config['fsdp']` for the run. With several ranks, rank 0 alone reads the weights
    and FSDP broadcasts them (`sync_module_states`), so that setting is forced on. On CPU (tests, laptops) the
    shims of `compat.enable_fsdp_on_cpu` let the same Composer code path run over gloo."""
    if cfg.fsdp is None:
        return None
    settings = dict(cfg.fsdp)
    if dist.get_world_size() > 1:
        settings["sync_module_states"] = True
    if device == "cpu":
        enable_fsdp_on_cpu()
    return settings


def build_trainer(cfg: TrainConfig):
    """(Composer Trainer, tokenizer) for a validated config. Checks that need the model's config and tokenizer
    run first, then the run folder is locked and checked against the run it holds, the weights are read, and
    the run config is written only once the Trainer exists (the run is known to start)."""
    tokenizer = model_tokenizer(cfg.model)
    check_tokenizer(cfg.data.root, tokenizer, cfg.source_config.vocab_size, cfg.model.path)
    device = run_device(cfg)
    folder = run_dir(cfg)
    if dist.get_global_rank() == 0:
        lock(folder)  # before the binding check, so that two runs started at once cannot both pass it
        check_binding(folder, cfg)
        print(f"attention: {attention_kernel(cfg.model.attn_impl, device, cfg.precision)}", flush=True)

    reproducibility.seed_all(cfg.seed)  # before the model is built: anything it draws follows the seed
    install_atomic_writes()
    per_node_signal_files()  # autoresume on a save_folder shared by several nodes
    if cfg.autoresume and dist.get_global_rank() == 0:
        repair_latest(cfg.save_folder)
    per_device = cfg.global_train_batch_size // dist.get_world_size()
    fsdp = fsdp_settings(cfg, device)
    rank0_reads = fsdp is not None and dist.get_world_size() > 1  # the others receive the weights from rank 0
    model = build_model(cfg, load_weights=not rank0_reads or dist.get_global_rank() == 0)
    # Not part of build_model: exports and checkpoint loading need the student alone (see composer_model.TEACHER).
    model.teacher = build_teacher(cfg, load_weights=not rank0_reads or dist.get_global_rank() == 0)
    if model.l0 is not None:
        init_masks(cfg, model, folder, device)  # pruning.init=activation, fresh runs only (rank 0; see share_masks)
        model.l0.sample_offset = dist.get_global_rank() * per_device
        if fsdp is not None and device == "gpu":  # Composer moves only the FSDP-wrapped children to the GPU
            model.l0.to(torch.device("cuda", dist.get_local_rank()))
    train_loader, evaluators = build_dataloaders(cfg, per_device)
    trainer = Trainer(
        run_name=cfg.run_name, model=model, train_dataloader=train_loader, eval_dataloader=evaluators,
        max_duration=cfg.max_duration, eval_interval=cfg.eval_interval,
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        optimizers=build_optimizer(cfg, model), schedulers=build_scheduler(cfg), step_schedulers_every_batch=True,
        device=device, precision=cfg.precision,
        device_train_microbatch_size=microbatch_size(cfg.device_train_microbatch_size, per_device, device),
        parallelism_config={"fsdp": fsdp} if fsdp else None,
        seed=cfg.seed, callbacks=build_callbacks(cfg, folder), loggers=build_loggers(cfg, folder),
        dist_timeout=cfg.dist_timeout,
        save_folder=cfg.save_folder, save_interval=cfg.save_interval, save_overwrite=cfg.save_overwrite,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        load_path=cfg.load_path, autoresume=cfg.autoresume,
        progress_bar=cfg.progress_bar, log_to_console=cfg.log_to_console,
        console_log_interval=cfg.console_log_interval,
    )
    share_masks(cfg, model)
    if dist.get_global_rank() == 0:
        atomic_write_text(os.path.join(folder, CONFIG_NAME), to_yaml(cfg))
    return trainer, tokenizer
