"""Hugging Face configs and checkpoints in: the model families supported, their rules, and loading."""
from __future__ import annotations

import os

from transformers import AutoConfig, PretrainedConfig

from llmshearing.errors import ConfigError

# The families the decoder implements, with the transformers class an export of each is loaded as.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "phi3": "Phi3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}
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


def kv_heads_of(config: PretrainedConfig) -> int:
    """KV heads; an MHA config without `num_key_value_heads` (GPT-NeoX) has one per head."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attention_biases(config: PretrainedConfig) -> tuple[bool, bool]:
    """(q/k/v bias, o bias): Qwen2 always has q/k/v bias and no o bias; Llama/Mistral/Qwen3 follow attention_bias."""
    if config.model_type == "qwen2":
        return True, False
    if config.model_type == "phi3":  # qkv_proj and o_proj never have one
        return False, False
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
    elif config.model_type == "gpt_neox":
        check_neox_config(config)
    elif getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act '{config.hidden_act}' is not supported (only SwiGLU with silu)")
    heads = config.num_attention_heads
    kv = kv_heads_of(config)
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


# ----------------------------------------------------------------------------------------------- GPT-NeoX / Phi-3

NEOX_ACTS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu")


def gated_mlp(config: PretrainedConfig) -> bool:
    """SwiGLU (gate, up, down) or GPT-NeoX's plain MLP (dense_h_to_4h, act, dense_4h_to_h; held as up and down)."""
    return config.model_type != "gpt_neox"


def layer_norm(config: PretrainedConfig) -> bool:
    """LayerNorm with bias (GPT-NeoX) instead of RMSNorm."""
    return config.model_type == "gpt_neox"


def mlp_bias(config: PretrainedConfig) -> bool:
    return config.model_type == "gpt_neox" or bool(getattr(config, "mlp_bias", False))


def norm_eps(config: PretrainedConfig) -> float:
    return config.layer_norm_eps if layer_norm(config) else config.rms_norm_eps


def check_neox_config(config: PretrainedConfig) -> None:
    if config.hidden_act not in NEOX_ACTS:
        raise ConfigError(f"gpt_neox: hidden_act '{config.hidden_act}' is not supported ({', '.join(NEOX_ACTS)})")
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"gpt_neox: hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                          f"{config.num_attention_heads} (GPT-NeoX's head size is their quotient)")


def check_family_target(config: PretrainedConfig, target) -> str | None:
    """Why transformers could not load a `target` shape of this family (None: it can): GPT-NeoX has no head_dim
    setting, so hidden must stay heads x head_dim; Phi-3's config checks longrope's factors against hidden / heads,
    which must therefore stay head_dim."""
    hd = head_dim_of(config)
    if config.model_type == "gpt_neox":  # (KV heads = heads: the source is MHA, so validate_target keeps it)
        if target.hidden_size != target.num_attention_heads * hd:
            return (f"gpt_neox derives head_dim from hidden_size / num_attention_heads, and head_dim ({hd}) is never "
                    f"pruned: hidden_size must be num_attention_heads x {hd} = {target.num_attention_heads * hd}, "
                    f"got {target.hidden_size}")
    if config.model_type == "phi3" and getattr(config, "rope_scaling", None) \
            and target.hidden_size // target.num_attention_heads != hd:
        return (f"phi3 with rope_scaling: transformers checks the rope factors against hidden_size // "
                f"num_attention_heads, which must stay head_dim {hd} (got {target.hidden_size} // "
                f"{target.num_attention_heads})")
    return None


def load_hf_config(path: str, gguf_file: str | None = None) -> PretrainedConfig:
    if not os.path.exists(path):
        raise ConfigError(f"model path '{path}' does not exist")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(path, **kwargs)
    check_source_config(config)
    return config


