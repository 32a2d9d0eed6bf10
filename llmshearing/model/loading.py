"""Hugging Face model folders in: checked (config, weight names, shapes and dtypes, from the headers only) and
loaded into a DecoderLM. Above `model.decoder` and `model.hf` (the families' rules), which both stay free of it."""
from __future__ import annotations

import json
import os
import struct

import torch
from transformers import AutoConfig, PretrainedConfig

from llmshearing.checks import load_structured, regular_file, sniff
from llmshearing.errors import ConfigError
from llmshearing.model import layouts
from llmshearing.model.decoder import DecoderLM
from llmshearing.model.hf import SUPPORTED_MODEL_TYPES, check_source_config, load_hf_config


def empty_model(config: PretrainedConfig, attn_impl: str = "auto", dtype: torch.dtype = torch.float32):
    """A DecoderLM with allocated but unwritten parameters (no random init): the pages stay unresident until
    something is loaded into them, so a rank that receives its weights by broadcast holds no extra copy."""
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
    first, from the headers (`check_weights_match`, called by `from_pretrained`)."""
    from safetensors import safe_open  # heavy: safetensors

    params = lm.state_dict(keep_vars=True)
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                with torch.no_grad():
                    for ours, tensor in layouts.from_hf(lm.config, name, f.get_tensor(name)):  # Phi-3/NeoX: split
                        params[ours].copy_(tensor)


def from_pretrained(path: str, gguf_file: str | None = None, attn_impl: str = "auto",
                    dtype: torch.dtype = torch.float32, config=None):
    """The DecoderLM of any supported checkpoint (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3,
    GPT-NeoX): safetensors are read tensor by tensor straight into the model (Phi-3's and GPT-NeoX's fused tensors
    split, model/layouts.py); other formats (GGUF, .bin) go through transformers' loader. `config`: the folder's
    config when the caller has read it already (a run reads it once: TrainConfig.source_config)."""
    config = config or load_hf_config(path, gguf_file)  # refuses unsupported families before the weights are read
    files = None if gguf_file else safetensors_files(path)
    if files:
        check_weights_match(path, config, "model.path")  # a missing, extra or misshapen tensor, by name
        lm = empty_model(config, attn_impl, dtype)
        load_safetensors_into(lm, files)
        return lm.eval()
    from transformers import AutoModelForCausalLM  # heavy: transformers

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, **kwargs)
    lm = empty_model(hf.config, attn_impl, dtype)
    lm.load_state_dict(layouts.decoder_state(hf.config, hf.state_dict()), strict=True)
    return lm.eval()


def _config_json(path: str, key: str) -> None:
    """The folder's config.json exists and is a json object (transformers' own error would not name it)."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise ConfigError(f"{key}: '{path}' is not an HF model folder: no config.json")
    regular_file(file, key)
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: '{file}' is not valid json: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: '{file}' is not a json object")


