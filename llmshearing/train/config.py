"""The run config: yaml + command-line overrides -> a typed, validated `TrainConfig`.

Everything that can be checked without training is checked here, before any weights are read,
and every error names the key and the fix (a typo gets the closest key name suggested).
"""
from __future__ import annotations

import difflib
import functools
import math
import os
import re
import sys
from importlib import resources
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace

from omegaconf import DictConfig, ListConfig, OmegaConf

from llmshearing import registry
from llmshearing.checks import check_checkpoint, check_finite, inside, load_structured, writable_output
from llmshearing.data.layout import check_domains, check_positions, read_manifest, refuse_test
from llmshearing.data.reweighting import check_weights
from llmshearing.data.remote import normalise, shards_root
from llmshearing.data.tokenizer import load_tokenizer, model_tokenizer, tokenizer_fingerprint
from llmshearing.errors import ConfigError
from llmshearing.checkpoint_files import embedded_config


@dataclass
class ModelConfig:
    path: str  # HF model directory (or a directory holding `gguf_file`)
    gguf_file: str | None = None
    tokenizer: str | None = None  # defaults to `path`
    attn_impl: str = "auto"  # auto | sdpa | flash


@dataclass
class PruningConfig:
    target: typing.Any  # preset name, path of an HF config.json (or its directory), or a mapping of dims
    lagrangian_warmup: str = "0ba"  # target sparsity ramps linearly from 0 over this many batches
    # initial drop probability p of every gate (log_alpha = log((1-p)/p)); null: the released code's log_alpha
    # N(5, 0.01), clamped to ln 100 = 4.61 at the first forward (P(gate open) 0.998: the dense model)
    init_drop: float | None = None
    log_alpha_clamp: tuple | None = (math.log(1e-2), math.log(1e2))  # clamp before every forward; null: none
    eval_target_model: bool = False  # evals during pruning: false = the current expected size (released code)
    mask_lr: float = 1.0
    lambda_lr: float = 1.0
    # uniform: every gate starts (almost) open, as above (the released code); activation: log_alpha from one-shot
    # activation importance, so the masks start on oneshot_act's keep set, at the target (use lagrangian_warmup
    # 0ba with it; docs/fidelity.md "Importance-initialised masks")
    init: str = "uniform"
    init_sequences: int = 4  # init=activation: calibration sequences per domain of data.split (not training tokens)
    # adam: the multipliers take AdamW steps like every other parameter (the released code): each step is ~lambda_lr
    # whatever the size of the gap; sgd: plain gradient ascent, lambda += lambda_lr * gap (docs/convergence.md)
    lambda_optimizer: str = "adam"
    # Adam's beta1 for the mask log-alphas; null: optimizer.betas[0] (as the released code). 0 takes away the masks'
    # momentum: measured worse, every structure drifts more (docs/convergence.md, round 2)
    mask_beta1: float | None = None
    # Adam's eps for the mask log-alphas; null: optimizer.eps. A larger one keeps a small force small (Adam divides a
    # gradient by its own scale, so a tiny Lagrangian pull moves a saturated gate at full speed; docs/convergence.md)
    mask_eps: float | None = None
    # init=activation: lower each row's kept log_alphas together until its expected count is the target, so the
    # Lagrangian starts with no gap (the dropped units sit at the clamp floor, P(open) 0.047, not 0)
    init_at_target: bool = False
    # null: the quadratic term's weight is a learned multiplier lambda_2 (the paper); a number rho: a fixed penalty
    # rho / 2 * gap^2 (the augmented Lagrangian), whose pull grows with the gap at once instead of after the
    # multipliers have integrated it (docs/convergence.md, round 5)
    penalty: float | None = None
    # residual: the hidden gate scales the embedding and every residual write; original: also every RMSNorm output
    # (the released code), folded into the norm weights at export; both export exactly (docs/convergence.md)
    hidden_mask: str = "residual"


@dataclass
class DistillConfig:
    """Logit distillation (llmshearing.model.distill): loss = alpha * T^2 * KL(teacher || student) at temperature T
    + (1 - alpha) * cross-entropy, on the next-token logits of the training batches (evals stay plain LM losses)."""
    teacher: str = "source"  # source: the pruning source (model.path, read again, without masks); or an HF model folder
    alpha: float = 1.0  # weight of the KD term; 1: logits only (as Minitron), 0: plain LM loss, KD only logged
    temperature: float = 1.0
    top_k: int | None = None  # null: KL over the whole vocabulary; k: over the teacher's top-k tokens, both renormalised


@dataclass
class DynamicLoadingConfig:
    """Dynamic batch loading (paper Sec. 2.2): after each eval, w <- softmax(log w + eta * gap)."""
    reference_losses: typing.Any  # domain -> loss, a list in data.domains order, or a yaml file from `llmshearing reference-loss`
    eta: float = 1.0  # step size on the loss gap (the paper's update is eta = 1)
    smoothing: float = 1e-4  # mix c/k of the uniform distribution into the new weights (released code: 1e-4)
    rule: str = "paper"  # paper: gap = max(loss - reference, 0) (Algorithm 1); released: no clamp (the code)


