"""The one place that maps Hugging Face configs to shapes, and shapes back to HF configs.

A *shape* is the five numbers that structured pruning changes. Everything else of a model
(vocabulary, head_dim, RoPE, norms, biases, tied embeddings) is inherited from the source config.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, fields

from transformers import PretrainedConfig

from llmshearing.errors import ConfigError
from llmshearing.model.hf import (attention_biases, gated_mlp, head_dim_of, is_gemma, kv_heads_of, layer_norm, mlp_bias,
                                  qk_norm)

@dataclass(frozen=True)
class Shape:
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def as_dict(self) -> dict:
        return asdict(self)


SHAPE_KEYS = tuple(f.name for f in fields(Shape))

# Named target shapes. The two paper targets take the layer/hidden/head counts of Pythia-1.4B and
# INCITE-Base-3B with a LLaMA-style SwiGLU intermediate size (Xia et al. 2024, Sec. 3 and App. A).
PRESETS: dict[str, Shape] = {
    "sheared-llama-1.3b": Shape(24, 2048, 16, 16, 5504),
    "sheared-llama-2.7b": Shape(32, 2560, 20, 20, 6912),
    # Llama-3.1-8B (32/4096/32/8/14336, head_dim 128) to the shapes of the released Llama-3.2 small models
    # (yamls/models/llama-3.2-*.json). The 3B's is exact. The 1B has head_dim 64 (32 heads x 64) and head_dim is
    # never pruned, so its preset keeps head_dim 128 with the 1B's attention widths: 16 query heads (2048 wide)
    # and 4 KV heads (512 wide), the 1B's 4 query heads per KV group: the same parameters per layer as the 1B.
    "llama-3.2-3b": Shape(28, 3072, 24, 8, 8192),
    "llama-3.2-1b-hd128": Shape(16, 2048, 16, 4, 8192),
    # Qwen3-8B (36/4096/32/8/12288, head_dim 128, untied) to the released Qwen3-1.7B's shape
    # (yamls/models/qwen3-1.7b.json, the same head_dim): exact. The pruned model keeps the 8B's untied output
    # embedding (the 1.7B ties it): 2.03B.
    "qwen3-1.7b": Shape(28, 2048, 16, 8, 6144),
    # The embedded default: SmolLM2-135M (30/576/9/3/1536) to ~49% of its non-embedding parameters.
    # 2 KV groups of 2 query heads keep GQA valid and exercise both group and in-group head masks.
    "smollm2-135m-half": Shape(24, 512, 4, 2, 1152),
}


def shape_of(config: PretrainedConfig) -> Shape:
    return Shape(
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=kv_heads_of(config),
        intermediate_size=config.intermediate_size,
    )


def validate_target(src: Shape, tgt: Shape) -> None:
    """Every reason a target cannot be cut out of the source, each with the fix."""
    for key in SHAPE_KEYS:
        s, t = getattr(src, key), getattr(tgt, key)
        if t < 1:
            raise ConfigError(f"target.{key}={t} must be at least 1")
        if t > s:
            raise ConfigError(
                f"target.{key}={t} is larger than the source's {s}: pruning can only remove units"
            )
    if tgt.num_attention_heads % tgt.num_key_value_heads:
        raise ConfigError(
            f"target.num_attention_heads={tgt.num_attention_heads} is not divisible by "
            f"target.num_key_value_heads={tgt.num_key_value_heads}: every KV group must keep the same "
            f"number of query heads"
        )
    if tgt.heads_per_group > src.heads_per_group:
        raise ConfigError(
            f"target keeps {tgt.heads_per_group} query heads per KV group but the source has only "
            f"{src.heads_per_group}; lower num_attention_heads or raise num_key_value_heads "
            f"(at most {src.heads_per_group * tgt.num_key_value_heads} heads for {tgt.num_key_value_heads} KV heads)"
        )


def target_config(source: PretrainedConfig, target: Shape) -> PretrainedConfig:
    """The dense HF config of the pruned model: the source's, with the target's five numbers."""
    config = copy.deepcopy(source)
    for key, value in target.as_dict().items():
        setattr(config, key, value)
    config.head_dim = head_dim_of(source)  # explicit: hidden/heads need not equal head_dim any more
    config._name_or_path = ""
    return config


def param_count(shape: Shape, config: PretrainedConfig, *, floats: dict | None = None) -> float:
    """Parameters of a model of `shape` with the source's vocab, biases and tying.

    `floats` may replace any dim by a real number (expected sizes during pruning).
    """
    d = {**shape.as_dict(), **(floats or {})}
    L, h, H, KV, inter = (d[k] for k in SHAPE_KEYS)
    hd = head_dim_of(config)
    qkv_bias, o_bias = attention_biases(config)
    projections = 3 if gated_mlp(config) else 2  # GPT-NeoX: dense_h_to_4h and dense_4h_to_h
    norm = 2 if layer_norm(config) else 1  # GPT-NeoX's LayerNorms have a bias
    attn = h * (H + 2 * KV) * hd + H * hd * h + (qkv_bias * (H + 2 * KV) * hd) + o_bias * h
    mlp = projections * h * inter + mlp_bias(config) * ((projections - 1) * inter + h)
    norms = 4 if is_gemma(config) else 2  # Gemma: pre- and post-norms around attention and MLP
    per_layer = attn + mlp + norms * norm * h + (2 * hd if qk_norm(config) else 0)  # Qwen3's / Gemma 3's q/k norms
    embed = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return L * per_layer + embed + norm * h
