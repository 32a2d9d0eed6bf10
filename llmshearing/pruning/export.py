"""From a masked model to a dense model of the target shape: keep, fold, slice, save.

Test-time masks keep exactly the target number of top-scoring units in every structure, so the
result is a uniform architecture. Gate values of kept units are folded into the weights that
consume them, so the sliced model computes what the masked model computes in eval mode.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field, replace

import torch
from transformers import PretrainedConfig

from llmshearing.checks import writable_output
from llmshearing.errors import ConfigError
from llmshearing.model.hf import ARCHITECTURES, head_dim_of, is_gemma, kv_heads_of
from llmshearing.model import layouts
from llmshearing.pruning import card
from llmshearing.pruning.shapes import target_config
from llmshearing.io import atomic_directory, disk_full
from llmshearing.pruning.gguf_export import check_gguf, write_gguf
from llmshearing.model.decoder import DecoderLM, Masks
from llmshearing.pruning.masks import L0Module


def kept_units(l0: L0Module) -> dict:
    """Indices (in source numbering) of everything the pruned model keeps."""
    src = l0.source
    L, KV, R = src.num_hidden_layers, src.num_key_value_heads, src.heads_per_group
    keep = {name: mask.keep_index() for name, mask in l0.masks.items()}
    device = l0.lambdas.device  # a level without a mask keeps every unit: indices beside the masks' own
    layers = keep["layer"].tolist() if "layer" in keep else list(range(L))
    kv = keep["kv_head"] if "kv_head" in keep else torch.arange(KV, device=device).expand(L, KV)
    in_group = keep["head"] if "head" in keep else torch.arange(R, device=device).expand(L, KV, R)
    heads = [[g * R + r for g in kv[l].tolist() for r in in_group[l, g].tolist()] for l in range(L)]
    return {
        "source_shape": src.as_dict(),
        "target_shape": l0.target.as_dict(),
        "layers": layers,
        "hidden": keep["hidden"].tolist() if "hidden" in keep else list(range(src.hidden_size)),
        "kv_heads": [kv[l].tolist() for l in layers],
        "heads": [heads[l] for l in layers],
        "intermediate": [
            (keep["intermediate"][l].tolist() if "intermediate" in keep else list(range(src.intermediate_size)))
            for l in layers
        ],
    }


def _rows(weight_or_bias: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return weight_or_bias.index_select(0, index)


def head_rows(heads: list[int], head_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Rows of q/k/v (columns of o_proj) that belong to the given heads (on `device`: that of the weights they
    select from; index_select on a GPU refuses a CPU index)."""
    return (torch.tensor(heads, device=device)[:, None] * head_dim + torch.arange(head_dim, device=device)).flatten()


def all_units(config) -> dict:
    """`kept_units` of an unpruned model: everything (plain training exports through the same code)."""
    L, H, KV = config.num_hidden_layers, config.num_attention_heads, kv_heads_of(config)
    return {"layers": list(range(L)), "hidden": list(range(config.hidden_size)), "kv_heads": [list(range(KV))] * L,
            "heads": [list(range(H))] * L, "intermediate": [list(range(config.intermediate_size))] * L}


@torch.no_grad()
def export_selection(l0: L0Module | None, config) -> tuple[Masks, dict, PretrainedConfig]:
    """(test-time masks, kept units, target config): what `dense_tensors` folds and slices."""
    if l0 is None:
        return Masks(), all_units(config), config
    with l0.target_masks():
        masks = l0()
    kept = kept_units(l0)
    target = target_config(config, l0.target)
    if is_gemma(config):  # the kept layers' own sliding / full attention types, in their new order
        target.layer_types = [config.layer_types[i] for i in kept["layers"]]
    return masks, kept, target


@contextlib.contextmanager
def _whole(layer):
    yield


