"""`llmshearing plan <yaml> --gpus N --gpu-memory-gb M`: will a recipe fit, from the configs alone (no weights).

Reads the recipe raw (OmegaConf, env interpolations resolved leniently: `${oc.env:X,default}` gives the
default, an unresolvable one keeps its text), the model's config.json (or a shipped yamls/models/ config,
Llama-2-7B's or Llama-3.1-8B's, when the recipe's model path does not exist here) and prints the per-GPU
memory of one training step, host RAM per node, a verdict and the largest microbatch that fits, with and
without activation checkpointing. Every number is a formula below; nothing is measured, except with `--trace`,
which also runs one training step on the meta device and reports its measured peak (`plan_trace.py`).

Notation
--------
P params of the trained model (`llmshearing.pruning.shapes.param_count`: for pruning the *source* model,
all of whose weights are trained; for continued pretraining the pruned model). L layers, d hidden,
H query heads, K KV heads, h head_dim, I intermediate, V vocab. U = (P - R) / L params of one decoder
layer (one FSDP unit: `ComposerLM.fsdp_wrap_fn`), R = V*d*(1 if tied else 2) + d the root unit (embedding,
lm_head, final norm). N GPUs, S the sharding group (FULL_SHARD / SHARD_GRAD_OP: N; HYBRID_SHARD /
_HYBRID_SHARD_ZERO2: GPUs per node; NO_SHARD / no fsdp: 1). B microbatch, T sequence length.
c bytes of the compute dtype (2 for amp_bf16 / amp_fp16, 4 for fp32); p bytes of the gathered parameter
copy (Composer's fsdp.mixed_precision DEFAULT and PURE: c; FULL: 4); r bytes of the gradient
reduction (DEFAULT and FULL: 4; PURE: c). GiB = 2**30 bytes throughout, and --gpu-memory-gb is read in
GiB (an A100-80GB is 80 GiB = 81,920 MiB as nvidia-smi reports it).

Per GPU (one training step; the model keeps fp32 master weights, as `from_pretrained` loads fp32)
------------------------------------------------------------------------------------------------------
  params     4P/S        fp32 master shard
  grads      4P/S        fp32 gradient shard (no fsdp / DDP: 4P + 4P of DDP's gradient buckets)
  optimizer  8P/S        AdamW exp_avg + exp_avg_sq, fp32
  masks      16*M        pruning only: M = the L0 log-alphas (the gate shapes of `mask_specs`) + 2 Lagrange
                         multipliers per mask; value + grad + 2 Adam states, fp32, counted as replicated
                         on every rank (an upper bound: Composer wraps `l0` as its own FSDP module; it is
                         ~1.4M numbers for Llama-2-7B, a few MB)
  gathered_unit          FULL_SHARD / HYBRID_SHARD: 2*U*p (the all-gathered layer being computed and the
                         one prefetched; Composer's limit_all_gathers keeps at most two in flight)
                         + U*(p + r) (that layer's unsharded gradient, and its cast to the reduce dtype
                         when r != p; U*p when r == p).
                         SHARD_GRAD_OP / NO_SHARD: parameters are not freed after forward, so all of
                         them are held gathered: P*p + the same unsharded layer gradient (0 for NO_SHARD
                         without mixed precision, where the fp32 parameters and gradients are the ones
                         counted above).
                         No fsdp (DDP) with amp: autocast's cache of low-precision weight copies, P*c.
  root_unit  2*R*p       FULL_SHARD / HYBRID_SHARD: FSDP does not reshard the root unit after forward
                         (torch `_post_forward_reshard`), so the embedding and lm_head stay gathered
                         through backward, and their gradient accumulates unsharded until the end of
                         backward (its cast to r happens after the activations are freed, so not
                         counted). SHARD_GRAD_OP / NO_SHARD: R*p (the gradient; the parameters are in
                         P*p above); NO_SHARD in fp32 and DDP: 0.
  activations            see below
  logits     c*n*V + 28*n + c*n*V + (4+c)*k*V   lm_head output in the compute dtype (Composer keeps
                         `state.outputs` alive until after backward) + the LM loss's backward (`lm_loss_parts`):
                         `distill.lm_loss` keeps 28 bytes per position (row indices, targets, log-sum-exp)
                         and returns its gradient in the logits' dtype, built k = 2**22 // V positions at a
                         time in fp32 and cast back ((4+c)kV; 4kV in fp32); its forward, 28n + 8kV, is smaller.
  With `distill:` (P_t, U_t, R_t the teacher's params, layer unit and root unit):
  teacher    4*P_t/S     its fp32 shard (frozen: no gradient, no optimizer state); DDP: 4*P_t
  teacher_gathered       FULL_SHARD / HYBRID_SHARD: 2*U_t*p + R_t*p (its no-grad forward: two layers in
                         flight and the root unit); SHARD_GRAD_OP / NO_SHARD in low precision: P_t*p (an
                         upper bound); NO_SHARD in fp32 and DDP: 0
  distill_logits         `kd_loss_bytes`: the KD loss keeps only its gradient for backward (4nK, K = V or
                         top_k, + 8nk of top-k indices); forward adds the teacher's logits (c*n*V) and one
                         chunk's temporaries (`kd_chunk_peak_bytes`, about 117 MB for V = 32,000), backward
                         the gradient it returns in the logits' dtype (c*n*V) and one chunk of it; the larger
                         of the two (checked against the live tensors in tests/test_plan.py)
  reserve    1.5 GiB + 10% of the peak below: CUDA context, NCCL buffers, allocator fragmentation,
                         cuBLAS workspaces.

The peak is not the sum of the terms: they meet in two moments, and the total is the larger plus the reserve
(`--trace` measured both within 5% for the paper and Llama-3 recipes, docs/plan.md). G = grads (4P/S), A = what the layers
keep at the end of forward (checkpointing: L*c*n*d, else L x the per-layer activations), `layer` one layer's
activations (recomputed in backward under checkpointing), `outside` the activations outside the layers,
F = params + optimizer + masks (+ teacher):
  loss      F + (G when a step has several microbatches, else 0: zero_grad sets the gradients to None) + A
            + outside + R*p (the root unit is gathered, no layer is) + logits (with distill: the largest of the
            teacher's forward, the KD loss's forward or backward, and the LM loss's backward beside the KD
            gradient, each beside the student's logits and, after the teacher's forward, its root unit R_t*p,
            which FSDP keeps gathered: `per_gpu`)
  backward  F + (A + G with several microbatches, else max(A, A/L + G*(L-1)/L): each layer's share of A is
            freed as its gradient shard appears, so the sum is largest at one end) + layer (checkpointing)
            + outside + gathered_unit + root_unit + c*n*V (the logits Composer keeps as state.outputs)
            (+ R_t*p with distill)

Activations, derived from `llmshearing.model.decoder` (which tensors autograd saves; the accounting
idea is Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", but
the per-tensor counts are ours, and tests/test_plan.py checks them against the tensors that
`torch.autograd.graph.saved_tensors_hooks` sees for a DecoderLayer). Per layer, in bytes (n = B*T):
  each of the 2 RMSNorms:  4*n*d (fp32 copy of the input, saved by pow and mul) + 4*n (rsqrt)
                           + c*n*d (normalized, saved by the weight multiply) + c*n*d (the output,
                           saved by the q/k/v or gate/up projections as their input)
  attention:  c*n*H*h (q after RoPE) + 2*c*n*K*h (k, v) + c*n*H*h (output) + 4*B*H*T (softmax
              log-sum-exp): a fused kernel (flash-attn, or SDPA's flash / memory-efficient backends)
              keeps no T x T matrix; RoPE's multiplies save only cos/sin. o_proj's input is a view of
              the attention output, except with a head mask: + c*n*H*h for the masked product.
  MLP:        4*c*n*I: gate_proj output (silu's input), silu output, up_proj output, their product
              (down_proj's input); + c*n*I with an intermediate mask (the masked product).
  residual writes (attention and MLP): + c*n*d for each of the layer gate and the hidden mask that
              multiplies the update (the multiply saves its input); the residual add saves nothing,
              so without masks the bf16 residual stream itself is not held by autograd.
Outside the layers: 8*n (token ids, saved by the embedding) + c*n*d (the embedding output, with a hidden
mask) + one RMSNorm (the final norm; its output is lm_head's input) + 2*T*h*c (cos, sin).
  without checkpointing:  L * layer + outside
  with checkpointing:     L * c*n*d (each layer keeps its input) + one layer (recomputed in backward)
                          + outside
During pruning every source layer runs (FSDP all-gathers every layer on every rank), so L is the
source's layer count and the masks above are those of `mask_specs(source, target)`.

Host RAM per node (G = GPUs per node, default 8; W = data.num_workers per rank)
--------------------------------------------------------------------------------
How `llmshearing.model.loading.from_pretrained` and `llmshearing.train.builders.build_trainer` load weights:
a safetensors checkpoint is read tensor by tensor straight into a DecoderLM whose parameters are fp32
(`empty_model`: allocated with `to_empty`), so a loading rank peaks at 4P bytes (the fp32 model) plus one
tensor; GGUF and .bin checkpoints still go through transformers' loader, which holds the HF model and the
DecoderLM together: 8P. Call that the loading rank's weights, w = 4P (safetensors) or 8P (GGUF / .bin).
  FSDP with more than one rank (the paper recipes; `fsdp_settings` forces sync_module_states): only global
             rank 0 reads the weights; the other ranks allocate their model with `to_empty` and never
             write it (its pages stay unresident, ~0 host) and receive their shards by FSDP's broadcast.
             node holding rank 0:  w + G * 3 GiB + G * W * 0.5 GiB     (the figure reported)
             other nodes:          G * 3 GiB + G * W * 0.5 GiB
  no fsdp (DDP) or one process: every rank reads the full weights: G * w + the same overheads on every node.
3 GiB per rank process is torch, CUDA and NCCL host state; 0.5 GiB per dataloader worker. On GPUs FSDP
moves each unit to the device when it wraps it, so the host copy is freed after wrapping; the peak above
is what has to fit. The page cache of the checkpoint files is reclaimable and not counted. The weights'
format is GGUF when the recipe sets model.gguf_file, .bin when model.path is here and holds only
pytorch_model*.bin files, else safetensors (the Llama-2-7b-hf repository and a pruning run's export are
safetensors).

With `distill:`, the loading rank also reads the teacher (`builders.build_teacher`, before the Trainer wraps
either model): + 4P_t (safetensors) or 8P_t (GGUF / .bin) beside w.

Verdict: fits when the per-GPU total at the recipe's microbatch and checkpointing setting is at most
--gpu-memory-gb (and, when --host-memory-gb is given, the applicable host figure above, FSDP's rank-0
node or DDP's every node, is at most --host-memory-gb too). The largest
microbatch is the largest divisor of the per-device batch (global_train_batch_size / N) that fits.
"""
from __future__ import annotations

