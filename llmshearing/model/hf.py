"""Hugging Face configs and checkpoints in: the model families supported, their rules, and loading."""
from __future__ import annotations

import os

import torch
from transformers import AutoConfig, PretrainedConfig

from llmshearing.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attention_biases(config: PretrainedConfig) -> tuple[bool, bool]:
    """(q/k/v bias, o bias): Qwen2 always has q/k/v bias and no o bias; Llama/Mistral follow attention_bias."""
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def check_source_config(config: PretrainedConfig) -> None:
    """Refuse configs the model does not implement, before any weights are read."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type '{config.model_type}' is not supported; supported LLaMA-family types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act '{config.hidden_act}' is not supported (only SwiGLU with silu)")
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv:
        raise ConfigError(
            f"source config: num_attention_heads={heads} is not divisible by num_key_value_heads={kv}"
        )
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


def from_pretrained(path: str, gguf_file: str | None = None, attn_impl: str = "auto",
                    dtype: torch.dtype = torch.float32):
    """The DecoderLM of any Llama/Mistral/Qwen2 checkpoint that transformers reads (safetensors, bin, GGUF)."""
    from transformers import AutoModelForCausalLM

    from llmshearing.model.decoder import DecoderLM  # decoder.py imports this module

    load_hf_config(path, gguf_file)  # refuses unsupported families before the weights are read
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, **kwargs)
    with torch.device("meta"):
        lm = DecoderLM(hf.config, attn_impl)
    lm.to_empty(device="cpu").to(dtype)  # allocate without a random init
    lm.tie_weights()
    lm.load_state_dict(hf.state_dict(), strict=True)
    return lm.eval()