@torch.no_grad()
def dense_tensors(get, config, masks: Masks, kept: dict, scope=_whole, device=None):
    """The dense model's tensors (HF names, HF order; no `lm_head.weight` when tied), one group at a time: the
    embedding, each kept layer, the final norm and head. `get(name)` returns a tensor of the source (names of a
    DecoderLM) and is called once per tensor, inside `scope(layer)` (layer None: embedding, norm, head), so a
    reader can hand out one layer at a time (FSDP gathers it) and the source needs never be whole in memory:
    what is alive is what was yielded plus one source tensor and its slices. Indices and gates are made on
    `device`, that of the source tensors (index_select on a GPU refuses a CPU index; the masks live there too)."""
    hd = head_dim_of(config)
    d_idx = torch.tensor(kept["hidden"], device=device)
    z_hidden = masks.hidden[d_idx] if masks.hidden is not None else torch.ones(len(d_idx), device=device)
    gemma = is_gemma(config)
    # Gemma scales the embedding by sqrt(hidden_size): the dense model's by sqrt(kept dims), the masked model's by the
    # source's; the ratio goes into the embedding with the hidden gate.
    embed_scale = z_hidden * (math.sqrt(config.hidden_size) / math.sqrt(len(d_idx)) if gemma else 1.0)
    with scope(None):
        embed = get("model.embed_tokens.weight")[:, d_idx] * embed_scale
    yield "model.embed_tokens.weight", embed
    del embed
    for new, old in enumerate(kept["layers"]):
        with scope(old):
            layer = _dense_gemma_layer if gemma else _dense_layer
            yield from layer(get, masks, kept, new, old, hd, d_idx, z_hidden).items()
    with scope(None):
        has = _names_probe(get)
        for name in ("model.norm.weight", "model.norm.bias"):  # the bias: GPT-NeoX's LayerNorm
            if not has(name):
                continue
            final_norm = get(name)[d_idx]
            if masks.norm_gate is not None and name.endswith("weight"):  # hidden_mask: original (RMSNorm only)
                final_norm = final_norm * z_hidden
            if config.tie_word_embeddings and gemma:  # (1 + weight) / scale: a Gemma norm multiplies by 1 + weight
                final_norm = torch.where(embed_scale > 0, (1 + final_norm) / embed_scale.clamp(min=1e-30) - 1,
                                         -torch.ones_like(final_norm))
            elif config.tie_word_embeddings:
                # The tied head now reads the gate-scaled embedding; undo that scale in the final norm.
                final_norm = torch.where(z_hidden > 0, final_norm / z_hidden.clamp(min=1e-30),
                                         torch.zeros_like(final_norm))
            yield name, final_norm
        if not config.tie_word_embeddings:
            yield "lm_head.weight", get("lm_head.weight")[:, d_idx]