import json
import math
import os
from importlib import resources

from omegaconf import OmegaConf

from llmshearing.errors import ConfigError
from llmshearing.train.config import resolve_recipe

GiB = 2**30
CONTEXT_RESERVE_GIB = 1.5  # CUDA context + NCCL + cuBLAS workspaces, per GPU
FRAGMENTATION = 0.10  # allocator fragmentation and transient gradients, as a share of the modelled bytes
RANK_HOST_GIB = 3.0  # host RAM of one training process besides the weights
WORKER_HOST_GIB = 0.5  # host RAM of one dataloader worker process
DEFAULT_GPUS_PER_NODE = 8
DEFAULT_SEQ_LEN = 4096
SHIPPED_LLAMA2_7B = os.path.join("models", "llama-2-7b.json")  # inside yamls/ (llmshearing.recipes)
# the shipped configs that stand in for a recipe's model when its path is not here: the env var the recipes read the
# path from, and the model's name in a path
SHIPPED_MODELS = {"LLAMA2_7B": "llama-2-7b", "LLAMA31_8B": "llama-3.1-8b", "QWEN3_8B": "qwen3-8b"}
STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2", "NO_SHARD")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# a continue recipe's name -> (the pruning source, the preset its pruned export has); the longer keys first
PAPER_RECIPE_SHAPES = {"qwen3_1.7b": ("qwen3-8b", "qwen3-1.7b"),
                       "llama3_1b": ("llama-3.1-8b", "llama-3.2-1b-hd128"), "llama3_3b": ("llama-3.1-8b", "llama-3.2-3b"),
                       "1.3b": ("llama-2-7b", "sheared-llama-1.3b"), "2.7b": ("llama-2-7b", "sheared-llama-2.7b")}


# ---------------------------------------------------------------------------------------------- inputs

def shipped_config(model: str = "llama-2-7b") -> str:
    """Path of a shipped config.json (yamls/models/MODEL.json: Llama-2-7b-hf's, Llama-3.1-8B's values)."""
    name = os.path.join("models", f"{model}.json")
    candidates = [os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "yamls", name)]
    try:
        candidates.append(str(resources.files("llmshearing.recipes").joinpath(name)))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - depends on the install
        pass
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise ConfigError(f"the shipped yamls/{name} is missing from this install; "
                      f"give --model-config PATH (the model's config.json)")


def shipped_llama2_7b() -> str:
    return shipped_config("llama-2-7b")


def shipped_model(raw: str, path: str) -> str | None:
    """The shipped model a recipe path means (its env var, or the model's name in it), so its config stands in."""
    for env, model in SHIPPED_MODELS.items():
        if env in raw or model in path.lower():
            return model
    return None


def load_model_config(path: str):
    """An HF config from a config.json file or a folder holding one (no weights, no network)."""
    from transformers import AutoConfig  # heavy: transformers

    from llmshearing.model.hf import check_source_config  # heavy: transformers

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(f"model config '{path}' does not exist (give a config.json or a folder holding one)")
    try:
        with open(file) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"model config '{file}' is not readable JSON: {e}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ConfigError(f"model config '{file}' has no model_type; expected an HF config.json")
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    try:
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model config '{file}': {e}") from None
    check_source_config(config)
    return config