@dataclass
class DataConfig:
    shards: str | None = None  # folder built by `make shards` / `python -m llmshearing.data_prep.shards` (manifest.json + MDS shards)
    # ... or that folder in object storage (s3://, gs://, oci://, or a path such as an NFS mount), read through
    # `local`, a per-node cache filled on first use (llmshearing/data/remote.py); give shards or remote + local
    remote: str | None = None
    local: str | None = None
    split: str = "prune"  # training split: prune | continue
    domains: list | None = None  # subset and order of the shards' domains; default: all
    proportions: typing.Any = None  # initial weights: domain -> weight, a domain_weights.json path, or the shards'
    dynamic: DynamicLoadingConfig | None = None  # null: fixed mixture (losses are still logged per domain)
    eval_sequences_per_domain: int | None = None  # default: the whole eval split
    num_workers: int = 0
    prefetch_factor: int = 2

    @property
    def root(self) -> str:
        """The folder the manifest and indexes are read from: the shards, or the remote's cache."""
        return self.shards or self.local


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None  # clip the global gradient norm (masks and multipliers included)


@dataclass
class SchedulerConfig:
    name: str = "cosine_with_warmup"  # cosine_with_warmup | linear_with_warmup | constant
    t_warmup: str = "0ba"
    alpha_f: float = 0.1


@dataclass
class WandbConfig:
    project: str = "llmshearing"
    entity: str | None = None
    mode: str | None = None  # None: taken from WANDB_MODE
    dir: str | None = None


@dataclass
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    max_duration: str
    global_train_batch_size: int
    run_name: str = "llmshearing"
    pruning: PruningConfig | None = None
    distill: DistillConfig | None = None  # null: no teacher
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 17
    device_train_microbatch_size: int | str = "auto"
    device_eval_batch_size: int = 4
    eval_interval: str = "100ba"
    eval_subset_num_batches: int = -1
    precision: str = "fp32"  # fp32 | amp_bf16 | amp_fp16
    device: str | None = None  # cpu | gpu; None picks gpu when available
    fsdp: dict | None = None  # passed to Composer as parallelism_config['fsdp']
    save_folder: str | None = None
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    load_path: str | None = None
    autoresume: bool = False
    export_dir: str | None = None  # write the dense HF model here when training ends
    save_on_sigterm: bool = True  # SIGTERM (preemption, job time limit): checkpoint, then stop (needs save_folder)
    stop_on_nonfinite: bool = True  # NaN/inf loss or gradient: save the state before that batch and stop
    dist_timeout: float = 300.0  # seconds a collective waits for the other ranks before the run fails
    wandb: WandbConfig | None = None
    # Extra Composer callbacks / loggers by registered name -> keyword arguments (llmshearing.registry).
    callbacks: dict | None = field(default_factory=lambda: {"speed_monitor": {"window_size": 10}, "lr_monitor": {}})
    loggers: dict | None = None
    progress_bar: bool = True
    console_log_interval: str = "1ba"
    log_to_console: bool = False

    # Read once per run (validate reads them first; the builders, binding checks and export reuse them), not fields:
    # as_dict, from_mapping, replace and == see only the yaml's keys.
    @functools.cached_property
    def source_config(self):
        """model.path's transformers config, its folder checked (a supported family, weights that agree with it)."""
        from llmshearing.model.loading import check_model_folder  # heavy: torch, transformers

        return check_model_folder(self.model.path, self.model.gguf_file, "model.path", supported=True)

    @functools.cached_property
    def target_shape(self):
        """`pruning.target` resolved against the source (a Shape); None when this run does not prune."""
        from llmshearing.pruning.target import resolve_target  # heavy: transformers

        return resolve_target(self.pruning.target, self.source_config) if self.pruning is not None else None


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        tp = origin
    if tp is tuple:
        return isinstance(value, (list, tuple))
    return isinstance(value, tp)


def from_mapping(cls, raw, where: str):
    """A config dataclass `cls` from a plain mapping (a parsed yaml, a checkpoint's embedded config): an unknown key
    (with the closest known one), a missing required key or a wrong type is a ConfigError naming `where` + the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in fields(cls)}
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{where}{close[0]}'?" if close else f"; allowed keys: {', '.join(sorted(names))}"
            raise ConfigError(f"unknown key '{where}{key}'{hint}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        key = f"{where}{f.name}"
        if f.name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"missing required key '{key}'")
            continue
        value, tp = raw[f.name], hints[f.name]
        sub = [a for a in typing.get_args(tp) if is_dataclass(a)] or ([tp] if is_dataclass(tp) else [])
        if sub and value is not None:
            value = from_mapping(sub[0], value, key + ".")
        elif not _type_ok(value, tp):
            raise ConfigError(f"'{key}' must be of type {getattr(tp, '__name__', tp)}, got {value!r}")
        if tp is tuple or typing.get_origin(tp) is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def batches(duration: str) -> int:
    if not duration.endswith("ba"):
        raise ConfigError(f"expected a duration in batches like '320ba', got '{duration}'")
    return int(duration[:-2])


def run_device(cfg: TrainConfig) -> str:
    """Composer's device name of the run, 'gpu' or 'cpu' (gpu when available unless `device` says otherwise); torch's
    device string of a tool's --device is `devices.resolve_device`."""
    from llmshearing.devices import composer_device  # torch: imported once the cheap checks have passed

    device = composer_device(cfg.device)
    if device == "cpu" and cfg.precision != "fp32":
        raise ConfigError(f"precision={cfg.precision} needs a GPU; on CPU set precision=fp32")
    return device


def _check_duration(key: str, value: str, units=("ba", "tok", "ep", "sp")) -> None:
    if not re.fullmatch(rf"\d+({'|'.join(units)})", str(value)):
        raise ConfigError(f"'{key}'='{value}' is not a duration like '100ba' (units: {', '.join(units)})")


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# The shortest target ramp measured to hold the uniform init's expected shape within 1% with a fixed penalty AND leave
# the kept gates decided, with a final loss no worse than the released settings' (SmolLM2-135M, 200 steps; 3 seeds in
# the bench, 6 end to end; docs/convergence.md rounds 6-7); 16 of 40 steps did not.
UNIFORM_DAMPED_MIN_RAMP = 80

