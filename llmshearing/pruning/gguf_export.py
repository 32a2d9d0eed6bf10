"""GGUF files of exports (llama.cpp's format), written with the `gguf` package's own GGUFWriter and name maps.

Llama and Mistral are written as GGUF architecture `llama` (llama.cpp runs Mistral as llama), Qwen2 as `qwen2`.
llama.cpp applies rotary embeddings to interleaved pairs in the `llama` architecture, where Hugging Face rotates
the two halves of each head, so q/k rows are permuted per head (pairs (i, i + hd/2) made adjacent); transformers'
GGUF reader undoes exactly that permutation, and `qwen2` (NeoX-style rope in llama.cpp) needs none.

What is refused, with a one-line reason (ConfigError), is what GGUF or transformers' GGUF reader (4.53) cannot
carry: rope scaling, a Mistral sliding window shorter than the context, Qwen2 sliding windows or a head_dim other
than hidden/heads (the reader derives it), Llama biases, and tokenizers that are neither byte-level BPE (GPT-2 style,
GGUF tokenizer `gpt2`) nor SentencePiece BPE with byte fallback (Llama-2's, GGUF tokenizer `llama`; a unigram model
is refused: llama.cpp would split it by merge scores). Tensors are streamed: one is in memory at a time.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import torch
import transformers

from llmshearing.checks import writable_output
from llmshearing.errors import ConfigError
from llmshearing.io import disk_full
from llmshearing.model.hf import head_dim_of
from llmshearing.model.loading import safetensors_files

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# Pre-tokenizer names llama.cpp knows, recognised from the tokenizer.json pre_tokenizer that implements them.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _refuse(why: str) -> ConfigError:
    return ConfigError(f"GGUF export refused: {why}")


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, or None when it is none of the known ones."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) else None
    if pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers", [])
    kinds = [p.get("type") for p in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        return {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}.get(pattern)
    return None


def _spm_prefix(spec: dict) -> bool | None:
    """For a SentencePiece-style tokenizer.json (spaces -> '▁', as transformers converts Llama-2's tokenizer.model):
    whether a '▁' is prepended to the text (GGUF's add_space_prefix); None when it is not that style."""
    norm, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer")
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    kinds = [(n.get("type"), n.get("prepend"), (n.get("pattern") or {}).get("String"), n.get("content"))
             for n in steps]
    replace = ("Replace", None, " ", "\u2581")
    if pre is None and kinds in ([("Prepend", "\u2581", None, None), replace], [replace]):  # legacy Llama-2 form
        return len(kinds) == 2
    if not norm and (pre or {}).get("type") == "Metaspace" and pre.get("replacement") == "\u2581" \
            and not pre.get("split", True):  # transformers' legacy=False form
        return pre.get("prepend_scheme", "always") != "never"
    return None


def tokenizer_spec(tokenizer, vocab_size: int) -> dict:
    """What GGUF's tokenizer stores: tokens (padded to the embedding's rows), types, merges, special ids, whether
    BOS/EOS are added, the chat template, and per model: `gpt2` (byte-level BPE) the pre-tokenizer name; `llama`
    (SentencePiece BPE with byte fallback, Llama-2's) the scores and whether a '▁' is prepended."""
    from gguf import TokenType  # optional: the gguf extra

    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise _refuse("the export has no fast (tokenizer.json) tokenizer to write into the GGUF file")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model", {}), _pre_name(spec.get("pre_tokenizer"))
    prefix = _spm_prefix(spec) if model.get("type") == "BPE" and model.get("byte_fallback") else None
    if model.get("type") != "BPE" or (pre is None and prefix is None):
        kind = model.get("type", "?") + (" with byte fallback" if model.get("byte_fallback") else "")
        norm, split = (spec.get(k) or {} for k in ("normalizer", "pre_tokenizer"))
        raise _refuse(f"the tokenizer ({kind}, normalizer {norm.get('type')}, pre-tokenizer {split.get('type')}) is "
                      f"neither a byte-level BPE of a known pre-tokenizer (gpt-2, smollm, qwen2, llama-bpe) nor a "
                      f"SentencePiece BPE with byte fallback (Llama-2 style); only those are written to GGUF")
    n = len(tokenizer)
    if n > vocab_size:
        raise _refuse(f"the tokenizer has {n} tokens, more than the model's {vocab_size} embedding rows")
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    spm = prefix is not None
    byte = re.compile(r"<0x[0-9A-F]{2}>")

    def kind(i, t):
        if spm and i == tokenizer.unk_token_id:
            return TokenType.UNKNOWN
        if t in added:
            return TokenType.CONTROL if added[t] else TokenType.USER_DEFINED
        return TokenType.BYTE if spm and byte.fullmatch(t) else TokenType.NORMAL

    types = [kind(i, t) for i, t in enumerate(tokens)]
    out = {"model": "llama" if spm else "gpt2", "pre": pre, "add_space_prefix": prefix, "merges": merges}
    if spm:  # SentencePiece BPE merges the adjacent pair whose result scores highest: rank order, as the merges
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        out["scores"] = [0.0 if ty != TokenType.NORMAL else -float(rank[t]) if t in rank else -float(len(merges) + i)
                         for i, (t, ty) in enumerate(zip(tokens, types))]  # single characters below every merge
        out["scores"] += [0.0] * (vocab_size - n)
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]  # embedding rows without a token
    types += [TokenType.UNUSED] * (vocab_size - n)
    probe = "a"
    with_special, plain = tokenizer(probe)["input_ids"], tokenizer(probe, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {**out, "tokens": tokens, "types": [int(t) for t in types],
            "bos": bos, "eos": eos, "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id,
            "add_bos": bos is not None and with_special[:1] == [bos] and plain[:1] != [bos],
            "add_eos": eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos],
            "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None}


def check_gguf(config, tokenizer, dtype: str) -> None:
    """Refuse (ConfigError, one line) what cannot be written to GGUF and read back by transformers."""
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"--gguf-dtype '{dtype}': choose one of {', '.join(GGUF_DTYPES)}")
    try:
        import gguf  # noqa: F401 - an optional extra: said here, before anything is written
    except ImportError:
        raise ConfigError("a GGUF export needs the gguf package: pip install 'llmshearing[gguf]'") from None
    family = config.model_type
    if family in ("gemma2", "gemma3_text"):
        raise _refuse(f"{family}: transformers {transformers.__version__}'s GGUF reader for Gemma, which the tests "
                      f"read every GGUF back with, drops query_pre_attn_scalar, the soft-caps and the per-layer layer_types "
                      f"(a pruned model's sliding/full pattern) and reads only SentencePiece Gemma tokenizers")
    if family == "phi3":
        raise _refuse("model_type 'phi3' is not written as GGUF here: transformers' phi3 GGUF reader (4.53), which the "
                      "tests read every GGUF back with, drops partial rotary (rope.dimension_count), derives head_dim "
                      "from hidden/heads and builds a tokenizer with Phi-3's fixed special tokens, so a pruned export "
                      "would not read back as itself")
    if family not in ARCH:
        raise _refuse(f"model_type '{family}' is not written as GGUF here (supported: {', '.join(ARCH)}): transformers "
                      f"{transformers.__version__}, which the tests read every GGUF back with, cannot read it")
    rope = getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise _refuse(f"rope_scaling {rope} is not written (transformers' GGUF reader drops it)")
    if ARCH[family] == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise _refuse("Llama attention/MLP biases are not read back by transformers' GGUF reader")
    window = getattr(config, "sliding_window", None)
    if family == "mistral" and window is not None and window < config.max_position_embeddings:
        raise _refuse(f"Mistral's sliding_window={window} < max_position_embeddings="
                      f"{config.max_position_embeddings}: GGUF's llama architecture attends over the whole context")
    if family == "qwen2":
        if getattr(config, "use_sliding_window", False):
            raise _refuse("Qwen2 use_sliding_window=true is not carried by GGUF's qwen2 architecture")
        if head_dim_of(config) * config.num_attention_heads != config.hidden_size:
            raise _refuse(f"Qwen2 head_dim {head_dim_of(config)} != hidden_size/num_attention_heads "
                          f"({config.hidden_size}/{config.num_attention_heads}): transformers' GGUF reader derives "
                          f"head_dim from those")
    tokenizer_spec(tokenizer, config.vocab_size)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qtype(shape, dtype: str):
    """The GGML type of a tensor: 1-D tensors (norms, biases) stay f32; q8_0 rows that do not split into 32-value
    blocks are f16 (as llama.cpp's converter does)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q  # optional: the gguf extra

    if len(shape) == 1 or dtype == "f32":
        return Q.F32
    if dtype == "q8_0" and shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]


def _encode(a: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q, quants  # optional: the gguf extra

    if qtype == Q.F32:
        return a.astype(np.float32)
    if qtype == Q.F16:
        return a.astype(np.float16)
    return quants.quantize(a.astype(np.float32), qtype)  # bytes (uint8) of bf16 / q8_0 blocks


def write_gguf(hf_dir: str, out_file: str, dtype: str = "f16", tokenizer=None) -> str:
    """Write the HF model folder `hf_dir` (safetensors, config, tokenizer) as one GGUF file."""
    import gguf  # optional: the gguf extra
    from safetensors import safe_open  # heavy: safetensors
    from transformers import AutoConfig, AutoTokenizer  # heavy: transformers

    config = AutoConfig.from_pretrained(hf_dir)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(hf_dir)
    check_gguf(config, tokenizer, dtype)
    tok = tokenizer_spec(tokenizer, config.vocab_size)
    arch, hd = ARCH[config.model_type], head_dim_of(config)
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}

    w = gguf.GGUFWriter(out_file, arch)
    w.add_name(f"llmshearing-{arch}")  # transformers reads a llama file whose name says 'mistral' as Mistral,
    # whose GGUF tokenizer it cannot build (4.53); llama.cpp ignores the name
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(config.vocab_size)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model(tok["model"])
    if tok["model"] == "gpt2":
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if tok["model"] == "llama":
        w.add_token_scores(tok["scores"])
        w.add_add_space_prefix(tok["add_space_prefix"])
    w.add_token_merges(tok["merges"])  # llama.cpp's `llama` model merges by score; transformers reads these
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if tok[key] is not None:
            add(tok[key])
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])

    tensors = []  # (file, HF name, GGUF name, qtype): every tensor's info goes into the header before any data
    for file in safetensors_files(hf_dir):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if config.tie_word_embeddings and name == "lm_head.weight":
                    continue  # llama.cpp and transformers read the head from token_embd when output.weight is absent
                gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if gname is None:
                    raise _refuse(f"tensor '{name}' has no GGUF name in architecture {arch}")
                shape = tuple(f.get_slice(name).get_shape())
                qtype = _qtype(shape, dtype)
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                nbytes = int(np.prod(shape)) // block * size
                byte_shape = shape if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
                    else gguf.quant_shape_to_byte_shape(shape, qtype)
                np_dtype = {gguf.GGMLQuantizationType.F32: np.float32,
                            gguf.GGMLQuantizationType.F16: np.float16}.get(qtype, np.uint8)
                w.add_tensor_info(gname, byte_shape, np.dtype(np_dtype), nbytes,
                                  raw_dtype=None if np_dtype is not np.uint8 else qtype)
                tensors.append((file, name, gname, qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for file, name, gname, qtype in tensors:
        with safe_open(file, framework="pt") as f:
            a = f.get_tensor(name).to(torch.float32).numpy()
        part = gname.split(".")[-2] if gname.count(".") >= 2 else ""
        if arch == "llama" and part in heads:
            a = _permute(a, heads[part])
        w.write_tensor_data(_encode(a, qtype))
    w.close()
    return out_file


def convert(hf_dir: str, dtype: str = "f16", out_file: str | None = None, overwrite: bool = False) -> str:
    """`llmshearing convert <hf folder> --to gguf`: `<hf folder>/model.gguf` (or `out_file`), atomically."""
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ConfigError(f"'{hf_dir}' is not a Hugging Face model folder (no config.json)")
    out_file = out_file or os.path.join(hf_dir, "model.gguf")
    writable_output(out_file, "--out", folder=False)
    if os.path.exists(out_file) and not overwrite:
        raise ConfigError(f"--out: '{out_file}' exists; pass --overwrite to replace it")
    tmp = os.path.join(os.path.dirname(os.path.abspath(out_file)), f".{os.path.basename(out_file)}.tmp-{os.getpid()}")
    try:  # a temporary file beside it, renamed into place when complete
        write_gguf(hf_dir, tmp, dtype)
        os.replace(tmp, out_file)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        full = disk_full(e, out_file)
        if full is None:
            raise
        raise full from None
    return out_file
