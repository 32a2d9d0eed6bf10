"""Hugging Face configs and checkpoints in: the model families supported, their rules, and loading."""
from __future__ import annotations

import json
import os

import torch
from transformers import AutoConfig, PretrainedConfig

from llmshearing.errors import ConfigError

# The families the decoder implements, with the transformers class an export of each is loaded as.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
# an RMSNorm over head_dim on every query and key head (one weight for all heads)
QK_NORM_TYPES = ("qwen3", "gemma3_text")
# Gemma 2 / Gemma 3 text: (1 + weight) RMSNorms before and after attention and MLP, embedding x sqrt(hidden),
# GELU-tanh MLP, query_pre_attn_scalar, soft-capping (Gemma 2), per-layer sliding windows (layer_types)
GEMMA_TYPES = ("gemma2", "gemma3_text")


def is_gemma(config: PretrainedConfig) -> bool:
    return config.model_type in GEMMA_TYPES


def reference_attention(config: PretrainedConfig) -> dict:
    """from_pretrained / from_config kwargs for the attention transformers computes a family with as its reference:
    Gemma's eager one (its SDPA path drops Gemma 2's attention soft-cap), the default elsewhere."""
    return {"attn_implementation": "eager"} if is_gemma(config) else {}


def sliding_layer(config: PretrainedConfig, layer_idx: int) -> bool:
    """Whether Gemma layer `layer_idx` attends within config.sliding_window (its layer_types entry, which transformers
    4.53 fills from the alternation / sliding_window_pattern when a config.json has none)."""
    return config.layer_types[layer_idx] == "sliding_attention"


def qk_norm(config: PretrainedConfig) -> bool:
    """Whether the family normalises each query and key head before RoPE (Qwen3's q_norm / k_norm)."""
    return config.model_type in QK_NORM_TYPES


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attention_biases(config: PretrainedConfig) -> tuple[bool, bool]:
    """(q/k/v bias, o bias): Qwen2 always has q/k/v bias and no o bias; Llama/Mistral/Qwen3 follow attention_bias."""
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def check_source_config(config: PretrainedConfig) -> None:
    """Refuse configs the model does not implement, before any weights are read."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type '{config.model_type}' is not supported; supported LLaMA-family types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (a new family needs its layer in model/decoder.py with HF's "
            f"parameter names, its masks and export in pruning/, its counts in pruning/shapes.py; docs/families.md)"
        )
    if is_gemma(config):
        if config.hidden_activation != "gelu_pytorch_tanh":
            raise ConfigError(f"{config.model_type}: hidden_activation '{config.hidden_activation}' is not supported "
                              f"(only gelu_pytorch_tanh, as the released Gemma models)")
        if len(config.layer_types) != config.num_hidden_layers:
            raise ConfigError(f"{config.model_type}: layer_types has {len(config.layer_types)} entries for "
                              f"{config.num_hidden_layers} layers")
    elif getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act '{config.hidden_act}' is not supported (only SwiGLU with silu)")
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv:
        raise ConfigError(
            f"source config: num_attention_heads={heads} is not divisible by num_key_value_heads={kv}"
        )
    layer_types = set(getattr(config, "layer_types", None) or [])
    if getattr(config, "use_sliding_window", False) and len(layer_types) > 1:
        raise ConfigError(f"{config.model_type}: use_sliding_window with full-attention layers below "
                          f"max_window_layers={config.max_window_layers} is not supported (the decoder windows "
                          f"all layers or none); released Qwen2/Qwen3 checkpoints have use_sliding_window false")
    rope = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "dynamic":
        raise ConfigError("rope_scaling type 'dynamic' is not supported (it changes with sequence length)")


def load_hf_config(path: str, gguf_file: str | None = None) -> PretrainedConfig:
    if not os.path.exists(path):
        raise ConfigError(f"model path '{path}' does not exist")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(path, **kwargs)
    check_source_config(config)
    return config


def empty_model(config: PretrainedConfig, attn_impl: str = "auto", dtype: torch.dtype = torch.float32):
    """A DecoderLM with allocated but unwritten parameters (no random init): the pages stay unresident until
    something is loaded into them, so a rank that receives its weights by broadcast holds no extra copy."""
    from llmshearing.model.decoder import DecoderLM  # decoder.py imports this module

    with torch.device("meta"):
        lm = DecoderLM(config, attn_impl)
    lm.to_empty(device="cpu").to(dtype)
    lm.tie_weights()  # to_empty allocates embedding and head separately
    return lm


def safetensors_files(path: str) -> list[str] | None:
    """The safetensors files of an HF model folder (sharded or not), or None when it has none."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    return [single] if os.path.isfile(single) else None


def load_safetensors_into(lm, files: list[str]) -> None:
    """Copy the tensors of `files` into `lm` one file at a time, in their stored dtype until the copy: peak
    memory is the model plus one file (memory-mapped), not a second model. The key set and shapes are checked
    first, from the headers (`checks.check_weights_match`, called by `from_pretrained`)."""
    from safetensors import safe_open

    params = lm.state_dict(keep_vars=True)
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                with torch.no_grad():
                    params[name].copy_(f.get_tensor(name))


def from_pretrained(path: str, gguf_file: str | None = None, attn_impl: str = "auto",
                    dtype: torch.dtype = torch.float32):
    """The DecoderLM of any Llama/Mistral/Qwen2/Qwen3/Gemma 2/Gemma 3 text checkpoint: safetensors are read tensor
    by tensor straight into
    the model; other formats (GGUF, .bin) go through transformers' loader."""
    config = load_hf_config(path, gguf_file)  # refuses unsupported families before the weights are read
    files = None if gguf_file else safetensors_files(path)
    if files:
        from llmshearing.checks import check_weights_match

        check_weights_match(path, config, "model.path")  # a missing, extra or misshapen tensor, by name
        lm = empty_model(config, attn_impl, dtype)
        load_safetensors_into(lm, files)
        return lm.eval()
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, **kwargs)
    lm = empty_model(hf.config, attn_impl, dtype)
    lm.load_state_dict(hf.state_dict(), strict=True)
    return lm.eval()