# key -> (test, what it must be): numeric ranges, checked after the types. A key whose section is off is skipped.
RANGES = {
    "optimizer.lr": (lambda v: v >= 0, ">= 0"),
    "optimizer.betas": (lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v),
                        "two numbers in [0, 1)"),
    "optimizer.eps": (lambda v: v > 0, "> 0"),
    "optimizer.weight_decay": (lambda v: v >= 0, ">= 0"),
    "scheduler.alpha_f": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "pruning.mask_lr": (lambda v: v > 0, "> 0"),
    "pruning.lambda_lr": (lambda v: v > 0, "> 0"),
    "distill.alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    # T in [0.1, 100]: below, softmax(logits / T) is one-hot in float32 for any logit gap > ~10 T (the KL is 0 or
    # its gradient overflows); above, both distributions are flat to within 1% for logit spreads < T / 100, so the
    # KL measures nothing (and the T^2 factor scales the loss by up to 1e4)
    "distill.temperature": (lambda v: 0.1 <= v <= 100, "in [0.1, 100] (below, the softened distributions are one-hot "
                                                       "and the KL is 0 or overflows; above, they are flat and the KL "
                                                       "measures nothing)"),
    # top_k = 1 renormalises both distributions onto the teacher's one token: p = q = 1, the KL is 0 for any student
    "distill.top_k": (lambda v: v is None or v >= 2, "null (the whole vocabulary) or >= 2 (with 1, both "
                                                     "distributions are renormalised onto one token, so the KL is 0 "
                                                     "whatever the student does)"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2^32)"),
    "device_eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "eval_subset_num_batches": (lambda v: v == -1 or v >= 1, "-1 (all) or >= 1"),
    "save_num_checkpoints_to_keep": (lambda v: v >= -1, "-1 (all) or >= 0"),
    "dist_timeout": (lambda v: v > 0, "a positive number of seconds"),
}


def _check_ranges(cfg: TrainConfig) -> None:
    for f in fields(cfg):
        check_finite(as_dict(getattr(cfg, f.name)), f.name)
    for key, (ok, what) in RANGES.items():
        try:
            value = _get(cfg, key)
        except AttributeError:  # e.g. pruning.* in a run without pruning
            continue
        if not ok(value):
            raise ConfigError(f"'{key}' must be {what}, got {value!r}")


def microbatch_size(mb, per_device: int, device: str):
    """Composer's `device_train_microbatch_size`: 'auto' searches for the largest microbatch that fits in GPU
    memory, which Composer supports only on GPUs; on CPU it means the whole per-device batch."""
    return per_device if mb == "auto" and device == "cpu" else mb


def run_dir(cfg: TrainConfig) -> str:
    """The run folder: logs, plots, run_config.yaml and checkpoints."""
    return cfg.save_folder or os.path.join("runs", cfg.run_name)


