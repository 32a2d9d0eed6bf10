"""Tokenizers: loading one (HF folder or GGUF file), fingerprinting it, checking shards were made with it."""
from __future__ import annotations

import hashlib
import json
import os

from llmshearing.data.layout import read_manifest
from llmshearing.errors import ConfigError


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary (token -> id) and special ids: equal iff the token ids mean the same."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return h.hexdigest()[:16]


def load_tokenizer(path: str, gguf_file: str | None = None):
    """The fast HF tokenizer in `path` (or in its GGUF file), with an eos to separate documents."""
    if not os.path.isdir(path):
        raise ConfigError(f"tokenizer '{path}' is not a directory; pass an HF model or tokenizer folder "
                          f"(with tokenizer.json, or a GGUF file named by --gguf-file)")
    if gguf_file and not os.path.exists(os.path.join(path, gguf_file)):
        raise ConfigError(f"--gguf-file '{gguf_file}' is not in '{path}'")
    from transformers import AutoTokenizer  # heavy: transformers

    try:
        tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user needs the path
        raise ConfigError(f"cannot load a tokenizer from '{path}': {type(e).__name__}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"the tokenizer in '{path}' is not a fast (Rust) tokenizer; save one with tokenizer.json")
    if tok.eos_token_id is None:
        raise ConfigError(f"the tokenizer in '{path}' has no eos_token_id, so documents cannot be separated; "
                          f"set eos_token in its tokenizer_config.json")
    return tok


def check_tokenizer(root: str, tokenizer, vocab_size: int, model: str = "the model") -> None:
    """The shards were tokenized with `tokenizer` (skipped when None) and every id fits `vocab_size` rows."""
    built = read_manifest(root)["tokenizer"]
    if tokenizer is not None and built["fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"the shards in '{root}' were tokenized with '{built['path']}', whose vocabulary differs "
                          f"from this run's tokenizer ({model}'s); rebuild the shards with the model's tokenizer")
    if built["vocab_size"] > vocab_size:
        raise ConfigError(f"tokenizer vocab larger than the model's embedding: the shards' tokenizer has "
                          f"{built['vocab_size']} tokens but the embedding of {model} has only {vocab_size} rows; "
                          f"wrong tokenizer for this model (set model.tokenizer, or rebuild the shards)")


def model_tokenizer(model_cfg):
    """The run's tokenizer: model.tokenizer, else the model's own (from its GGUF file when it has one)."""
    path = model_cfg.tokenizer or model_cfg.path
    if not os.path.exists(path):
        raise ConfigError(f"model.tokenizer '{path}' does not exist")
    same = model_cfg.tokenizer in (None, model_cfg.path)
    return load_tokenizer(path, model_cfg.gguf_file if same else None)
