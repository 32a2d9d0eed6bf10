"""Checkpoint layouts that differ from the decoder's own (Llama's names, one tensor per projection).

Phi-3 fuses q/k/v into `qkv_proj` (rows [q heads | k heads | v heads]) and gate/up into `gate_up_proj`
([gate | up]); GPT-NeoX has its own names and a `query_key_value` laid out per head ([h0: q k v | h1: q k v ...]).
A checkpoint's tensors are split into the decoder's when read (`from_hf`) and fused back when an export is written
(`to_hf`), so the masks, folding and slicing see per-head and per-unit rows in every family.
"""
from __future__ import annotations

import re

import torch

from llmshearing.model.hf import head_dim_of, kv_heads_of

FUSED_FAMILIES = ("phi3", "gpt_neox")
_NEOX = (  # (decoder name, GPT-NeoX name); {} is the layer index
    ("model.embed_tokens.", "gpt_neox.embed_in."), ("model.norm.", "gpt_neox.final_layer_norm."),
    ("lm_head.", "embed_out."), ("model.layers.{}.input_layernorm.", "gpt_neox.layers.{}.input_layernorm."),
    ("model.layers.{}.post_attention_layernorm.", "gpt_neox.layers.{}.post_attention_layernorm."),
    ("model.layers.{}.self_attn.o_proj.", "gpt_neox.layers.{}.attention.dense."),
    ("model.layers.{}.mlp.up_proj.", "gpt_neox.layers.{}.mlp.dense_h_to_4h."),
    ("model.layers.{}.mlp.down_proj.", "gpt_neox.layers.{}.mlp.dense_4h_to_h."),
)
# Buffers old GPT-NeoX checkpoints (Pythia's) store beside the weights; transformers ignores them too
_NEOX_BUFFERS = re.compile(r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")
_LAYER = re.compile(r"^(.*?layers\.)(\d+)(\..*)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def _rename(name: str, table) -> str | None:
    m = _LAYER.match(name)
    key, layer = (m.group(1) + "{}" + m.group(3), m.group(2)) if m else (name, None)
    for src, dst in table:
        if key.startswith(src):
            return (dst + key[len(src):]).format(layer)
    return None


def _fused_parts(config, name: str) -> tuple[str, tuple[str, ...]] | None:
    """(fused HF name, the decoder names it is made of, in order) for a decoder tensor that is part of one."""
    m = re.match(r"^model\.layers\.(\d+)\.(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.(weight|bias)$", name)
    if m is None:
        return None
    i, kind = m.group(1), m.group(5)
    p = f"model.layers.{i}."
    if m.group(3):
        fused = (f"gpt_neox.layers.{i}.attention.query_key_value.{kind}" if config.model_type == "gpt_neox"
                 else f"{p}self_attn.qkv_proj.{kind}")
        return fused, tuple(f"{p}self_attn.{x}.{kind}" for x in _QKV)
    if config.model_type == "phi3":
        return f"{p}mlp.gate_up_proj.{kind}", (f"{p}mlp.gate_proj.{kind}", f"{p}mlp.up_proj.{kind}")
    return None  # GPT-NeoX's up_proj (dense_h_to_4h) is not fused


def _fuse(config, fused: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if config.model_type == "gpt_neox" and fused.endswith(("query_key_value.weight", "query_key_value.bias")):
        hd = head_dim_of(config)  # per head: its q rows, then its k rows, then its v rows
        return torch.stack([p.reshape(-1, hd, *p.shape[1:]) for p in parts], 1).reshape(-1, *parts[0].shape[1:])
    return torch.cat(parts, 0)


def to_hf(config, tensors):
    """The decoder's (name, tensor) pairs as the family's checkpoint tensors: fused ones once all their parts came
    (a layer's parts come together, so at most one layer's projections wait)."""
    if config.model_type not in FUSED_FAMILIES:
        yield from tensors
        return
    waiting: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        fused = _fused_parts(config, name)
        if fused is None:
            yield (_rename(name, _NEOX) if config.model_type == "gpt_neox" else name), tensor
            continue
        target, names = fused
        got = waiting.setdefault(target, {})
        got[name] = tensor
        if len(got) == len(names):
            parts = waiting.pop(target)
            yield target, _fuse(config, target, [parts[n] for n in names])
    if waiting:
        raise RuntimeError(f"export: parts of {sorted(waiting)[:3]} never came")


def hf_shapes(config, decoder_shapes: dict) -> dict[str, tuple]:
    """name -> shape of the family's checkpoint tensors, from the decoder's (on the meta device)."""
    meta = ((n, torch.empty(s, device="meta")) for n, s in decoder_shapes.items())
    return {n: tuple(t.shape) for n, t in to_hf(config, meta)}


def head_name(config) -> str:
    """The output embedding's checkpoint name (left out of a checkpoint with tied embeddings)."""
    return "embed_out.weight" if config.model_type == "gpt_neox" else "lm_head.weight"


def ignored(config, name: str) -> bool:
    """A tensor a checkpoint of the family may hold that is no weight (GPT-NeoX's causal-mask and rotary buffers)."""
    return config.model_type == "gpt_neox" and _NEOX_BUFFERS.search(name) is not None


def from_hf(config, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One checkpoint tensor as the decoder's tensors (a fused one split into its parts; a buffer: none)."""
    family = config.model_type
    if family not in FUSED_FAMILIES:
        return [(name, tensor)]
    if ignored(config, name):
        return []
    hd = head_dim_of(config)
    m = _LAYER.match(name)
    kind = name.rsplit(".", 1)[-1]
    if family == "gpt_neox":
        if name.endswith((".query_key_value.weight", ".query_key_value.bias")):
            per_head = tensor.reshape(-1, 3, hd, *tensor.shape[1:])  # (heads, q/k/v, head_dim, ...)
            return [(f"model.layers.{m.group(2)}.self_attn.{x}.{kind}", per_head[:, j].reshape(-1, *tensor.shape[1:]))
                    for j, x in enumerate(_QKV)]
        back = _rename(name, [(b, a) for a, b in _NEOX])
        return [(back, tensor)] if back is not None else [(name, tensor)]
    if name.endswith((".qkv_proj.weight", ".qkv_proj.bias")):
        q, kv = config.num_attention_heads * hd, kv_heads_of(config) * hd
        return [(f"model.layers.{m.group(2)}.self_attn.{x}.{kind}", t)
                for x, t in zip(_QKV, torch.split(tensor, [q, kv, kv], 0))]
    if name.endswith((".gate_up_proj.weight", ".gate_up_proj.bias")):
        gate, up = tensor.chunk(2, 0)
        return [(f"model.layers.{m.group(2)}.mlp.gate_proj.{kind}", gate), (f"model.layers.{m.group(2)}.mlp.up_proj.{kind}", up)]
    return [(name, tensor)]


def decoder_state(config, state: dict) -> dict:
    """A transformers model's state dict in the decoder's names and tensors."""
    return {n: t for name, tensor in state.items() for n, t in from_hf(config, name, tensor)}