def check_outputs(cfg: TrainConfig) -> None:
    """The run folder and export folder can be written, and the export can never replace the run or a folder
    it did not create (see llmshearing.pruning.export.check_export_dir)."""
    from llmshearing.pruning.export import check_export_dir  # heavy: torch, transformers

    folder = run_dir(cfg)
    writable_output(folder, "save_folder")
    if cfg.export_dir:
        if inside(folder, cfg.export_dir):
            raise ConfigError(f"export_dir '{cfg.export_dir}' would replace the run folder '{folder}' (its "
                              f"checkpoints and logs); give export_dir its own folder, e.g. {folder}/export")
        check_export_dir(cfg.export_dir, "export_dir", overwrite=True)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks that need no weights: paths, files, ranges, choices, divisibility, durations, outputs."""
    if not os.path.exists(cfg.model.path):
        raise ConfigError(f"model.path '{cfg.model.path}' does not exist; run 'make fetch' or point it at an HF model directory")
    if cfg.model.gguf_file and not os.path.exists(os.path.join(cfg.model.path, cfg.model.gguf_file)):
        raise ConfigError(f"model.gguf_file '{cfg.model.gguf_file}' not found in '{cfg.model.path}'")
    _check_ranges(cfg)
    from llmshearing.model.decoder import resolve_attn_impl  # torch + transformers: after the cheap checks

    resolve_attn_impl(cfg.model.attn_impl)
    cfg = replace(cfg, data=resolve_data(cfg.data))
    for key in ("max_duration", "eval_interval", "save_interval", "console_log_interval", "scheduler.t_warmup"):
        obj = _get(cfg, key)
        _check_duration(key, obj)
        if str(obj).endswith("ep"):
            raise ConfigError(f"'{key}'='{obj}': the training stream is endless (any number of passes over "
                              f"each domain), so there are no epochs; give batches, e.g. '100ba'")
        if key != "scheduler.t_warmup" and int(str(obj).rstrip("abtokesp")) == 0:
            raise ConfigError(f"'{key}'='{obj}' must be positive (0 would {'never train' if key == 'max_duration' else 'never happen'})")
    if cfg.pruning is not None:
        _check_duration("pruning.lagrangian_warmup", cfg.pruning.lagrangian_warmup, ("ba",))
        p = cfg.pruning
        if str(cfg.max_duration).endswith("ba") and batches(p.lagrangian_warmup) > batches(cfg.max_duration):
            print(f"warning: pruning.lagrangian_warmup={p.lagrangian_warmup} is longer than max_duration="
                  f"{cfg.max_duration}: the target sparsity ramp ends after the run, so the masks are not driven all "
                  f"the way to the target (the export still cuts to it exactly)", file=sys.stderr)
        if p.init_drop is not None and not 0 < p.init_drop < 1:
            raise ConfigError(f"pruning.init_drop must be in (0, 1) or null, got {p.init_drop}")
        if p.log_alpha_clamp is not None and not (len(p.log_alpha_clamp) == 2 and all(
                isinstance(x, (int, float)) for x in p.log_alpha_clamp) and p.log_alpha_clamp[0] < p.log_alpha_clamp[1]):
            raise ConfigError(f"pruning.log_alpha_clamp must be [low, high] with low < high, or null; got "
                              f"{list(p.log_alpha_clamp)}")
        check_mask_init(p)
    if cfg.optimizer.clip_grad_norm is not None and not cfg.optimizer.clip_grad_norm > 0:
        raise ConfigError(f"optimizer.clip_grad_norm must be a positive number or null, got {cfg.optimizer.clip_grad_norm}")
    registry.schedulers.get(cfg.scheduler.name, "scheduler.name")
    for section, reg in (("callbacks", registry.callbacks), ("loggers", registry.loggers)):
        if not isinstance(getattr(cfg, section) or {}, dict):
            raise ConfigError(f"'{section}' must map registered names to keyword arguments, e.g. {{lr_monitor: {{}}}}")
        for name, kwargs in (getattr(cfg, section) or {}).items():
            reg.check(name, kwargs, section)
    if cfg.precision not in ("fp32", "amp_bf16", "amp_fp16"):
        raise ConfigError(f"precision must be fp32, amp_bf16 or amp_fp16, got '{cfg.precision}'")
    if cfg.device not in (None, "cpu", "gpu"):
        raise ConfigError(f"device must be cpu or gpu, got '{cfg.device}'")
    run_device(cfg)
    if cfg.fsdp is not None:
        check_fsdp(cfg.fsdp)
    if cfg.load_path is not None and "://" not in cfg.load_path:
        if not os.path.exists(cfg.load_path):
            raise ConfigError(f"load_path '{cfg.load_path}' does not exist; point it at a checkpoint such as "
                              f"<save_folder>/latest-rank0.pt, or use autoresume=true with the run's save_folder")
        check_checkpoint(cfg.load_path, "load_path")
    for key in ("save_folder", "export_dir"):
        value = getattr(cfg, key)
        if value is not None and "://" in value:
            raise ConfigError(f"{key}='{value}': remote folders are not supported (checkpoints and exports are "
                              f"written atomically to a local or shared filesystem); give a local path and copy "
                              f"the results with your object-store tool")
    if cfg.autoresume and not cfg.save_folder:
        raise ConfigError("autoresume=true needs save_folder (where the run's checkpoints are found)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.global_train_batch_size < 1 or cfg.global_train_batch_size % world:
        raise ConfigError(
            f"global_train_batch_size={cfg.global_train_batch_size} must be a positive multiple of the world size {world}"
        )
    mb = cfg.device_train_microbatch_size
    if isinstance(mb, str) and mb != "auto":
        raise ConfigError(f"device_train_microbatch_size must be an integer or 'auto', got '{mb}'")
    if isinstance(mb, int) and (mb < 1 or (cfg.global_train_batch_size // world) % mb):
        raise ConfigError(f"device_train_microbatch_size={mb} must divide the per-device batch {cfg.global_train_batch_size // world}")
    if cfg.distill is not None:
        check_distill(cfg)
    check_outputs(cfg)
    source = cfg.source_config
    check_positions(cfg.data.root, source, cfg.model.path)
    check_load_path_fits(cfg, source)
    if cfg.pruning is not None:
        check_pruning_does_something(cfg, source)
    return cfg


def check_pruning_does_something(cfg: TrainConfig, source) -> None:
    """A pruning target that is the source's own shape (e.g. `pruning.target={}`) would run a pruning run that
    prunes nothing; calibration sequences beyond the split would be capped without a word."""
    from llmshearing.model.hf import SUPPORTED_MODEL_TYPES, is_gemma, layer_norm  # heavy: transformers
    from llmshearing.pruning.shapes import shape_of  # heavy: transformers

    if cfg.pruning.hidden_mask == "original" and (is_gemma(source) or layer_norm(source)):
        raise ConfigError(f"pruning.hidden_mask=original gates RMSNorm outputs (the released code's Llama); "
                          f"{source.model_type} has {'Gemma' if is_gemma(source) else 'Layer'}Norms: use residual")
    if source.model_type in SUPPORTED_MODEL_TYPES and cfg.target_shape == shape_of(source):
        raise ConfigError(f"pruning.target {cfg.pruning.target!r} is the source's own shape "
                          f"({shape_of(source).as_dict()}): this run would prune nothing; give smaller dims, a preset "
                          f"or {{params: N}} (see `llmshearing target {cfg.model.path} --fraction 0.5`)")
    p, d = cfg.pruning, cfg.data
    if p.init == "activation":
        splits = read_manifest(d.root)["domains"]
        have = {name: int(splits[name]["splits"][d.split]["sequences"]) for name in d.domains}
        short = {name: n for name, n in have.items() if n < p.init_sequences}
        if short:
            raise ConfigError(f"pruning.init_sequences={p.init_sequences} is more than the '{d.split}' split holds for "
                              f"{', '.join(f'{k} ({v})' for k, v in short.items())}; give at most {min(have.values())}")


def check_load_path_fits(cfg: TrainConfig, source) -> None:
    """`load_path` (a checkpoint file) holds this run's model: the decoder's tensors have the shapes model.path
    implies, and it has masks exactly when this run prunes (Composer loads non-strictly, so masks would be dropped
    or missing silently, and another shape ends in a 'size mismatch' traceback). Reads the checkpoint through mmap
    and builds the model on the meta device: no weights are read or allocated."""
    if cfg.load_path is None or "://" in cfg.load_path or os.path.isdir(os.path.realpath(cfg.load_path)):
        return  # a sharded checkpoint: DCP checks every tensor's shape when it loads
    import torch  # heavy: torch

    from llmshearing.model.hf import SUPPORTED_MODEL_TYPES  # heavy: transformers
    from llmshearing.pruning.export import decoder_shapes  # heavy: torch, transformers

    if source.model_type not in SUPPORTED_MODEL_TYPES:
        return
    try:
        state = torch.load(cfg.load_path, map_location="cpu", weights_only=False, mmap=True)["state"]
        held = {k.removeprefix("module."): tuple(v.shape) for k, v in state["model"].items()}
    except Exception:  # noqa: BLE001 - Composer's own loader names what it cannot read
        return
    expected = {f"model.{k}": shape for k, shape in decoder_shapes(source).items()}
    has_masks = any(k.startswith("l0.") for k in held)
    where = f"load_path '{cfg.load_path}'"
    if has_masks != (cfg.pruning is not None):
        if has_masks:
            raise ConfigError(f"{where} is a pruning run's checkpoint (it holds masks) but this run has no pruning "
                              f"section, so its masks would be dropped: export it (llmshearing export) and give the "
                              f"export as model.path, or add the pruning run's pruning section")
        raise ConfigError(f"{where} is a checkpoint of a run without pruning (e.g. continued pretraining of a pruned "
                          f"model) but this run prunes: a pruning run starts from an HF model folder (model.path) or "
                          f"resumes a pruning run's checkpoint; export that checkpoint and give it as model.path")
    for name, shape in expected.items():
        if name in held and held[name] != shape:
            raise ConfigError(f"{where} does not fit model.path '{cfg.model.path}': tensor '{name}' is {held[name]} "
                              f"there but {shape} in this model; give a checkpoint of a run of this model")
    embedded = embedded_config(state)
    if embedded is not None:
        old = OmegaConf.to_container(OmegaConf.create(embedded), resolve=True)
        note_objective_change(old, cfg, f"the run of load_path '{cfg.load_path}'")


def check_distill(cfg: TrainConfig) -> None:
    """The teacher is a supported model folder whose token ids mean what the student's do (same vocab_size and,
    when its folder has a tokenizer, the same vocabulary), and Composer's FSDP can leave it out of the optimizer."""
    from llmshearing.model.hf import SUPPORTED_MODEL_TYPES  # heavy: transformers
    from llmshearing.model.loading import check_model_folder  # heavy: torch, transformers

    d = cfg.distill
    student = cfg.source_config
    if d.top_k is not None and d.top_k > student.vocab_size:
        raise ConfigError(f"distill.top_k={d.top_k} is larger than the vocabulary ({student.vocab_size}); use null "
                          f"for the whole vocabulary")
    if cfg.fsdp is not None and cfg.fsdp.get("use_orig_params") is False:
        raise ConfigError("distill needs fsdp.use_orig_params=true (the default): Composer's FSDP can leave the "
                          "frozen teacher out of the optimizer only with the original parameters")
    same = d.teacher != "source" and os.path.realpath(d.teacher) == os.path.realpath(cfg.model.path)
    if d.teacher == "source" or same:
        if cfg.pruning is None:
            raise ConfigError(f"distill.teacher=source is the pruning source, but this run has no pruning section: "
                              f"its model.path '{cfg.model.path}' is the student itself; give the model to distil "
                              f"from, e.g. distill.teacher=<the pruning run's model.path>"
                              + (f" (distill.teacher '{d.teacher}' is model.path: the KL of the student with itself "
                                 f"is 0, so nothing would be distilled)" if same else ""))
        return  # the student's own folder, checked as model.path
    if not os.path.exists(d.teacher):
        raise ConfigError(f"distill.teacher '{d.teacher}' does not exist; give 'source' (the pruning source) or an "
                          f"HF model folder")
    teacher = check_model_folder(d.teacher, None, "distill.teacher")
    if teacher.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"distill.teacher '{d.teacher}': model_type '{teacher.model_type}' is not supported; "
                          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(f"distill.teacher '{d.teacher}' has vocab_size {teacher.vocab_size} but the student "
                          f"(model.path '{cfg.model.path}') has {student.vocab_size}: distillation compares the two "
                          f"next-token distributions token id by token id, so both need the same tokenizer")
    if any(os.path.exists(os.path.join(d.teacher, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        theirs, ours = load_tokenizer(d.teacher), model_tokenizer(cfg.model)
        if tokenizer_fingerprint(theirs) != tokenizer_fingerprint(ours):
            raise ConfigError(f"distill.teacher '{d.teacher}' has a different tokenizer from the student's "
                              f"('{cfg.model.tokenizer or cfg.model.path}'): the same vocab_size, but token ids that "
                              f"mean other strings; distil from a model with the student's tokenizer")
    else:
        print(f"warning: distill.teacher '{d.teacher}' holds no tokenizer; only its vocab_size was checked against "
              f"the student's", file=sys.stderr)
    check_positions(cfg.data.root, teacher, d.teacher)
    _note_small_teacher(cfg, student, teacher)


def _note_small_teacher(cfg: TrainConfig, student, teacher) -> None:
    """A teacher with fewer parameters than the student (the pruning target, or the continued model) is allowed but
    rarely meant: distillation then pulls the student towards a weaker model."""
    from llmshearing.model.hf import SUPPORTED_MODEL_TYPES  # heavy: transformers
    from llmshearing.pruning.shapes import param_count, shape_of  # heavy: transformers

    if student.model_type not in SUPPORTED_MODEL_TYPES:
        return
    shape = cfg.target_shape or shape_of(student)
    theirs, ours = param_count(shape_of(teacher), teacher), param_count(shape, student)
    if theirs < ours:
        print(f"warning: distill.teacher '{cfg.distill.teacher}' has {theirs / 1e6:.1f}M parameters, fewer than the "
              f"student's {ours / 1e6:.1f}M{' (the pruning target)' if cfg.pruning else ''}: distillation pulls the "
              f"student towards a smaller model; check that this is the teacher you meant", file=sys.stderr)


def check_mask_init(p: PruningConfig) -> None:
    """pruning.init is a known init; activation needs calibration sequences and room in the clamp range for its
    two bands (llmshearing.pruning.masks.init_bands)."""
    from llmshearing.pruning.masks import INIT_BAND  # heavy: torch, transformers

    if p.mask_eps is not None and not p.mask_eps > 0:
        raise ConfigError(f"pruning.mask_eps must be a positive number or null (optimizer.eps), got {p.mask_eps}")
    if p.penalty is not None and not p.penalty >= 0:
        raise ConfigError(f"pruning.penalty must be a number >= 0 or null (a learned lambda_2), got {p.penalty}")
    if p.mask_beta1 is not None and not 0 <= p.mask_beta1 < 1:
        raise ConfigError(f"pruning.mask_beta1 must be in [0, 1) or null (optimizer.betas[0]), got {p.mask_beta1}")
    for key, allowed in (("lambda_optimizer", ("adam", "sgd")), ("hidden_mask", ("residual", "original"))):
        if getattr(p, key) not in allowed:
            raise ConfigError(f"pruning.{key} must be {' or '.join(allowed)}, got '{getattr(p, key)}'")
    if p.init not in ("uniform", "activation"):
        raise ConfigError(f"pruning.init must be uniform (every gate starts open) or activation (log_alpha from "
                          f"activation importance on calibration sequences), got '{p.init}'")
    if p.init_sequences < 1:  # checked with init=uniform too: a -5 must not wait for the day init changes
        raise ConfigError(f"pruning.init_sequences must be >= 1 (calibration sequences per domain), got {p.init_sequences}")
    if p.init == "uniform":
        if p.mask_eps is not None:
            print(f"warning: pruning.init=uniform with pruning.mask_eps={p.mask_eps}: every gate starts open at the top "
                  "of the clamp, where its Lagrangian gradient is ~1e-5, and a large Adam eps shrinks such steps ~100x, "
                  "so the masks barely move (SmolLM2-135M, 40 steps, one seed: 25.8 of 24 layers and 7.1 of 4 heads at "
                  "the cut; docs/convergence.md); with the uniform init use pruning.mask_eps=null", file=sys.stderr)
        if p.lambda_optimizer == "sgd" and p.penalty is None:
            print("warning: pruning.init=uniform with plain-gradient multipliers (pruning.lambda_optimizer=sgd) "
                  "without pruning.penalty: on SmolLM2-135M the masks overshoot the target (21.6% off on layers after "
                  "a 16-step ramp; docs/convergence.md round 5)", file=sys.stderr)
        elif p.lambda_optimizer == "sgd" and batches(p.lagrangian_warmup) < UNIFORM_DAMPED_MIN_RAMP:  # longer: no warning
            print(f"warning: pruning.init=uniform with pruning.penalty and a target ramp of {p.lagrangian_warmup}: on "
                  f"SmolLM2-135M a 16-step ramp held the expected shape with the kept gates half open, and that "
                  f"sheared arm ended 3x worse than the released settings (docs/convergence.md round 5); an "
                  f"{UNIFORM_DAMPED_MIN_RAMP}-step ramp or longer lets the gates decide, and that sheared arm ended no "
                  f"worse than the released settings, without their bad seeds (rounds 6-7)", file=sys.stderr)
        if p.init_at_target and batches(p.lagrangian_warmup) > 0:
            print(f"warning: pruning.init_at_target starts every gate at the target, and pruning.lagrangian_warmup="
                  f"{p.lagrangian_warmup} ramps the target sparsity up from 0, so the Lagrangian first reopens them; "
                  f"use pruning.lagrangian_warmup=0ba", file=sys.stderr)
        return
    if p.log_alpha_clamp is not None and p.log_alpha_clamp[1] - p.log_alpha_clamp[0] <= 2 * INIT_BAND:
        raise ConfigError(f"pruning.init=activation puts kept and dropped units in the top and bottom {INIT_BAND} of "
                          f"pruning.log_alpha_clamp; {list(p.log_alpha_clamp)} is too narrow for both")
    if p.init_drop is not None:
        print(f"warning: pruning.init_drop={p.init_drop} is ignored with pruning.init=activation (the scores set "
              f"every log_alpha)", file=sys.stderr)
    if batches(p.lagrangian_warmup) > 0:
        print(f"warning: pruning.init=activation starts the masks at the target, and pruning.lagrangian_warmup="
              f"{p.lagrangian_warmup} ramps the target sparsity up from 0, so the Lagrangian first reopens them (on "
              f"SmolLM2-135M this cost 2.4 nats at the cut after 40 steps, docs/fidelity.md); set "
              f"pruning.lagrangian_warmup=0ba", file=sys.stderr)


def resolve_data(data: DataConfig) -> DataConfig:
    """Shards exist and hold the domains; proportions and reference losses match the domains.
    Returns a copy with data.domains filled in and proportions / reference losses as lists in domain order
    (`data` itself is left as given)."""
    refuse_test(data.split, "data.split")
    if data.split not in ("prune", "continue"):
        raise ConfigError(f"data.split must be prune or continue, got '{data.split}'")
    if data.remote is not None:
        data = replace(data, remote=normalise(data.remote))
    if data.shards is None and data.remote is None:
        raise ConfigError("give the shards either as data.shards=<folder> or as data.remote=<uri or folder> with "
                          "data.local=<cache folder>")
    shards_root(data.shards, data.remote, data.local)
    manifest = read_manifest(data.root)
    domains = list(data.domains) if data.domains is not None else list(manifest["domains"])
    if not domains:
        raise ConfigError("data.domains is empty; name at least one domain of the shards")
    if len(set(domains)) != len(domains):
        raise ConfigError(f"data.domains lists a domain twice: {domains}")
    for split in (data.split, "eval"):
        check_domains(manifest, data.root, domains, split, remote=data.remote)
    proportions = data.proportions
    if isinstance(proportions, str):
        if not os.path.exists(proportions):
            raise ConfigError(f"data.proportions: '{proportions}' does not exist (expected a domain_weights.json)")
        proportions = load_structured(proportions, "data.proportions")
    if proportions is None:
        given = {d: float(manifest["domains"][d].get("proportion", 1.0)) for d in domains}
        total = sum(given.values())
        proportions = {d: v / total for d, v in given.items()} if total > 0 else None
    proportions = check_weights(proportions, domains, "data.proportions").tolist()
    dynamic = data.dynamic
    if dynamic is not None:
        ref = data.dynamic.reference_losses
        if isinstance(ref, str):  # a file written by `llmshearing reference-loss --out`
            if not os.path.exists(ref):
                raise ConfigError(f"data.dynamic.reference_losses: '{ref}' does not exist; write it with "
                                  f"'llmshearing reference-loss ... --out {ref}'")
            loaded = load_structured(ref, "data.dynamic.reference_losses")
            ref = loaded.get("reference_losses", loaded) if isinstance(loaded, dict) else loaded
        if isinstance(ref, dict):
            if set(ref) != set(domains):
                missing, extra = sorted(set(domains) - set(ref)), sorted(set(ref) - set(domains))
                raise ConfigError(f"data.dynamic.reference_losses must name the domains {domains}; "
                                  f"missing {missing}, unknown {extra}")
            ref = [ref[d] for d in domains]
        if not isinstance(ref, (list, tuple)) or len(ref) != len(domains):
            raise ConfigError(f"data.dynamic.reference_losses needs one loss per domain ({len(domains)}: "
                              f"{domains}), got {ref!r}; compute them with 'llmshearing reference-loss'")
        if not all(isinstance(x, (int, float)) and 0 < x < math.inf for x in ref):
            raise ConfigError(f"data.dynamic.reference_losses must be positive numbers, got {ref}")
        if not 0 <= dynamic.smoothing < 1:
            raise ConfigError(f"data.dynamic.smoothing must be in [0, 1), got {dynamic.smoothing}")
        if dynamic.rule not in ("paper", "released"):
            raise ConfigError(f"data.dynamic.rule must be paper (gap clamped at 0) or released (no clamp), got "
                              f"'{dynamic.rule}'")
        if not 0 < dynamic.eta < math.inf:
            raise ConfigError(f"data.dynamic.eta must be positive, got {dynamic.eta}")
        dynamic = replace(dynamic, reference_losses=[float(x) for x in ref])
    if data.num_workers < 0 or data.prefetch_factor < 1:
        raise ConfigError("data.num_workers must be >= 0 and data.prefetch_factor >= 1")
    if data.eval_sequences_per_domain is not None and data.eval_sequences_per_domain < 1:
        raise ConfigError(f"data.eval_sequences_per_domain must be >= 1 or null, got {data.eval_sequences_per_domain}")
    return replace(data, domains=domains, proportions=proportions, dynamic=dynamic)


def check_fsdp(fsdp: dict) -> None:
    """The `fsdp` section must be a valid Composer FSDPConfig (checked without GPUs): known keys, values of the
    field's type, and for the keys that take a name, one of the names Composer maps (it would fail with a KeyError
    or ValueError traceback at wrap time otherwise)."""
    from composer.distributed.mosaic_parallelism import BACKWARD_PREFETCH_MAP, SHARDING_MAP  # heavy: composer
    from composer.utils.parallelism import FSDPConfig  # heavy: composer

    allowed = {f.name for f in fields(FSDPConfig) if f.init}
    for key in fsdp:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            raise ConfigError(f"unknown key 'fsdp.{key}'" + (f"; did you mean 'fsdp.{close[0]}'?" if close else ""))
    hints = typing.get_type_hints(FSDPConfig)
    for key, value in fsdp.items():
        if key != "mixed_precision" and hints.get(key) in (bool, int, str) and not _type_ok(value, hints[key]):
            raise ConfigError(f"'fsdp.{key}' must be of type {hints[key].__name__}, got {value!r}")
    names = {"sharding_strategy": list(SHARDING_MAP), "backward_prefetch": list(BACKWARD_PREFETCH_MAP),
             "mixed_precision": ["DEFAULT", "PURE", "FULL"], "state_dict_type": ["full", "sharded"]}
    for key, choices in names.items():
        value = fsdp.get(key)
        if value is None or (key == "mixed_precision" and isinstance(value, dict)):
            if isinstance(value, dict) and not set(value) <= {"param_dtype", "reduce_dtype", "buffer_dtype"}:
                raise ConfigError(f"'fsdp.mixed_precision' as a mapping takes param_dtype, reduce_dtype and "
                                  f"buffer_dtype, got {sorted(value)}")
            continue
        given = value if key == "state_dict_type" else str(value).upper()  # Composer upper-cases the others
        if given not in choices:
            close = difflib.get_close_matches(given, choices, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"'fsdp.{key}' must be one of {', '.join(choices)}, got {value!r}{hint}")
    FSDPConfig(**fsdp)


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped in the package (the repository's yamls/), e.g. 'testing/prune_tiny'."""
    root = resources.files("llmshearing.recipes")
    names = []
    for sub in ("", "testing/"):
        folder = root.joinpath(sub) if sub else root
        names += [sub + f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml")]
    return sorted(names)


def resolve_recipe(path_or_name: str) -> str:
    """A recipe file: an existing path as given, else a shipped recipe by name ('prune_1.3b',
    'testing/prune_tiny', with or without '.yaml'), so an installed package runs without the repository."""
    if os.path.exists(path_or_name):
        return path_or_name
    name = path_or_name.removeprefix("yamls/").removesuffix(".yaml")
    if name in shipped_recipes():
        return str(resources.files("llmshearing.recipes").joinpath(f"{name}.yaml"))
    close = difflib.get_close_matches(name, shipped_recipes(), n=1)
    hint = f"; did you mean the shipped recipe '{close[0]}'?" if close else f"; shipped recipes: {', '.join(shipped_recipes())}"
    raise ConfigError(f"config file '{path_or_name}' does not exist{hint}")


def load_config(path: str, overrides: list[str] | None = None) -> TrainConfig:
    """Read a yaml recipe (a path or a shipped recipe's name), apply `key=value` overrides (OmegaConf
    dotlist), validate."""
    return validate(parse_config(path, overrides))


def parse_config(path: str, overrides: list[str] | None = None) -> TrainConfig:
    """The recipe with its overrides as a typed TrainConfig: keys and types checked, nothing else (no file is
    opened but the recipe); `validate` does the rest."""
    path = resolve_recipe(path)
    raw = load_structured(path, "config")
    if not isinstance(raw, dict):
        raise ConfigError(f"config: '{path}' must be a yaml mapping of keys, got {type(raw).__name__}")
    conf = OmegaConf.create(raw)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        for o in overrides:  # key=value replaces the value (a mapping or list is not merged into the old one)
            key = o.split("=", 1)[0]
            try:
                value = OmegaConf.select(OmegaConf.from_dotlist([o]), key)
                if isinstance(value, (DictConfig, ListConfig)):
                    value = OmegaConf.to_container(value)
                OmegaConf.update(conf, key, value, merge=False)
            except Exception as e:  # omegaconf's grammar and type errors
                raise ConfigError(f"override '{o}' could not be applied: {e}") from None
    try:
        raw = OmegaConf.to_container(conf, resolve=True)
    except Exception as e:  # e.g. ${oc.env:...} or interpolation errors
        raise ConfigError(f"'{path}': {e}") from None
    return from_mapping(TrainConfig, raw, "")


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(as_dict(cfg)))


def as_dict(obj):
    """The inverse of `from_mapping`: a config dataclass as a plain mapping (tuples as lists), as run_config.yaml
    holds it."""
    if is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def identity(run: dict | TrainConfig) -> dict:
    """What a run folder is bound to, from this run's TrainConfig or another run's config as a plain mapping (so
    that a run config written by an older version, with keys since renamed, still compares): the source model, the
    pruning target (as its resolved shape when the model config is at hand) and the data. Learning rates, durations
    and intervals may change on resume."""
    from llmshearing.model.hf import load_hf_config  # transformers: after the cheap checks
    from llmshearing.pruning.target import resolve_target  # the same

    this_run = isinstance(run, TrainConfig)
    raw = as_dict(run) if this_run else run
    model, data = raw.get("model") or {}, raw.get("data") or {}
    target = (raw.get("pruning") or {}).get("target")
    if target is not None:
        try:  # this run's target as resolved once; another run's from its own model config
            shape = run.target_shape if this_run else resolve_target(target, load_hf_config(model.get("path"),
                                                                                               model.get("gguf_file")))
            target = shape.as_dict()
        except Exception:  # noqa: BLE001 - the old run's model may be gone or changed: compare the spec as given
            pass
    path = lambda p: os.path.realpath(p) if isinstance(p, str) else p  # noqa: E731
    return {"model.path": path(model.get("path")), "model.gguf_file": model.get("gguf_file"), "pruning.target": target,
            "data.shards": path(data.get("shards")), "data.remote": normalise(data["remote"]) if isinstance(data.get("remote"), str) else data.get("remote"), "data.split": data.get("split", "prune"),
            "data.domains": data.get("domains")}


def note_objective_change(old: dict, cfg: TrainConfig, what: str) -> None:
    """Say so when a continued run trains toward another pruning target or with distillation switched on, off or
    changed: allowed (a deliberate change of plan), but the objective then changes at the resumed batch."""
    before, after, now = identity(old), identity(cfg), as_dict(cfg)
    if before["pruning.target"] != after["pruning.target"]:
        print(f"note: {what} pruned toward {before['pruning.target']}; this run continues toward "
              f"{after['pruning.target']}", file=sys.stderr, flush=True)
    if (old.get("distill") or None) != (now.get("distill") or None):
        print(f"note: {what} had distill={old.get('distill')}; this run has distill={now.get('distill')}: the training "
              f"objective changes at the resumed batch", file=sys.stderr, flush=True)
