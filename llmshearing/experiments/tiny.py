"""A tiny but real setup for tests and for debugging recipes on a laptop: a randomly initialized HF
model of a chosen LLaMA family, a byte-level BPE tokenizer trained on Python's own sources and docs,
and two text domains (prose from docstrings, code from the standard library)."""
from __future__ import annotations

import importlib
import inspect
import json
import os
import sysconfig

import torch

from llmshearing.data_prep.shards import build_shards
from llmshearing.errors import ConfigError

FAMILY_CONFIGS = {
    "llama-mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "smollm2-gqa": dict(model_type="llama", num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                        tie_word_embeddings=True, rope_theta=100000.0),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=24,
                    tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  tie_word_embeddings=False),  # head_dim 32 x 4 heads = 128, twice hidden 64 (as Qwen3-0.6B)
    # Gemma: tied (as released), sliding window 16 below the tests' 40 tokens, query_pre_attn_scalar != head_dim,
    # soft-caps low enough to bend the tiny model's scores and logits (Gemma 2 ships 50 / 30)
    "gemma2": dict(model_type="gemma2", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   tie_word_embeddings=True, sliding_window=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0),
    # Gemma 3: layer types from sliding_window_pattern 2 (sliding, full, ...), two RoPE bases, q_norm / k_norm
    "gemma3": dict(model_type="gemma3_text", num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   tie_word_embeddings=True, sliding_window=16, query_pre_attn_scalar=24, sliding_window_pattern=2,
                   rope_theta=1_000_000.0, rope_local_base_freq=10_000.0),
    # Phi-3: fused qkv_proj / gate_up_proj, GQA, partial rotary as Phi-4-mini (0.75 of head_dim 16)
    "phi3": dict(model_type="phi3", num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.75,
                 tie_word_embeddings=False, pad_token_id=None),
    # Pythia: LayerNorm with bias, parallel residual, rotary over 0.25 of head_dim 16, per-head fused QKV, MHA
    "pythia": dict(model_type="gpt_neox", num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True,
                   hidden_act="gelu", tie_word_embeddings=False, layer_norm_eps=1e-5),
}
STDLIB_MODULES = ("json", "os", "argparse", "collections", "csv", "random", "textwrap", "string", "shutil", "pathlib")


def tiny_config(family: str, vocab_size: int = 384, **overrides):
    from transformers import AutoConfig  # heavy: transformers

    spec = dict(FAMILY_CONFIGS[family])
    model_type = spec.pop("model_type")
    sizes = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 max_position_embeddings=512, rms_norm_eps=1e-5)
    if model_type == "gpt_neox":
        sizes.pop("rms_norm_eps")
    return AutoConfig.for_model(model_type, **{**sizes, **spec, **overrides})


def random_model(family: str, vocab_size: int = 384, seed: int = 0, **overrides):
    """A random HF model of `family` (config `overrides` allowed) whose norms and biases are not at their init values
    (so tests that fold or slice them can fail)."""
    from transformers import AutoModelForCausalLM  # heavy: transformers

    from llmshearing.model.hf import is_gemma, reference_attention  # heavy: transformers

    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size=vocab_size, **overrides)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32, **reference_attention(config))
    low = -0.5 if is_gemma(config) else 0.5  # Gemma multiplies by 1 + weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(low, low + 1.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif model.config.model_type == "gemma2" and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)  # scores large enough that the attention soft-cap bends them (measurably: tests)
    return model.eval()


def domain_texts() -> dict[str, list[str]]:
    stdlib = sysconfig.get_paths()["stdlib"]
    prose, code = [], []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        prose.extend(doc for _, obj in inspect.getmembers(module) if (doc := inspect.getdoc(obj)) and len(doc) > 200)
        path = os.path.join(stdlib, name + ".py") if os.path.exists(os.path.join(stdlib, name + ".py")) else module.__file__
        with open(path, encoding="utf-8") as f:
            code.append(f.read())
    return {"prose": prose, "code": code}


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer  # heavy: tokenizers
    from transformers import PreTrainedTokenizerFast  # heavy: transformers

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")


def make_tiny(out_dir: str, family: str = "smollm2-gqa", vocab_size: int = 384, seed: int = 0) -> dict[str, str]:
    """Write `<out>/model` (HF checkpoint + tokenizer), `<out>/text/{prose,code}.jsonl` and their 64-token
    shards `<out>/shards` (4 eval and 4 test sequences, 256 prune and 256 continue sequences in all); return paths."""
    marker = os.path.join(out_dir, ".llmshearing-tiny")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(marker):
        raise ConfigError(f"out_dir '{out_dir}' exists, is not empty and was not made by make-tiny; give a new "
                          f"folder (make-tiny replaces only its own earlier output)")
    texts = domain_texts()
    paths = {"model": os.path.join(out_dir, "model")}
    os.makedirs(os.path.join(out_dir, "text"), exist_ok=True)
    with open(marker, "w") as f:
        f.write("written by llmshearing make-tiny\n")
    for name, docs in texts.items():
        paths[name] = os.path.join(out_dir, "text", f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    tokenizer = train_tokenizer([t for docs in texts.values() for t in docs], vocab_size)
    random_model(family, len(tokenizer), seed).save_pretrained(paths["model"])
    tokenizer.save_pretrained(paths["model"])
    paths["shards"] = os.path.join(out_dir, "shards")
    build_shards(paths["shards"], paths["model"], {name: [paths[name]] for name in texts}, seq_len=64,
                 eval_sequences=4, prune_tokens=16384, continue_tokens=16384, workers=1, progress=False)
    return paths