def safetensors_header(file: str, key: str) -> dict:
    """name -> (dtype, shape) of a safetensors file, after checking that the file is whole: the header parses
    and the file is as long as its last tensor says (a truncated download or copy fails here, by name)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        header = f.read(n) if 0 < n <= min(size - 8, 100_000_000) else b""
    try:
        meta = json.loads(header)
        assert isinstance(meta, dict)
    except (ValueError, AssertionError):
        raise ConfigError(f"{key}: '{file}' is not a safetensors file (its header does not parse); "
                          f"re-download or re-export the weights") from None
    meta.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in meta.values()), default=0)
    if size < 8 + n + end:
        raise ConfigError(f"{key}: '{file}' is truncated ({size:,} bytes, its header needs {8 + n + end:,}); "
                          f"re-download or re-export the weights")
    return {name: (t["dtype"], tuple(t["shape"])) for name, t in meta.items()}


FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


def check_weights_match(path: str, config, key: str) -> None:
    """The safetensors weights of `path` hold exactly the tensors, shapes and float dtypes a model of `config`
    has: a config.json that disagrees with its weights (a layer more or less, another hidden size) is an error
    naming the tensor, not a silently dropped layer or a shape traceback deep in loading."""
    files = safetensors_files(path)
    if files is None:
        if not any(os.path.exists(os.path.join(path, n)) for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise ConfigError(f"{key}: '{path}' has a config.json but no weights (model.safetensors or "
                              f"pytorch_model.bin)")
        return  # .bin checkpoints are checked by transformers' loader
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in DecoderLM(config).state_dict().items()}
    expected = layouts.hf_shapes(config, shapes)  # in the family's layout (Phi-3, GPT-NeoX: fused, renamed)
    seen = set()
    for file in files:
        if not os.path.exists(file):
            raise ConfigError(f"{key}: '{file}' (listed in the weight index) is missing")
        for name, (dtype, shape) in safetensors_header(file, key).items():
            if layouts.ignored(config, name):
                continue
            if name not in expected:
                raise ConfigError(f"{key}: '{file}' holds tensor '{name}', which a model of its config.json does "
                                  f"not have: config.json and weights disagree (e.g. num_hidden_layers)")
            if shape != expected[name]:
                raise ConfigError(f"{key}: tensor '{name}' in '{file}' has shape {shape} but config.json implies "
                                  f"{expected[name]}: config.json and weights disagree")
            if dtype not in FLOAT_DTYPES:
                raise ConfigError(f"{key}: tensor '{name}' in '{file}' is {dtype}, not a float type")
            seen.add(name)
    tied = {layouts.head_name(config)} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - seen - tied)
    if missing:
        raise ConfigError(f"{key}: the weights in '{path}' lack {len(missing)} tensor(s) that its config.json "
                          f"implies, e.g. {missing[:3]}: config.json and weights disagree")


def check_source(path: str, gguf_file: str | None, key: str):
    """The config of a source model given as an HF model folder (weights optional: only the config is read), a
    GGUF file in one, or a config.json file (`llmshearing target`): the checks of `check_model_folder`, and a
    supported family, so that a yaml, a shard folder or a weights file is one line naming it."""
    if os.path.isdir(path):
        return check_model_folder(path, gguf_file, key, weights=False, supported=True)
    if gguf_file:
        raise ConfigError(f"{key}: '{path}' is not a folder; --gguf-file names a file inside the source folder")
    regular_file(path, key)
    raw = load_structured(path, key) if sniff(path) in ("text", "empty") else None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ConfigError(f"{key}: '{path}' is not an HF config.json (a json object with model_type); give the "
                          f"source model's folder or its config.json")
    try:
        config = AutoConfig.for_model(**raw)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a broken config; name the file
        raise ConfigError(f"{key}: cannot read the model config '{path}': {type(e).__name__}: {e}") from None
    try:
        check_source_config(config)
    except ConfigError as e:
        raise ConfigError(f"{key}: '{path}': {e}") from None
    return config


def check_model_folder(path: str, gguf_file: str | None = None, key: str = "model.path", weights: bool = True,
                       supported: bool = False):
    """An HF model folder (or a GGUF file in one) whose config loads, is a supported family (`supported`: else
    other families pass, for callers that check the family themselves), and agrees with its weights (`weights`);
    returns the transformers config. Reads headers only, never the weights."""
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: model '{path}' does not exist or is not a folder; give an HF model folder "
                          f"(config.json + weights) or a .gguf file")
    if gguf_file:
        regular_file(os.path.join(path, gguf_file), f"{key} (gguf_file)")
    else:
        _config_json(path, key)
    try:
        config = AutoConfig.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a broken config; name the folder
        raise ConfigError(f"{key}: cannot read the model config in '{path}': {type(e).__name__}: {e}") from None
    if config.model_type in SUPPORTED_MODEL_TYPES or supported:
        try:
            check_source_config(config)
        except ConfigError as e:
            raise ConfigError(f"{key}: '{path}': {e}") from None
        if not gguf_file and weights:
            check_weights_match(path, config, key)
    return config