def _dense_layer(get, masks: Masks, kept: dict, new: int, old: int, hd: int, d_idx, z_hidden) -> dict:
    """Layer `old` of the source as layer `new` of the dense model: kept rows/columns, gates folded in."""
    p, q = f"model.layers.{old}.", f"model.layers.{new}."
    device = d_idx.device
    gate = float(masks.layer[old]) if masks.layer is not None else 1.0
    write_scale = (z_hidden * gate)[:, None]  # residual writes: layer gate x hidden gate
    head_idx = head_rows(kept["heads"][new], hd, device)
    kv_idx = head_rows(kept["kv_heads"][new], hd, device)
    heads = torch.tensor(kept["heads"][new], device=device)
    head_gate = masks.head[old][heads] if masks.head is not None else torch.ones(len(heads), device=device)
    i_idx = torch.tensor(kept["intermediate"][new], device=device)
    i_gate = masks.intermediate[old][i_idx] if masks.intermediate is not None else torch.ones(len(i_idx), device=device)
    has = _names_probe(get)
    out = {}
    norm_scale = z_hidden if masks.norm_gate is not None else 1.0  # hidden_mask: original
    for norm in ("input_layernorm", "post_attention_layernorm"):
        for kind in ("weight", "bias"):  # a bias: GPT-NeoX's LayerNorm (zero in pruned dims of the masked model)
            if kind == "weight" or has(p + f"{norm}.bias"):
                out[q + f"{norm}.{kind}"] = get(p + f"{norm}.{kind}")[d_idx] * (norm_scale if kind == "weight" else 1.0)
    for norm in ("q_norm", "k_norm"):  # Qwen3: over head_dim (never pruned), one weight for all heads
        if has(p + f"self_attn.{norm}.weight"):
            out[q + f"self_attn.{norm}.weight"] = get(p + f"self_attn.{norm}.weight")
    for name, idx in (("q_proj", head_idx), ("k_proj", kv_idx), ("v_proj", kv_idx)):
        out[q + f"self_attn.{name}.weight"] = _rows(get(p + f"self_attn.{name}.weight"), idx)[:, d_idx]
        if has(p + f"self_attn.{name}.bias"):
            out[q + f"self_attn.{name}.bias"] = _rows(get(p + f"self_attn.{name}.bias"), idx)
    o = get(p + "self_attn.o_proj.weight")[:, head_idx] * head_gate.repeat_interleave(hd)[None, :]
    out[q + "self_attn.o_proj.weight"] = _rows(o, d_idx) * write_scale
    del o
    if has(p + "self_attn.o_proj.bias"):
        out[q + "self_attn.o_proj.bias"] = _rows(get(p + "self_attn.o_proj.bias"), d_idx) * write_scale[:, 0]
    for name in ("gate_proj", "up_proj"):
        if not has(p + f"mlp.{name}.weight"):
            continue  # GPT-NeoX's MLP is not gated
        out[q + f"mlp.{name}.weight"] = _rows(get(p + f"mlp.{name}.weight"), i_idx)[:, d_idx]
        if has(p + f"mlp.{name}.bias"):
            out[q + f"mlp.{name}.bias"] = _rows(get(p + f"mlp.{name}.bias"), i_idx)
    down = get(p + "mlp.down_proj.weight")[:, i_idx] * i_gate[None, :]
    out[q + "mlp.down_proj.weight"] = _rows(down, d_idx) * write_scale
    del down
    if has(p + "mlp.down_proj.bias"):
        out[q + "mlp.down_proj.bias"] = _rows(get(p + "mlp.down_proj.bias"), d_idx) * write_scale[:, 0]
    return out


def _dense_gemma_layer(get, masks: Masks, kept: dict, new: int, old: int, hd: int, d_idx, z_hidden) -> dict:
    """A Gemma layer (see DecoderLayer._gemma_forward): sliced as `_dense_layer` slices, but o_proj / down_proj get
    no write gates (a post-norm follows them); the write gates (layer gate x hidden gate) are folded into the
    post-norms instead: 1 + w' = (1 + w) * gate. Gemma has no biases."""
    out = _dense_layer(get, replace(masks, layer=None), kept, new, old, hd, d_idx, torch.ones_like(z_hidden))
    p, q = f"model.layers.{old}.", f"model.layers.{new}."
    gate = float(masks.layer[old]) if masks.layer is not None else 1.0
    for norm in ("pre_feedforward_layernorm", "post_attention_layernorm", "post_feedforward_layernorm"):
        out[q + norm + ".weight"] = get(p + norm + ".weight")[d_idx]
    for norm in ("post_attention_layernorm", "post_feedforward_layernorm"):
        out[q + norm + ".weight"] = (1 + out[q + norm + ".weight"]) * (z_hidden * gate) - 1
    return out


def _names_probe(get):
    """Whether the source has a tensor (biases are optional): `get.names` when the reader lists its names."""
    names = getattr(get, "names", None)
    if names is not None:
        return lambda name: name in names
    def has(name):
        try:
            get(name)
        except KeyError:
            return False
        return True
    return has


class TensorGetter:
    """`get(name)` over a mapping of DecoderLM-named tensors with their names listed (`names`)."""

    def __init__(self, read, names):
        self.read, self.names = read, set(names)

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.read(name)


def state_getter(state: dict) -> TensorGetter:
    return TensorGetter(state.__getitem__, state)


