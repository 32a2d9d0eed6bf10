"""Input and output checks shared by every entry point, run before any work starts.

Each check raises ConfigError naming the key (or flag) and the path at fault, so that bad input ends in one
clear line instead of a traceback, a hang or a silently wrong result. One home for: regular files of the
right kind (sniffed, not trusted by name), yaml/json files, outputs that can be written, model folders whose
config and weights agree, Composer checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
import tempfile

from llmshearing.errors import ConfigError

# The first bytes of the formats a user may hand us under any name.
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}


def regular_file(path: str, key: str) -> str:
    """`path` exists and is a regular file (not a folder, FIFO, socket or device, which would block or fail)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigError(f"{key}: '{path}' does not exist") from None
    except OSError as e:
        raise ConfigError(f"{key}: cannot read '{path}': {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
        raise ConfigError(f"{key}: '{path}' is {kind}; give a file")
    return path


def sniff(path: str) -> str:
    """The kind of a regular file from its content: gzip | bz2 | xz | zstd | zip | binary | text | empty."""
    with open(path, "rb") as f:
        head = f.read(8192)
    if not head:
        return "empty"
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    return "binary" if b"\x00" in head else "text"


def load_structured(path: str, key: str):
    """A yaml or json file (json is yaml), parsed; a parse error names the key, the file and the line."""
    import yaml

    regular_file(path, key)
    if sniff(path) not in ("text", "empty"):
        raise ConfigError(f"{key}: '{path}' is not a text file ({sniff(path)} content); expected yaml or json")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{key}: '{path}' is not UTF-8 text (byte {e.start}); expected yaml or json") from None
    if path.endswith(".json"):  # json's own parser: yaml 1.1 would read 1e-05 as a string
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}: '{path}' is not valid json at line {e.lineno}, column {e.colno}: "
                              f"{e.msg}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{key}: '{path}' is not valid yaml/json{where}: {getattr(e, 'problem', e)}") from None


def check_finite(value, key: str) -> None:
    """No NaN or infinity anywhere in a (nested) config value."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"'{key}' must be a finite number, got {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, f"{key}[{i}]")


# ---------------------------------------------------------------------------------------------- outputs

def writable_output(path: str, key: str, folder: bool = True) -> str:
    """`path` can be created (or replaced) as a folder / file: every existing part of it is a folder, the path
    itself, if it exists, is of the right kind, and a file can really be written in the nearest existing folder
    (a probe file, created and removed: catches read-only mounts and full quotas, and works for root)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise ConfigError(f"{key}: '{path}' exists and is a {'file' if folder else 'folder'}; give a "
                          f"{'folder' if folder else 'file'} path")
    parent = path if folder and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{key}: '{path}' cannot be created: '{parent}' is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".llmshearing-write-probe-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write in '{parent}': {e.strerror}") from None
    return path


def inside(path: str, folder: str) -> bool:
    """`path` is `folder` or lies under it (after resolving links)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# ------------------------------------------------------------------------------------------ model folders

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
    from llmshearing.model import layouts
    from llmshearing.model.hf import safetensors_files
    from llmshearing.pruning.export import decoder_shapes

    files = safetensors_files(path)
    if files is None:
        if not any(os.path.exists(os.path.join(path, n)) for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise ConfigError(f"{key}: '{path}' has a config.json but no weights (model.safetensors or "
                              f"pytorch_model.bin)")
        return  # .bin checkpoints are checked by transformers' loader
    expected = layouts.hf_shapes(config, decoder_shapes(config))  # in the family's layout (Phi-3, NeoX: fused)
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
    from transformers import AutoConfig

    from llmshearing.model.hf import check_source_config

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
    from transformers import AutoConfig

    from llmshearing.model.hf import SUPPORTED_MODEL_TYPES, check_source_config

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


def check_positions(shards_root: str, config, model: str) -> None:
    """The shards' sequences fit the model's positions (longer ones would run it on positions it never had)."""
    from llmshearing.data.layout import read_manifest

    seq_len, limit = int(read_manifest(shards_root).get("seq_len", 0)), getattr(config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise ConfigError(f"the shards in '{shards_root}' hold sequences of seq_len {seq_len} but the model '{model}' "
                          f"has max_position_embeddings {limit}; rebuild the shards with --seq-len {limit} or less")


# ------------------------------------------------------------------------------------------- checkpoints

def checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a whole Composer checkpoint, or None: a sharded folder must hold every rank's file, a
    checkpoint file must be a torch zip archive whose directory (written last, at its end) reads, which a file
    overwritten, truncated or of another format does not."""
    import zipfile

    from llmshearing.compat import is_sharded_checkpoint, sharded_checkpoint_problem

    if os.path.isdir(path):
        if not is_sharded_checkpoint(path):
            return "a folder but not a sharded checkpoint (no .metadata)"
        problem = sharded_checkpoint_problem(path)
        return f"an incomplete sharded checkpoint: {problem}" if problem else None
    if not os.path.isfile(path):
        return "not a regular file"
    kind = sniff(path)
    if kind != "zip":
        return f"not a Composer checkpoint (torch checkpoints are zip archives; this is {kind} content)"
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "truncated or corrupt (its zip directory does not read)"
    return None


def check_checkpoint(path: str, key: str) -> str:
    """A Composer checkpoint: a sharded checkpoint folder, or a whole torch zip file (a text file, a truncated
    copy or another format fails here with its name, not in torch.load's traceback)."""
    real = os.path.realpath(path)
    if not os.path.exists(real):
        raise ConfigError(f"{key}: checkpoint '{path}' does not exist")
    if not os.path.isdir(real):
        regular_file(real, key)
    problem = checkpoint_problem(real)
    if problem:
        hint = ("give a checkpoint file such as <save_folder>/latest-rank0.pt" if problem.startswith("a folder")
                else "use an earlier checkpoint")
        raise ConfigError(f"{key}: checkpoint '{path}' is {problem}; {hint}")
    return real
