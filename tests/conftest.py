import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 384


def tiny_config(family: str):
    """Small configs of each supported family, each with the feature that family adds."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  max_position_embeddings=256, rms_norm_eps=1e-5)
    if family == "llama-mha":
        return LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    if family == "smollm2-gqa":  # GQA, tied embeddings, rope_theta as SmolLM2
        return LlamaConfig(**common, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                           tie_word_embeddings=True, rope_theta=100000.0)
    if family == "mistral":
        return MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2, sliding_window=24,
                             tie_word_embeddings=False)
    if family == "qwen2":  # q/k/v bias
        return Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    raise KeyError(family)


FAMILIES = ["llama-mha", "smollm2-gqa", "mistral", "qwen2"]


def tiny_hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), torch_dtype=torch.float32)
    with torch.no_grad():  # random but not degenerate: norms and biases away from their init
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