@torch.no_grad()
def finalize(lm: DecoderLM, l0: L0Module) -> tuple[DecoderLM, dict]:
    """A dense DecoderLM of the target shape equal (in eval) to `lm` under `l0`'s test-time masks, on `lm`'s
    device: indices and gates are made beside the weights they select and scale, and the pruned model holds the
    sliced tensors themselves (fp32), not a randomly initialised copy they are loaded into."""
    masks, kept, config = export_selection(l0, lm.config)
    device = next(lm.parameters()).device
    out = dict(dense_tensors(state_getter(lm.state_dict()), lm.config, masks, kept, device=device))
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    with torch.device("meta"):
        pruned = DecoderLM(config)
    pruned.load_state_dict({k: v.float().contiguous() for k, v in out.items()}, strict=True, assign=True)
    pruned.tie_weights()
    return pruned.eval(), kept


EXPORT_MARKER = "llmshearing_export.json"  # written into every export: the only kind of folder an export replaces


def check_export_dir(path: str, key: str, overwrite: bool = False) -> None:
    """An export may create `path` or replace an earlier export (recognised by its EXPORT_MARKER, and only
    with `overwrite`); never a folder it did not create, such as a run folder, a source model or your notes."""
    writable_output(path, key)
    if not os.path.exists(path):
        return
    if not os.path.isfile(os.path.join(path, EXPORT_MARKER)):
        what = "a run folder" if os.path.exists(os.path.join(path, "run_config.yaml")) else "not an llmshearing export"
        raise ConfigError(f"{key}: '{path}' exists and is {what} (no {EXPORT_MARKER}); an export never replaces a "
                          f"folder it did not write: give a new folder, or remove this one yourself")
    if not overwrite:
        raise ConfigError(f"{key}: '{path}' holds an earlier export; pass --overwrite to replace it")


DEFAULT_MAX_SHARD_SIZE = "5GB"  # Hugging Face's default for save_pretrained / push_to_hub
PRECISION_DTYPES = {"fp32": torch.float32, "amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}


@dataclass
class ExportOptions:
    """How an export is written: weights dtype (None: the caller's default, the run's precision for a run or a
    checkpoint, the model's dtype for `save_hf`), safetensors shard size, and a GGUF file beside the HF files
    (`gguf_dtype` None: none)."""

    dtype: torch.dtype | None = None
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE
    gguf_dtype: str | None = None
    card: dict = field(default_factory=dict)  # model card facts (llmshearing.pruning.card)


def parse_size(size: str | int, key: str = "--max-shard-size") -> int:
    """Bytes of '5GB', '500MB', '2GiB' or an int (decimal units, as Hugging Face counts them)."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ConfigError(f"{key} '{size}': give a size like 5GB, 500MB or 2GiB")
        unit = (m.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        n = int(float(m.group(1)) * scale)
    if n <= 0:
        raise ConfigError(f"{key} must be positive, got '{size}'")
    return n


def export_config(config: PretrainedConfig, dtype: torch.dtype) -> dict:
    """config.json of an export: only the fields the family's stock transformers config knows (so any runtime that
    reads that family reads it), plus `head_dim` always (pruning may make it differ from hidden/heads; Qwen2's
    attention reads it although Qwen2Config does not list it), `torch_dtype` set, the stock architecture name."""
    from transformers import AutoConfig  # heavy: transformers

    known = set(AutoConfig.for_model(config.model_type).to_dict()) | {"head_dim"}
    # The non-default values (as save_pretrained writes them); Qwen2's per-layer `layer_types` describes the source's
    # layers, and the stock class rebuilds it from the pruned count.
    # Gemma's are the kept layers' (export_selection) and are written: a pruned model's need not alternate.
    out = {k: v for k, v in config.to_diff_dict().items() if k in known and not k.startswith("_")
           and (k != "layer_types" or is_gemma(config))}
    if is_gemma(config):  # always, also where it equals the stock alternation (to_diff_dict would leave it out)
        out["layer_types"] = list(config.layer_types)
    out.update(head_dim=head_dim_of(config), torch_dtype=str(dtype).removeprefix("torch."),
               architectures=[ARCHITECTURES[config.model_type]], model_type=config.model_type)
    return dict(sorted(out.items()))


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def decoder_shapes(config: PretrainedConfig) -> dict[str, tuple]:
    """name -> shape of every tensor a DecoderLM of `config` holds (HF names and order, the tied head included),
    from a model on the meta device: nothing allocated."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in DecoderLM(config).state_dict().items()}