def _lenient(conf, key: str, default=None):
    """The value at `key` with interpolations resolved where they can be; an unresolvable interpolation
    (an unset env var without default) keeps its text."""
    try:
        value = OmegaConf.select(conf, key, default=default, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - omegaconf's resolver errors
        node = OmegaConf.to_container(conf, resolve=False)
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return default if node is None else node
    if OmegaConf.is_config(value):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except Exception:  # noqa: BLE001
            return OmegaConf.to_container(value, resolve=False)
    return value


def _raw(conf, key: str):
    """The unresolved text at `key` (to see which env var a path comes from)."""
    node = OmegaConf.to_container(conf, resolve=False)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def read_recipe(path_or_name: str) -> dict:
    """The keys of a recipe that the plan needs, read without validating paths (the paper recipes name
    cluster paths)."""
    path = resolve_recipe(path_or_name)
    try:
        conf = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - yaml syntax errors
        raise ConfigError(f"'{path}' is not a readable yaml recipe: {e}") from None
    if not OmegaConf.is_dict(conf):
        raise ConfigError(f"'{path}' must be a mapping of recipe keys")
    model_path = _lenient(conf, "model.path")
    if not isinstance(model_path, str):
        raise ConfigError(f"'{path}': model.path is missing; a recipe names the model it trains")
    fsdp = _lenient(conf, "fsdp")
    if fsdp is not None and not isinstance(fsdp, dict):
        raise ConfigError(f"'{path}': fsdp must be a mapping or null")
    recipe = {
        "path": path,
        "run_name": _lenient(conf, "run_name", "") or "",
        "model_path": model_path,
        "model_path_raw": str(_raw(conf, "model.path")),
        "pruning_target": _lenient(conf, "pruning.target"),
        "pruning": _lenient(conf, "pruning") is not None,
        "pruning_init": _lenient(conf, "pruning.init", "uniform"),
        "init_sequences": _lenient(conf, "pruning.init_sequences", 4),
        "domains": _lenient(conf, "data.domains"),
        "global_train_batch_size": _lenient(conf, "global_train_batch_size"),
        "device_train_microbatch_size": _lenient(conf, "device_train_microbatch_size", "auto"),
        "precision": _lenient(conf, "precision", "fp32"),
        "fsdp": fsdp,
        "num_workers": _lenient(conf, "data.num_workers", 0) or 0,
        "gguf_file": _lenient(conf, "model.gguf_file"),
        "shards": _lenient(conf, "data.shards") or _lenient(conf, "data.local"),  # a remote's cache has the manifest
        "distill": _lenient(conf, "distill"),
        "distill_teacher_raw": str(_raw(conf, "distill.teacher")),
    }
    gbs = recipe["global_train_batch_size"]
    if not isinstance(gbs, int) or isinstance(gbs, bool) or gbs < 1:
        raise ConfigError(f"'{path}': global_train_batch_size must be a positive integer, got {gbs!r}")
    mb = recipe["device_train_microbatch_size"]
    if mb != "auto" and (not isinstance(mb, int) or isinstance(mb, bool) or mb < 1):
        raise ConfigError(f"'{path}': device_train_microbatch_size must be a positive integer or 'auto', got {mb!r}")
    if recipe["precision"] not in ("fp32", "amp_bf16", "amp_fp16"):
        raise ConfigError(f"'{path}': precision must be fp32, amp_bf16 or amp_fp16, got {recipe['precision']!r}")
    if not isinstance(recipe["num_workers"], int) or recipe["num_workers"] < 0:
        raise ConfigError(f"'{path}': data.num_workers must be a non-negative integer")
    distill = recipe["distill"]
    if distill is not None:
        if not isinstance(distill, dict):
            raise ConfigError(f"'{path}': distill must be a mapping or null")
        top_k = distill.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise ConfigError(f"'{path}': distill.top_k must be null or a positive integer, got {top_k!r}")
        if not isinstance(distill.get("teacher", "source"), str):
            raise ConfigError(f"'{path}': distill.teacher must be 'source' or a model folder")
    return recipe


def weights_format(recipe: dict) -> str:
    """'gguf' (model.gguf_file set), '.bin' (model.path is here and holds only pytorch_model*.bin) or
    'safetensors' (otherwise: what the Llama-2-7b-hf repository and a pruning run's export hold)."""
    return folder_format(recipe["model_path"], recipe.get("gguf_file"))


def folder_format(path: str, gguf_file: str | None = None) -> str:
    """weights_format of one model folder (the trained model's or a distillation teacher's)."""
    if gguf_file:
        return "gguf"
    if os.path.isdir(path):
        from llmshearing.model.loading import safetensors_files  # heavy: torch, transformers

        has_bin = any(n.startswith("pytorch_model") and n.endswith(".bin") for n in os.listdir(path))
        if has_bin and not safetensors_files(path):
            return ".bin"
    return "safetensors"


def infer_target_shape(recipe: dict) -> tuple[str, str] | None:
    """(pruning source, preset) of a shipped continue recipe from its name ('continue_1.3b' -> Llama-2-7B with the
    'sheared-llama-1.3b' shape, 'continue_llama3_3b' -> Llama-3.1-8B with 'llama-3.2-3b')."""
    names = f"{recipe['run_name']} {os.path.basename(recipe['path'])}".lower()
    for key, found in PAPER_RECIPE_SHAPES.items():
        if key in names:
            return found
    return None


def resolve_model(recipe: dict, model_config: str | None = None, target_shape: str | None = None):
    """(HF config of the model the recipe trains, stored bytes per weight, a line saying which config)."""
    from llmshearing.pruning.shapes import PRESETS, shape_of, target_config, validate_target  # heavy: transformers

    if target_shape is not None and target_shape not in PRESETS:
        raise ConfigError(f"--target-shape '{target_shape}' is not a preset; presets: {', '.join(PRESETS)}")
    if target_shape is not None and recipe["pruning"]:
        raise ConfigError("--target-shape is for continued-pretraining recipes (the model is a pruned export); "
                          "a pruning recipe's target is its pruning.target")
    path, raw = recipe["model_path"], recipe["model_path_raw"]
    shipped_fallback = False
    if model_config is not None:
        config, used = load_model_config(model_config), model_config
    elif os.path.isfile(os.path.join(path, "config.json")):
        config, used = load_model_config(path), os.path.join(path, "config.json")
    elif shipped_model(raw, path) or "PRUNED" in raw:
        inferred = infer_target_shape(recipe) if "PRUNED" in raw else None
        used = shipped_config(shipped_model(raw, path) or (inferred[0] if inferred else "llama-2-7b"))
        config, shipped_fallback = load_model_config(used), True
        used = f"{used} (model.path '{path}' does not exist here)"
    else:
        raise ConfigError(f"model.path '{path}' does not exist here and is not a path of a shipped model "
                          f"({', '.join(SHIPPED_MODELS)}); give --model-config PATH (the config.json of the model the "
                          f"recipe trains)")
    preset = target_shape
    pruned_export = "PRUNED" in raw
    if preset is None and shipped_fallback and pruned_export:
        preset = (infer_target_shape(recipe) or (None, None))[1]
        if preset is None:
            raise ConfigError(f"'{recipe['path']}' trains a pruned export ('{path}', not here); give "
                              f"--target-shape PRESET ({', '.join(PRESETS)}) or --model-config of the export")
    stored = DTYPE_BYTES.get(str(getattr(config, "torch_dtype", None) or "float32").replace("torch.", ""), 4)
    if preset is not None:
        validate_target(shape_of(config), PRESETS[preset])
        config = target_config(config, PRESETS[preset])
        config.torch_dtype = "float32"  # a pruning run exports its fp32 training weights unless told otherwise
        stored = 4
        used = f"{used} with the {preset} shape"
    return config, stored, used


def resolve_teacher(recipe: dict, config, teacher_config: str | None = None):
    """(HF config of the distillation teacher, its weights' format, a line saying which config), or None
    without `distill:`. `teacher: source` is the pruning source, i.e. the model a pruning recipe trains."""
    d = recipe["distill"]
    if d is None:
        if teacher_config is not None:
            raise ConfigError("--teacher-config is for recipes with a distill section; this one has none")
        return None
    teacher = d.get("teacher", "source")
    if teacher == "source":
        if not recipe["pruning"]:
            raise ConfigError(f"'{recipe['path']}': distill.teacher=source is the pruning source, but the recipe has "
                              f"no pruning section; name the teacher's folder")
        if teacher_config is not None:
            raise ConfigError("--teacher-config: distill.teacher=source is the model the recipe prunes "
                              "(--model-config sets it)")
        return config, weights_format(recipe), "the pruning source (distill.teacher=source)"
    if teacher_config is not None:
        tconfig, used = load_model_config(teacher_config), teacher_config
    elif os.path.isfile(os.path.join(teacher, "config.json")):
        tconfig, used = load_model_config(teacher), os.path.join(teacher, "config.json")
    elif shipped_model(recipe["distill_teacher_raw"], teacher):
        used = shipped_config(shipped_model(recipe["distill_teacher_raw"], teacher))
        tconfig = load_model_config(used)
        used = f"{used} (distill.teacher '{teacher}' does not exist here)"
    else:
        raise ConfigError(f"distill.teacher '{teacher}' does not exist here and is not a path of a shipped model "
                          f"({', '.join(SHIPPED_MODELS)}); give --teacher-config PATH (the teacher's config.json)")
    if tconfig.vocab_size != config.vocab_size:
        raise ConfigError(f"distill.teacher ({used}) has vocab_size {tconfig.vocab_size} but the trained model has "
                          f"{config.vocab_size}; distillation compares the two distributions token by token")
    return tconfig, folder_format(teacher), used


def resolve_seq_len(recipe: dict, config, seq_len: int | None, shipped: bool = False) -> tuple[int, str]:
    """--seq-len, else the shards' manifest, else the model's max_position_embeddings; `shipped` (a shipped config
    stands in for the model): at most 4096, the shipped recipes' sequences (Llama-3.1's 131,072 is its limit)."""
    if seq_len is not None:
        if seq_len < 1:
            raise ConfigError(f"--seq-len must be at least 1, got {seq_len}")
        return seq_len, "--seq-len"
    shards = recipe.get("shards")
    if isinstance(shards, str) and os.path.isfile(os.path.join(shards, "manifest.json")):
        try:
            with open(os.path.join(shards, "manifest.json")) as f:
                value = json.load(f).get("seq_len")
            if isinstance(value, int) and value > 0:
                return value, f"{shards}/manifest.json"
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
    value = getattr(config, "max_position_embeddings", None)
    if shipped and isinstance(value, int) and value > DEFAULT_SEQ_LEN:
        return DEFAULT_SEQ_LEN, (f"the shipped recipes' {DEFAULT_SEQ_LEN}-token sequences (the shards are not here, and "
                                 f"the model's max_position_embeddings {value} is its limit; --seq-len to change)")
    if isinstance(value, int) and value > 0:
        return value, "the model's max_position_embeddings (the shards are not here; --seq-len to change)"
    return DEFAULT_SEQ_LEN, "default (--seq-len to change)"


# ---------------------------------------------------------------------------------------------- model

def model_counts(config) -> dict:
    """P (== shapes.param_count), U (one decoder layer), R (embedding + lm_head + final norm), V * d (one embedding)."""
    from llmshearing.pruning.shapes import param_count, shape_of  # heavy: transformers

    P = int(param_count(shape_of(config), config))
    d, V = config.hidden_size, config.vocab_size
    R = V * d * (1 if config.tie_word_embeddings else 2) + d
    L = config.num_hidden_layers
    return {"params": P, "layer_unit": (P - R) // L, "root_unit": R, "layers": L, "embedding": V * d}


def mask_numbers(source_config, target) -> tuple[int, list[str]]:
    """(M: L0 log-alphas + Lagrange multipliers, structures the forward multiplies by a mask)."""
    from llmshearing.pruning.masks import mask_specs  # heavy: torch, transformers
    from llmshearing.pruning.shapes import shape_of  # heavy: transformers

    plan = mask_specs(shape_of(source_config), target)
    M = sum(math.prod(shape) for shape, _ in plan.values()) + 2 * len(plan)
    applied = [name for name in ("layer", "hidden") if name in plan]
    if "kv_head" in plan or "head" in plan:
        applied.append("head")
    if "intermediate" in plan:
        applied.append("intermediate")
    return M, applied


def layer_saved_bytes(config, B: int, T: int, c: int, masks=()) -> dict[str, int]:
    """Bytes autograd saves in one DecoderLayer forward, tensor by tensor (names as in the docstring)."""
    from llmshearing.model.hf import head_dim_of  # heavy: transformers

    n, d, I = B * T, config.hidden_size, config.intermediate_size
    H, h = config.num_attention_heads, head_dim_of(config)
    K = getattr(config, "num_key_value_heads", None) or H
    del masks  # masks save nothing extra in a layer (decoder._MaskedLinear): kept for the callers' symmetry
    out = {}
    for norm in ("attn_norm", "mlp_norm"):
        out[f"{norm}.input_fp32"] = 4 * n * d
        out[f"{norm}.rstd_fp32"] = 4 * n
        out[f"{norm}.normalized"] = c * n * d
        out[f"{norm}.output"] = c * n * d
    out["attn.q"] = c * n * H * h
    out["attn.k"] = c * n * K * h
    out["attn.v"] = c * n * K * h
    out["attn.output"] = c * n * H * h
    out["attn.softmax_lse_fp32"] = 4 * B * H * T
    out["mlp.gate"] = c * n * I
    out["mlp.silu"] = c * n * I
    out["mlp.up"] = c * n * I
    out["mlp.product"] = c * n * I
    return out


def outside_saved_bytes(config, B: int, T: int, c: int, masks=()) -> dict[str, int]:
    """Bytes saved outside the decoder layers: token ids, the masked embedding, the final norm, RoPE."""
    from llmshearing.model.hf import head_dim_of  # heavy: transformers

    n, d = B * T, config.hidden_size
    out = {"token_ids": 8 * n}
    if "hidden" in set(masks):
        out["embedding_output"] = c * n * d
    out["final_norm"] = (4 + 2 * c) * n * d + 4 * n
    out["rope_cos_sin"] = 2 * T * head_dim_of(config) * c
    return out


def activation_bytes(config, B: int, T: int, c: int, masks=(), checkpointing: bool = True) -> int:
    layer = sum(layer_saved_bytes(config, B, T, c, masks).values())
    outside = sum(outside_saved_bytes(config, B, T, c, masks).values())
    L = config.num_hidden_layers
    if checkpointing:
        return L * c * B * T * config.hidden_size + layer + outside
    return L * layer + outside


def lm_loss_parts(n: int, V: int, c: int) -> dict[str, int]:
    """`distill.lm_loss`'s bytes over n positions of c-byte logits (tests/test_plan.py checks them against the tensors
    alive after every op). kept: from forward to backward, the kept positions' row indices, targets and log-sum-exp
    (28n). forward: kept + one chunk of `distill.kd_chunk_rows(V)` positions in fp32 and one temporary (8 x chunk x V).
    backward: kept + the gradient it returns in the logits' dtype (cnV) + one chunk of it in fp32 and its cast
    ((4 + c) x chunk x V; 4 x chunk x V in fp32)."""
    from llmshearing.model.distill import kd_chunk_rows  # heavy: torch, transformers

    chunk = min(n, kd_chunk_rows(V))
    kept = 28 * n
    return {"kept": kept, "forward": kept + 8 * chunk * V,
            "backward": kept + c * n * V + (4 + c if c < 4 else 4) * chunk * V}


def logits_bytes(config, B: int, T: int, c: int) -> int:
    """lm_head's output in the compute dtype (Composer keeps `state.outputs` through backward) + the LM loss's peak."""
    n, V = B * T, config.vocab_size
    lm = lm_loss_parts(n, V, c)
    return c * n * V + max(lm["forward"], lm["backward"])


def kd_chunk_peak_bytes(c: int, V: int, top_k: int | None = None) -> int:
    """Peak bytes of one chunk's temporaries in `distill.kd_loss` (c positions): the whole vocabulary: the
    scaled teacher and student logits, both log-softmaxes, the teacher's probabilities, their difference and
    product (7 x 4cV); top-k: the scaled student logits beside the teacher's (12cV), top-k's values and indices
    beside both (8cV + 12ck), then seven k-wide tensors (28ck)."""
    if top_k is None or top_k >= V:
        return 28 * c * V
    k = top_k
    return max(12 * c * V, 8 * c * V + 12 * c * k, 28 * c * k)


def kd_loss_parts(n: int, V: int, c: int, top_k: int | None = None) -> dict[str, int]:
    """The KD loss's bytes over n positions with the student's and the teacher's logits in c-byte elements
    (tests/test_plan.py checks them against the tensors alive after every op of `distill.kd_loss`, forward and
    backward). kept: from forward to backward, the gradient (q - p) in fp32, 4nK (K = V or top_k), and top-k's
    indices, 8nk. forward: the teacher's logits (cnV) + kept + one chunk's temporaries (`kd_chunk_peak_bytes`, chunks
    of `distill.kd_chunk_rows(V)` positions). backward: kept + the gradient it returns in the student's dtype (cnV)
    + one chunk of it in fp32 (4 x chunk x V) and, beside that, its cast to c bytes (c x chunk x V when c < 4) or,
    with top-k, the k-wide chunk before the scatter (4 x chunk x k), whichever is larger."""
    from llmshearing.model.distill import kd_chunk_rows  # heavy: torch, transformers

    K = V if top_k is None or top_k >= V else top_k
    chunk = min(n, kd_chunk_rows(V))
    kept = 4 * n * K + (8 * n * K if K < V else 0)
    beside = max(4 * chunk * K if K < V else 0, c * chunk * V if c < 4 else 0)
    return {"kept": kept, "forward": c * n * V + kept + kd_chunk_peak_bytes(chunk, V, top_k),
            "backward": kept + c * n * V + 4 * chunk * V + beside}


def kd_loss_bytes(n: int, V: int, c: int, top_k: int | None = None) -> int:
    """Peak bytes the KD loss adds on its own: the larger of its forward and backward (`kd_loss_parts`)."""
    parts = kd_loss_parts(n, V, c, top_k)
    return max(parts["forward"], parts["backward"])


def teacher_bytes(tcounts: dict, S: int, strategy: str | None, p: int) -> dict[str, float]:
    """The frozen teacher's per-GPU weights: its fp32 shard (no grads, no optimizer state) and what FSDP holds
    gathered during its no-grad forward (`model.distill.Teacher`: wrapped like the student)."""
    Pt, Ut, Rt = tcounts["params"], tcounts["layer_unit"], tcounts["root_unit"]
    if strategy is None:  # DDP: the whole fp32 teacher on every rank; autocast caches no casts of frozen weights
        return {"teacher": 4 * Pt, "teacher_gathered": 0}
    if strategy in ("FULL_SHARD", "HYBRID_SHARD") and S > 1:
        gathered = 2 * Ut * p + Rt * p  # two layers in flight + the root unit (embedding, lm_head)
    elif S == 1 and p == 4:
        gathered = 0
    else:  # SHARD_GRAD_OP / NO_SHARD in low precision: counted as held gathered (an upper bound)
        gathered = Pt * p
    return {"teacher": 4 * Pt / S, "teacher_gathered": gathered}


def sharded_state_bytes(P: int, S: int, ddp: bool = False) -> dict[str, float]:
    """fp32 master params, fp32 grads, AdamW's two fp32 states over a sharding group of S GPUs."""
    return {"params": 4 * P / S, "grads": (8 * P if ddp else 4 * P) / S, "optimizer": 8 * P / S}


def _dtypes(precision: str, fsdp: dict | None) -> tuple[int, int, int, str]:
    """(c, p, r, description) for a precision and fsdp.mixed_precision."""
    c = 4 if precision == "fp32" else 2
    if fsdp is None:
        return c, 4, 4, "no fsdp (DDP): fp32 params" + (", autocast" if c == 2 else "")
    mp = fsdp.get("mixed_precision", "DEFAULT")
    if isinstance(mp, dict):
        def nbytes(key, default):
            value = mp.get(key)
            return default if value is None else DTYPE_BYTES.get(str(value).replace("torch.", ""), 4)
        return c, nbytes("param_dtype", 4), nbytes("reduce_dtype", 4), f"mixed_precision {mp}"
    mp = str(mp).upper()
    if mp == "DEFAULT":
        p, r = c, 4
    elif mp == "PURE":
        p, r = c, c
    elif mp == "FULL":
        p, r = 4, 4
    else:
        raise ConfigError(f"fsdp.mixed_precision '{mp}': expected DEFAULT, PURE, FULL or a mapping of dtypes")
    name = {2: "bf16" if precision == "amp_bf16" else "fp16", 4: "fp32"}
    return c, p, r, f"mixed_precision {mp}: params {name[p]}, reduce {name[r]}"


# ---------------------------------------------------------------------------------------------- plan

def per_gpu(*, counts: dict, config, S: int, strategy: str | None, c: int, p: int, r: int, M: int, masks,
            B: int, T: int, checkpointing: bool, teacher: dict | None = None, accumulating: bool = False) -> dict[str, float]:
    """Per-GPU bytes of every term (see the module docstring), the two moments of the step they meet in, and the
    total, in GiB. `teacher` ({"counts", "top_k"}) adds the distillation terms; `accumulating` (more than one
    microbatch per step) keeps the fp32 gradient shard alive through the later microbatches."""
    P, U, R = counts["params"], counts["layer_unit"], counts["root_unit"]
    L, n = config.num_hidden_layers, B * T
    ddp = strategy is None
    state = sharded_state_bytes(P, S, ddp)
    unit_grad = U * (p + (r if r != p else 0))
    # at_loss: what is gathered at the end of forward
    if ddp:
        gathered, root = (P * c if c < 4 else 0), 0
        at_loss = gathered
    elif strategy in ("FULL_SHARD", "HYBRID_SHARD") and S > 1:
        gathered, root = 2 * U * p + unit_grad, 2 * R * p
        at_loss = R * p
    elif S == 1 and p == 4:  # NO_SHARD in fp32: the parameters and gradients are the ones counted above
        gathered, root = 0, 0
        at_loss = 0
    else:  # parameters stay gathered from forward to backward
        gathered, root = P * p + unit_grad, R * p
        at_loss = P * p
    layer = sum(layer_saved_bytes(config, B, T, c, masks).values())
    outside = sum(outside_saved_bytes(config, B, T, c, masks).values())
    kept = L * c * n * config.hidden_size if checkpointing else L * layer  # saved by the layers at the end of forward
    terms = {**state, "masks": 16 * M, "gathered_unit": gathered, "root_unit": root,
             "activations": kept + (layer if checkpointing else 0) + outside,
             "logits": logits_bytes(config, B, T, c)}
    if teacher is not None:
        terms.update(teacher_bytes(teacher["counts"], S, strategy, p))
        terms["distill_logits"] = kd_loss_bytes(n, config.vocab_size, c, teacher["top_k"])
    fixed = terms["params"] + terms["optimizer"] + terms["masks"] + terms.get("teacher", 0)
    # The terms do not all peak together. At the loss (end of forward, start of backward) the layers hold what
    # they saved and the logits peak, no layer is gathered but the root unit is (R*p), and in the first
    # microbatch of a step there are no gradients yet (zero_grad sets them to None). In backward, layer by
    # layer, each layer's saved share is freed as its gradient shard appears, so the sum of the two is largest
    # at one end: all saved and no shard yet, or one layer's share and all shards but the last.
    grads = terms["grads"]
    if accumulating or ddp:
        saved_and_grads = kept + grads
        loss_grads = grads
    else:
        saved_and_grads = max(kept, kept / L + grads * (L - 1) / L)
        loss_grads = 0
    lm_and_kd, teacher_held = terms["logits"], 0
    if teacher is not None:
        # ComposerLM.loss: the LM loss, then the teacher's no-grad forward, then the KD loss; backward runs the KD
        # loss's first (autograd takes the node made last first), then the LM loss's beside the KD gradient (the two
        # are summed into the logits' gradient). The student's logits (cnV, state.outputs) and the LM loss's kept
        # 28n are alive throughout; after the teacher's forward its root unit stays gathered (FSDP does not reshard
        # a root after forward, and the teacher has no backward): R_t*p through the rest of the step.
        V = config.vocab_size
        cnV = c * n * V
        lm, kd = lm_loss_parts(n, V, c), kd_loss_parts(n, V, c, teacher["top_k"])
        if strategy in ("FULL_SHARD", "HYBRID_SHARD") and S > 1:
            teacher_held = teacher["counts"]["root_unit"] * p
        else:  # held gathered whole (the upper bound of teacher_bytes) or not at all
            teacher_held = terms["teacher_gathered"]
        lm_and_kd = max(cnV + lm["kept"] + terms["teacher_gathered"],  # the teacher's forward
                        cnV + lm["kept"] + teacher_held + kd["forward"],  # the KD loss's forward
                        cnV + lm["kept"] + teacher_held + kd["backward"],  # its backward
                        cnV + cnV + teacher_held + lm["backward"])  # the LM loss's beside the KD gradient
    loss_moment = fixed + loss_grads + kept + outside + at_loss + lm_and_kd
    # backward: + one layer recomputed, the gathered layers and the layer's unsharded gradient, the root unit
    # with its gradient, and the logits Composer keeps (state.outputs) in the compute dtype
    backward_moment = (fixed + saved_and_grads + (layer if checkpointing else 0) + outside + gathered + root
                       + c * n * config.vocab_size + teacher_held)
    peak = max(loss_moment, backward_moment)
    terms["reserve"] = CONTEXT_RESERVE_GIB * GiB + FRAGMENTATION * peak
    terms["total"] = peak + terms["reserve"]
    out = {k: v / GiB for k, v in terms.items()}
    out["moments"] = {"loss": loss_moment / GiB, "backward": backward_moment / GiB}
    return out


def traced(chosen: dict, **step) -> dict:
    """The trace of one training step (`plan_trace.trace_step`) beside the formula: `estimate_gib` is the formula's
    peak without the reserve (the reserve is what a trace cannot see: CUDA context, NCCL, fragmentation)."""
    from llmshearing.train.plan_trace import trace_step  # heavy: torch

    estimate = max(chosen["moments"].values())
    result = trace_step(**step)
    return {"estimate_gib": estimate, "traced_gib": result["traced_gib"],
            "ratio": result["traced_gib"] / estimate, "estimate_total_gib": chosen["total"], **result}


REDPAJAMA_DOMAINS = 7  # the paper's data: the calibration sequences are init_sequences per domain


def activation_init(recipe: dict, config, T: int) -> dict:
    """`pruning.init: activation`'s phase on rank 0's GPU (`mask_init.init_masks`), traced on the meta device: the
    fp32 source model and the scoring of init_sequences x domains calibration sequences (domains: data.domains, else
    RedPajama's 7). Reported for every pruning recipe; `applies` says whether this recipe sets the init."""
    from llmshearing.train.plan_trace import trace_activation_init  # heavy: torch

    domains = recipe["domains"]
    count = len(domains) if isinstance(domains, list) and domains else REDPAJAMA_DOMAINS
    sequences = int(recipe["init_sequences"]) * count
    return {"applies": recipe["pruning_init"] == "activation", "domains": count,
            "domains_from": "data.domains" if isinstance(domains, list) and domains else "RedPajama's 7 (the paper's)",
            **trace_activation_init(config, sequences, T)}


def export_host_bytes(counts: dict) -> int:
    """Host bytes of exporting the trained model (`llmshearing export`, or export_dir at the end of a run, there on
    top of the run's own host memory): the export reads only the student's tensors and folds, slices and writes one
    unit at a time (a decoder layer, or the embedding / head when larger), so its peak is one source unit read in
    fp32 plus its sliced copy, at most as large: 8 * max(U, V * d), plus the reader's one-tensor buffer."""
    return 8 * max(counts["layer_unit"], counts["embedding"])


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def make_plan(recipe_path: str, gpus: int, gpu_memory_gb: float, host_memory_gb: float | None = None, *,
              gpus_per_node: int = DEFAULT_GPUS_PER_NODE, seq_len: int | None = None,
              model_config: str | None = None, target_shape: str | None = None,
              teacher_config: str | None = None, trace: bool = False) -> dict:
    """Everything `llmshearing plan` prints, as a dict (the --json output). `trace`: also run one training step
    on the meta device (`plan_trace.trace_step`) and report its measured peak beside the estimate."""
    if not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    if not gpu_memory_gb > 0:
        raise ConfigError(f"--gpu-memory-gb must be positive, got {gpu_memory_gb}")
    if host_memory_gb is not None and not host_memory_gb > 0:
        raise ConfigError(f"--host-memory-gb must be positive, got {host_memory_gb}")
    if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be at least 1, got {gpus_per_node}")
    recipe = read_recipe(recipe_path)
    config, stored, config_used = resolve_model(recipe, model_config, target_shape)
    shipped = model_config is None and not os.path.isfile(os.path.join(recipe["model_path"], "config.json"))
    T, seq_source = resolve_seq_len(recipe, config, seq_len, shipped)
    resolved_teacher = resolve_teacher(recipe, config, teacher_config)

    from llmshearing.pruning.shapes import shape_of  # heavy: transformers
    from llmshearing.pruning.target import resolve_target  # heavy: transformers

    target, M, masks = None, 0, []
    if recipe["pruning"]:
        spec = recipe["pruning_target"]
        if spec is None:
            raise ConfigError(f"'{recipe['path']}': pruning.target is missing")
        target = resolve_target(spec, config)
        M, masks = mask_numbers(config, target)

    fsdp = recipe["fsdp"]
    strategy = None
    if fsdp is not None:
        strategy = str(fsdp.get("sharding_strategy", "FULL_SHARD")).upper()
        if strategy not in STRATEGIES:
            raise ConfigError(f"fsdp.sharding_strategy '{strategy}': expected one of {', '.join(STRATEGIES)}")
    ranks_per_node = min(gpus, gpus_per_node)
    nodes = math.ceil(gpus / gpus_per_node)
    S = {None: 1, "NO_SHARD": 1, "HYBRID_SHARD": ranks_per_node, "_HYBRID_SHARD_ZERO2": ranks_per_node}.get(strategy, gpus)
    c, p, r, dtypes = _dtypes(recipe["precision"], fsdp)
    checkpointing = bool((fsdp or {}).get("activation_checkpointing", False))

    gbs = recipe["global_train_batch_size"]
    if gbs % gpus:
        raise ConfigError(f"global_train_batch_size={gbs} is not a multiple of --gpus {gpus}; "
                          f"the per-device batch must be a whole number of sequences")
    per_device = gbs // gpus
    mb = recipe["device_train_microbatch_size"]
    if mb != "auto" and per_device % mb:
        raise ConfigError(f"device_train_microbatch_size={mb} does not divide the per-device batch {per_device} "
                          f"(global {gbs} / {gpus} GPUs)")
    counts = model_counts(config)
    teacher, distill = None, None
    if resolved_teacher is not None:
        tconfig, tformat, tused = resolved_teacher
        teacher = {"counts": model_counts(tconfig), "top_k": recipe["distill"].get("top_k")}
        distill = {"teacher": recipe["distill"].get("teacher", "source"), "config_used": tused,
                   "params": teacher["counts"]["params"], "weights_format": tformat, "top_k": teacher["top_k"]}

    def at(B, ckpt):
        return per_gpu(counts=counts, config=config, S=S, strategy=strategy, c=c, p=p, r=r, M=M, masks=masks,
                       B=B, T=T, checkpointing=ckpt, teacher=teacher, accumulating=B < per_device)

    largest = {}
    for key, ckpt in (("with_checkpointing", True), ("without_checkpointing", False)):
        fitting = [B for B in divisors(per_device) if at(B, ckpt)["total"] <= gpu_memory_gb]
        largest[key] = max(fitting) if fitting else None
    recipe_key = "with_checkpointing" if checkpointing else "without_checkpointing"
    microbatch = mb if mb != "auto" else (largest[recipe_key] or 1)
    by_ckpt = {"with_checkpointing": at(microbatch, True), "without_checkpointing": at(microbatch, False)}
    chosen = by_ckpt[recipe_key]
    gpu_fits = chosen["total"] <= gpu_memory_gb

    P = counts["params"]
    fmt = weights_format(recipe)
    load_bytes = 4 if fmt == "safetensors" else 8  # fp32 DecoderLM (+ transformers' HF model for GGUF / .bin)
    rank0_reads = fsdp is not None and gpus > 1  # as `build_trainer`: the other ranks get FSDP's broadcast
    overheads = {"rank_processes": ranks_per_node * RANK_HOST_GIB,
                 "dataloader_workers": ranks_per_node * recipe["num_workers"] * WORKER_HOST_GIB}
    overhead = sum(overheads.values())

    # the teacher is read beside the student (builders.build_teacher, before the Trainer wraps either)
    t_params = 0 if distill is None else distill["params"]
    t_bytes = 0 if distill is None else (4 if distill["weights_format"] == "safetensors" else 8)

    def node_weights(bytes_per_param, teacher_bytes_per_param=t_bytes):
        return (1 if rank0_reads else ranks_per_node) * (bytes_per_param * P + teacher_bytes_per_param * t_params) / GiB

    host = {"weights": node_weights(load_bytes), **overheads}
    host_node = sum(host.values())
    with_teacher = "" if distill is None else f" and the teacher's ({t_bytes}P_t)"
    if rank0_reads:
        host_loading = (f"FSDP over {gpus} ranks: global rank 0 reads the {fmt} weights into its fp32 model "
                        f"({load_bytes}P){with_teacher}, the other ranks get them by FSDP's broadcast")
        host_other = overhead if nodes > 1 else None
    else:
        host_loading = (f"{'one process' if gpus == 1 else 'no fsdp (DDP)'}: every rank reads the {fmt} weights "
                        f"into its fp32 model ({load_bytes}P each){with_teacher}")
        host_other = host_node if nodes > 1 else None
    host_every_rank = ranks_per_node * (load_bytes * P + t_bytes * t_params) / GiB + overhead
    host_gguf_or_bin = node_weights(8, 8) + overhead
    if host_memory_gb is None:
        host_verdict, host_fits = "not checked (give --host-memory-gb)", True
    elif host_node <= host_memory_gb:
        host_verdict, host_fits = "fits", True
    else:
        host_verdict, host_fits = "does not fit", False
    fits = gpu_fits and host_fits
    result = {
        "recipe": recipe["path"],
        "config_used": config_used,
        "model": {"params": P, "layer_unit_params": counts["layer_unit"], "root_unit_params": counts["root_unit"],
                  **shape_of(config).as_dict(), "vocab_size": config.vocab_size,
                  "tie_word_embeddings": bool(config.tie_word_embeddings),
                  "stored_dtype_bytes": stored},
        "pruning": None if target is None else {"target": target.as_dict(), "masks": masks, "mask_numbers": M},
        "distill": distill,
        "gpus": gpus, "gpus_per_node": ranks_per_node, "nodes": nodes,
        "sharding_strategy": strategy or "none (DDP)", "shard_group": S,
        "precision": recipe["precision"], "dtypes": dtypes,
        "bytes": {"compute": c, "gathered_params": p, "grad_reduce": r},
        "seq_len": T, "seq_len_source": seq_source,
        "global_train_batch_size": gbs, "per_device_batch": per_device,
        "microbatch": microbatch, "microbatch_from_recipe": mb,
        "activation_checkpointing": checkpointing,
        "gpu_memory_gb": gpu_memory_gb,
        "per_gpu_gb": chosen,
        "per_gpu_gb_by_checkpointing": by_ckpt,
        "gpu_fits": gpu_fits,
        "weights_format": fmt,
        "host_loading": host_loading,
        "host_gb_per_node": host_node,
        "host_gb_per_node_detail": host,
        "host_gb_per_node_other_nodes": host_other,
        "host_gb_per_node_if_every_rank_loads": host_every_rank,
        "host_gb_per_node_gguf_or_bin": host_gguf_or_bin,
        "host_memory_gb": host_memory_gb,
        "host_verdict": host_verdict,
        "verdict": "fits" if fits else "does not fit",
        "largest_microbatch": largest,
        "assumptions": {"context_reserve_gb": CONTEXT_RESERVE_GIB, "fragmentation_share": FRAGMENTATION,
                        "host_gb_per_rank": RANK_HOST_GIB, "host_gb_per_worker": WORKER_HOST_GIB,
                        "units": "GiB (2**30 bytes)"},
        "export_host_gb": export_host_bytes(counts) / GiB,
        "trace": None if not trace else traced(
            chosen, config=config, target=target, teacher_config=None if resolved_teacher is None else resolved_teacher[0],
            distill=recipe["distill"], fsdp=fsdp, precision=recipe["precision"], gpus=gpus, microbatch=microbatch,
            per_device=per_device, T=T),
    }
    result["activation_init"] = None if not trace or target is None else activation_init(recipe, config, T)
    return result


# ---------------------------------------------------------------------------------------------- output

ROWS = [("params", "params (fp32 master shard)"), ("grads", "grads (fp32 shard)"),
        ("optimizer", "optimizer (AdamW, fp32 shard)"), ("masks", "masks + multipliers"),
        ("gathered_unit", "gathered layer x2 + its grad"), ("root_unit", "root unit (embed, lm_head) + grad"),
        ("activations", "activations"), ("logits", "logits + LM loss"),
        ("teacher", "teacher (fp32 shard, frozen)"), ("teacher_gathered", "teacher gathered layers + root"),
        ("distill_logits", "teacher logits + KD loss"), ("reserve", "reserve (1.5 GiB + 10%)"),
        ("total", "total")]


def format_plan(plan: dict) -> str:
    m = plan["model"]
    lines = [f"llmshearing plan: {plan['recipe']}", f"  model config: {plan['config_used']}",
             f"  model: {m['params'] / 1e9:.3f}B params ({m['params']:,}): {m['num_hidden_layers']} layers, "
             f"hidden {m['hidden_size']}, {m['num_attention_heads']}/{m['num_key_value_heads']} heads, "
             f"intermediate {m['intermediate_size']}, vocab {m['vocab_size']}"]
    if plan["pruning"]:
        t = plan["pruning"]["target"]
        lines.append(f"  pruning to {t['num_hidden_layers']} layers / {t['hidden_size']} hidden / "
                     f"{t['num_attention_heads']} heads / {t['intermediate_size']} intermediate; masks on "
                     f"{', '.join(plan['pruning']['masks']) or 'nothing'} ({plan['pruning']['mask_numbers']:,} numbers)")
    if plan["distill"]:
        d = plan["distill"]
        lines.append(f"  distillation from {d['config_used']}: {d['params'] / 1e9:.3f}B params, "
                     f"{'the whole vocabulary' if d['top_k'] is None else 'top ' + str(d['top_k']) + ' tokens'}")
    lines += [f"  {plan['gpus']} GPUs ({plan['nodes']} node(s) x {plan['gpus_per_node']}), {plan['sharding_strategy']} "
              f"over {plan['shard_group']}, {plan['precision']} ({plan['dtypes']})",
              f"  batch: global {plan['global_train_batch_size']} = {plan['gpus']} x {plan['per_device_batch']} per GPU, "
              f"microbatch {plan['microbatch']} x {plan['seq_len']} tokens (seq len from {plan['seq_len_source']})", ""]
    on, off = plan["per_gpu_gb_by_checkpointing"]["with_checkpointing"], plan["per_gpu_gb_by_checkpointing"]["without_checkpointing"]
    mark = (" *", "  ") if plan["activation_checkpointing"] else ("  ", " *")
    lines.append(f"  per GPU, GiB, microbatch {plan['microbatch']:<8}  ckpt on{mark[0]}  ckpt off{mark[1]}")
    for key, label in ROWS:
        if key not in on:
            continue
        if key == "reserve":  # the terms meet in two moments; the larger is the peak (module docstring)
            for moment in ("loss", "backward"):
                lines.append(f"  {'= peak at the ' + moment if moment == 'loss' else '= peak in backward':<34} "
                             f"{on['moments'][moment]:>9.2f}  {off['moments'][moment]:>10.2f}")
        lines.append(f"  {label:<34} {on[key]:>9.2f}  {off[key]:>10.2f}")
    cap = plan["gpu_memory_gb"]
    lines.append(f"  {'fits in ' + format(cap, 'g') + ' GiB?':<34} {'yes' if on['total'] <= cap else 'no':>9}  "
                 f"{'yes' if off['total'] <= cap else 'no':>10}")
    lm = plan["largest_microbatch"]
    fmt = lambda v: "none" if v is None else str(v)  # noqa: E731
    lines += [f"  (* the recipe's setting, activation_checkpointing={str(plan['activation_checkpointing']).lower()})",
              f"  largest microbatch that fits (divisors of the per-GPU batch {plan['per_device_batch']}): "
              f"{fmt(lm['with_checkpointing'])} with checkpointing, {fmt(lm['without_checkpointing'])} without", ""]
    h = plan["host_gb_per_node_detail"]
    other = plan["host_gb_per_node_other_nodes"]
    first = "rank-0 node" if plan["host_gb_per_node"] != other and other is not None else "each node"
    lines += [f"  host RAM per node, GiB (peak while loading; {plan['host_loading']}):",
              f"    {first} {plan['host_gb_per_node']:.1f} = weights {h['weights']:.1f} + {plan['gpus_per_node']} ranks "
              f"{h['rank_processes']:.1f} + dataloader workers {h['dataloader_workers']:.1f}"
              + (f"; other nodes {other:.1f}" if first == "rank-0 node" else ""),
              *([f"    if every rank loaded the weights (no fsdp / DDP): {plan['host_gb_per_node_if_every_rank_loads']:.1f}"]
                if plan["host_gb_per_node_if_every_rank_loads"] != plan["host_gb_per_node"] else []),
              *([f"    a GGUF / .bin source (transformers' loader: HF model + DecoderLM, 8P per loading rank): "
                 f"{plan['host_gb_per_node_gguf_or_bin']:.1f}"] if plan["weights_format"] == "safetensors" else []),
              f"  host: {plan['host_verdict']}", "",
              f"verdict: {plan['verdict']} ({plan['per_gpu_gb']['total']:.1f} of {cap:g} GiB per GPU at microbatch "
              f"{plan['microbatch']}, checkpointing {'on' if plan['activation_checkpointing'] else 'off'})"]
    lines.append(f"export host RAM: {plan['export_host_gb']:.1f} GiB (one source layer or embedding in fp32 + its sliced "
                 f"copy; at the end of a run, on top of the run's own host memory)")
    a = plan.get("activation_init")
    if a:
        lines.append(f"pruning.init=activation phase ({'this recipe' if a['applies'] else 'not set by this recipe'}): "
                     f"rank 0's GPU peaks at {a['traced_gib']:.1f} GiB traced, {a['estimate_gib']:.1f} estimated "
                     f"(the fp32 model + scoring {a['sequences']} x {a['seq_len']} calibration tokens, "
                     f"{a['traced_sequences']} per pass)"
                     + ("" if a["traced_gib"] <= plan["gpu_memory_gb"] else f", more than {plan['gpu_memory_gb']:g} GiB"))
    t = plan.get("trace")
    if t:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in t["at_peak_gib"].items())
        lines += ["", f"trace (one training step on the meta device, FSDP over a fake process group of {plan['gpus']}, "
                      f"{t['microbatches']} microbatch(es), {t['seconds']:.0f} s):",
                  f"  estimate {t['estimate_gib']:.2f} GiB per GPU without the reserve; traced peak {t['traced_gib']:.2f} "
                  f"GiB ({t['ratio']:.2f} of the estimate) in {t['peak_phase']}",
                  f"  alive at the peak, GiB: {parts}"]
    return "\n".join(lines)


def add_parser(sub) -> None:
    """Register `plan` on an argparse subparsers object (sets `handler=run`)."""
    p = sub.add_parser(
        "plan", help="per-GPU memory and host RAM of a recipe, from the configs alone (no weights)",
        description="Estimate the per-GPU memory of one training step (sharded fp32 state, gathered FSDP units, "
                    "masks, activations with and without checkpointing, logits, a reserve) and host RAM per node "
                    "of a recipe, with a verdict and the largest microbatch that fits. Formulas: docs/plan.md.")
    p.add_argument("recipe", help="a yaml recipe (path, or a shipped name like prune_1.3b)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (world size)")
    p.add_argument("--gpu-memory-gb", type=float, required=True, help="memory of one GPU in GiB (A100-80GB: 80)")
    p.add_argument("--host-memory-gb", type=float, help="host RAM per node in GiB (default: not checked)")
    p.add_argument("--gpus-per-node", type=int, default=DEFAULT_GPUS_PER_NODE, help="default 8")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the shards' manifest when present, "
                                               "else the model's max_position_embeddings)")
    p.add_argument("--model-config", metavar="PATH", help="config.json (or its folder) of the model the recipe trains, "
                                                          "when model.path does not exist here")
    p.add_argument("--target-shape", metavar="PRESET", help="continue recipes: the pruned shape to apply to the "
                                                            "Llama-2-7B config (default: from the recipe name)")
    p.add_argument("--teacher-config", metavar="PATH", help="config.json (or its folder) of distill.teacher, when "
                                                            "that folder does not exist here")
    p.add_argument("--trace", action="store_true",
                   help="also run one training step of the recipe at its real shapes on the meta device (no GPU, no "
                        "weights; FSDP over a fake process group of --gpus ranks) and report its measured per-GPU peak "
                        "beside the estimate (a minute for a 7B recipe)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=run)


def run(args) -> int:
    """`llmshearing plan`: 0 when the recipe fits, 1 when it does not; bad input raises ConfigError."""
    plan = make_plan(args.recipe, args.gpus, args.gpu_memory_gb, args.host_memory_gb,
                     gpus_per_node=args.gpus_per_node, seq_len=args.seq_len, model_config=args.model_config,
                     target_shape=args.target_shape, teacher_config=args.teacher_config, trace=args.trace)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0 if plan["verdict"] == "fits" else 1