def export_shapes(config: PretrainedConfig) -> list[tuple[str, tuple]]:
    """(name, shape) of every tensor an export of `config` holds, in Hugging Face order (no tied head), in the
    family's own layout (Phi-3's and GPT-NeoX's fused projections and names: model/layouts.py)."""
    tied = config.tie_word_embeddings
    shapes = layouts.hf_shapes(config, decoder_shapes(config))
    return [(k, shape) for k, shape in shapes.items() if not (tied and k == layouts.head_name(config))]


def shard_layout(shapes, dtype: torch.dtype, max_shard_size: str | int) -> list[tuple[str, list]]:
    """Hugging Face's sharding: tensors in order, a new shard when the next would pass `max_shard_size` (a tensor
    larger than that gets a shard of its own); one `model.safetensors` when everything fits."""
    limit, shards, size = parse_size(max_shard_size), [[]], 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return list(zip(names, shards))


class SafetensorsWriter:
    """Streams tensors into safetensors files laid out in advance (`shard_layout`): each file's header is written
    from the shapes, then every tensor's bytes as it arrives, so nothing is held but what a layer hands in out of
    `shapes` order (the safetensors format: 8-byte header length, JSON header with dtype/shape/data_offsets, data)."""

    def __init__(self, folder: str, shapes, dtype: torch.dtype, max_shard_size: str | int):
        self.folder, self.dtype = folder, dtype
        self.shards = shard_layout(shapes, dtype, max_shard_size)
        self.order = [(file, name, shape) for file, tensors in self.shards for name, shape in tensors]
        self.pending, self.next, self.file, self.out = {}, 0, None, None

    def _open(self, file: str) -> None:
        if self.out is not None:
            self.out.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in dict(self.shards)[file]:
            nbytes = math.prod(shape) * self.dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
        self.file, self.out = file, open(os.path.join(self.folder, file), "wb")
        self.out.write(len(text).to_bytes(8, "little") + text)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor
        while self.next < len(self.order) and self.order[self.next][1] in self.pending:
            file, name, shape = self.order[self.next]
            t = self.pending.pop(name).detach().to("cpu", self.dtype).contiguous()
            if tuple(t.shape) != shape:
                raise RuntimeError(f"export: '{name}' has shape {tuple(t.shape)}, its config says {shape}")
            if file != self.file:
                self._open(file)
            self.out.write(t.reshape(-1).view(torch.uint8).numpy().data)
            self.next += 1

    def close(self) -> None:
        if self.pending or self.next < len(self.order):
            missing = [name for _, name, _ in self.order[self.next:]]
            raise RuntimeError(f"export: tensors {missing[:3]} never came (or {list(self.pending)[:3]} are extra)")
        self.out.close()
        if len(self.shards) > 1:
            total = sum(math.prod(shape) * self.dtype.itemsize for _, _, shape in self.order)
            weight_map = {name: file for file, name, _ in self.order}
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                          indent=2)


def write_export(out_dir: str, config: PretrainedConfig, tensors, tokenizer=None, kept: dict | None = None,
                 options: ExportOptions | None = None, overwrite: bool = False, source_dir: str | None = None) -> str:
    """Write a Hugging Face model folder atomically: weights (streamed from `tensors`), config.json,
    generation_config.json (the source's, when it has one), the tokenizer, `pruning.json`, a README.md model card,
    and with `gguf_dtype` a `model.gguf`. A full disk or a write error leaves nothing and is a one-line error."""
    from safetensors import SafetensorError  # heavy: safetensors

    options = options or ExportOptions()
    dtype = options.dtype
    if dtype not in SAFETENSORS_DTYPES:
        raise ConfigError(f"export dtype {dtype}: choose float32, bfloat16 or float16")
    check_export_dir(out_dir, "export", overwrite)  # again at the moment of writing: a folder made meanwhile
    if options.gguf_dtype is not None:
        check_gguf(config, tokenizer, options.gguf_dtype)  # refuse before anything is written
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            shapes = export_shapes(config)
            writer = SafetensorsWriter(tmp, shapes, dtype, options.max_shard_size)
            for name, tensor in layouts.to_hf(config, tensors):  # Phi-3 / GPT-NeoX: fused back, renamed
                writer.add(name, tensor)
                del tensor
            writer.close()
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(export_config(config, dtype), f, indent=2)
            generation = source_dir and os.path.join(source_dir, "generation_config.json")
            if generation and os.path.isfile(generation):
                shutil.copyfile(generation, os.path.join(tmp, "generation_config.json"))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if kept is not None:
                with open(os.path.join(tmp, "pruning.json"), "w") as f:
                    json.dump(kept, f)
            params = sum(math.prod(shape) for _, shape in shapes)
            if options.gguf_dtype is not None:
                write_gguf(tmp, os.path.join(tmp, "model.gguf"), options.gguf_dtype)
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(card.model_card(config, params, dtype, kept, options.card, source_dir,
                                        gguf=options.gguf_dtype))
            with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:
                json.dump({"written_by": "llmshearing", "pruned": kept is not None, "dtype": str(dtype),
                           "stages": card.stages(options.card, source_dir)}, f)
    except (SafetensorError, OSError) as e:
        full = disk_full(e, out_dir)
        if full is None:
            raise
        raise full from None
    return out_dir


def save_hf(lm: DecoderLM, out_dir: str, tokenizer=None, kept: dict | None = None,
            dtype: torch.dtype | None = None, overwrite: bool = False, options: ExportOptions | None = None,
            source_dir: str | None = None) -> str:
    """Write the dense DecoderLM `lm` as a standard HF checkpoint (see `write_export`)."""
    options = replace(options or ExportOptions(), dtype=dtype or (options and options.dtype)
                      or next(lm.parameters()).dtype)
    tied = lm.config.tie_word_embeddings
    tensors = ((k, v) for k, v in lm.state_dict().items() if not (tied and k == "lm_head.weight"))
    return write_export(out_dir, lm.config, tensors, tokenizer, kept, options, overwrite, source_dir)


def _fsdp_scope(root):
    """(getter, scope) over an FSDP-wrapped DecoderLM: `scope(layer)` gathers that decoder layer (None: the root's own
    embedding, norm and head) on every rank with FSDP's summon_full_params and the getter reads it there, so no rank
    ever holds more than one full layer beside its shard (all ranks must run the same scopes in the same order)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # heavy: torch

    current: dict = {}
    strip = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

    @contextlib.contextmanager
    def scope(layer):
        unit = root if layer is None else root.model.layers[layer]
        prefix = "" if layer is None else f"model.layers.{layer}."
        with FSDP.summon_full_params(unit, recurse=layer is not None, writeback=False):
            for name, param in unit.named_parameters():
                for s in strip:
                    name = name.replace(s, "")
                if layer is None and name.startswith("model.layers."):
                    continue  # other units' (still sharded) parameters
                current[prefix + name] = param.detach()
            try:
                yield
            finally:
                current.clear()

    return TensorGetter(lambda name: current[name], decoder_shapes(root.config)), scope


def check_fits(reader, config, l0) -> None:
    """Every tensor the export slices is in the checkpoint with the shape `config` (and the masks) give it: the
    indices come from the config, so a checkpoint of another model (a wrong --config or --model-path) would
    otherwise be sliced into a valid-looking model of garbage."""
    expected = {"model." + k: shape for k, shape in decoder_shapes(config).items()}
    if l0 is not None:
        expected.update({"l0." + k: tuple(v.shape) for k, v in l0.state_dict().items()})
    stored = set(reader.names)
    for name, shape in expected.items():
        got = reader.shape(name) if name in stored else None
        if got != shape:
            raise ConfigError(f"checkpoint '{reader.path}' does not fit the model of its run config ({name}: "
                              f"{'missing' if got is None else f'{got} stored'}, {shape} expected from "
                              f"'{config._name_or_path or 'the config'}'); pass the run's own --config / --model-path")


