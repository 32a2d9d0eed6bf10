"""From a masked model to a dense model of the target shape: keep, fold, slice, save.

Test-time masks keep exactly the target number of top-scoring units in every structure, so the
result is a uniform architecture. Gate values of kept units are folded into the weights that
consume them, so the sliced model computes what the masked model computes in eval mode.
"""
from __future__ import annotations

import json
import os

import torch
from transformers import AutoModelForCausalLM

from llmshearing.errors import ConfigError
from llmshearing.model.hf import head_dim_of
from llmshearing.pruning.shapes import target_config
from llmshearing.io import atomic_directory
from llmshearing.pruning.masks import L0Module
from llmshearing.model.decoder import DecoderLM
from llmshearing.data.tokenizer import model_tokenizer
from llmshearing.devices import dtype_of
from llmshearing.train.checkpointing import load_checkpoint


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


@torch.no_grad()
def finalize(lm: DecoderLM, l0: L0Module) -> tuple[DecoderLM, dict]:
    """A dense DecoderLM of the target shape equal (in eval) to `lm` under `l0`'s test-time masks, on `lm`'s
    device: indices and gates are made beside the weights they select and scale, and the pruned model holds the
    sliced tensors themselves (fp32), not a randomly initialised copy they are loaded into."""
    with l0.target_masks():
        masks = l0()
    kept = kept_units(l0)
    config = target_config(lm.config, l0.target)
    hd = head_dim_of(lm.config)
    sd = lm.state_dict()
    device = next(lm.parameters()).device
    d_idx = torch.tensor(kept["hidden"], device=device)
    z_hidden = masks.hidden[d_idx] if masks.hidden is not None else torch.ones(len(d_idx), device=device)

    out = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"][:, d_idx] * z_hidden}
    for new, old in enumerate(kept["layers"]):
        p, q = f"model.layers.{old}.", f"model.layers.{new}."
        gate = float(masks.layer[old]) if masks.layer is not None else 1.0
        write_scale = (z_hidden * gate)[:, None]  # residual writes: layer gate x hidden gate
        head_idx = head_rows(kept["heads"][new], hd, device)
        kv_idx = head_rows(kept["kv_heads"][new], hd, device)
        heads = torch.tensor(kept["heads"][new], device=device)
        head_gate = masks.head[old][heads] if masks.head is not None else torch.ones(len(heads), device=device)
        i_idx = torch.tensor(kept["intermediate"][new], device=device)
        i_gate = masks.intermediate[old][i_idx] if masks.intermediate is not None else torch.ones(len(i_idx), device=device)

        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[q + norm + ".weight"] = sd[p + norm + ".weight"][d_idx]
        for norm in ("q_norm", "k_norm"):  # Qwen3: over head_dim (never pruned), one weight for all heads
            if p + f"self_attn.{norm}.weight" in sd:
                out[q + f"self_attn.{norm}.weight"] = sd[p + f"self_attn.{norm}.weight"]
        for name, idx in (("q_proj", head_idx), ("k_proj", kv_idx), ("v_proj", kv_idx)):
            out[q + f"self_attn.{name}.weight"] = _rows(sd[p + f"self_attn.{name}.weight"], idx)[:, d_idx]
            if p + f"self_attn.{name}.bias" in sd:
                out[q + f"self_attn.{name}.bias"] = _rows(sd[p + f"self_attn.{name}.bias"], idx)
        o = sd[p + "self_attn.o_proj.weight"][:, head_idx] * head_gate.repeat_interleave(hd)[None, :]
        out[q + "self_attn.o_proj.weight"] = _rows(o, d_idx) * write_scale
        if p + "self_attn.o_proj.bias" in sd:
            out[q + "self_attn.o_proj.bias"] = _rows(sd[p + "self_attn.o_proj.bias"], d_idx) * write_scale[:, 0]
        for name in ("gate_proj", "up_proj"):
            out[q + f"mlp.{name}.weight"] = _rows(sd[p + f"mlp.{name}.weight"], i_idx)[:, d_idx]
            if p + f"mlp.{name}.bias" in sd:
                out[q + f"mlp.{name}.bias"] = _rows(sd[p + f"mlp.{name}.bias"], i_idx)
        down = sd[p + "mlp.down_proj.weight"][:, i_idx] * i_gate[None, :]
        out[q + "mlp.down_proj.weight"] = _rows(down, d_idx) * write_scale
        if p + "mlp.down_proj.bias" in sd:
            out[q + "mlp.down_proj.bias"] = _rows(sd[p + "mlp.down_proj.bias"], d_idx) * write_scale[:, 0]

    final_norm = sd["model.norm.weight"][d_idx]
    if config.tie_word_embeddings:
        # The tied head now reads the gate-scaled embedding; undo that scale in the final norm.
        final_norm = torch.where(z_hidden > 0, final_norm / z_hidden.clamp(min=1e-30), torch.zeros_like(final_norm))
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    else:
        out["lm_head.weight"] = sd["lm_head.weight"][:, d_idx]
    out["model.norm.weight"] = final_norm

    with torch.device("meta"):
        pruned = DecoderLM(config)
    pruned.load_state_dict({k: v.float().contiguous() for k, v in out.items()}, strict=True, assign=True)
    pruned.tie_weights()
    return pruned.eval(), kept


EXPORT_MARKER = "llmshearing_export.json"  # written into every export: the only kind of folder an export replaces


def check_export_dir(path: str, key: str, overwrite: bool = False) -> None:
    """An export may create `path` or replace an earlier export (recognised by its EXPORT_MARKER, and only
    with `overwrite`); never a folder it did not create, such as a run folder, a source model or your notes."""
    from llmshearing.checks import writable_output

    writable_output(path, key)
    if not os.path.exists(path):
        return
    if not os.path.isfile(os.path.join(path, EXPORT_MARKER)):
        what = "a run folder" if os.path.exists(os.path.join(path, "run_config.yaml")) else "not an llmshearing export"
        raise ConfigError(f"{key}: '{path}' exists and is {what} (no {EXPORT_MARKER}); an export never replaces a "
                          f"folder it did not write: give a new folder, or remove this one yourself")
    if not overwrite:
        raise ConfigError(f"{key}: '{path}' holds an earlier export; pass --overwrite to replace it")


def save_hf(lm: DecoderLM, out_dir: str, tokenizer=None, kept: dict | None = None,
            dtype: torch.dtype | None = None, overwrite: bool = False) -> str:
    """Write `lm` as a standard HF checkpoint (safetensors), the tokenizer and `pruning.json`, atomically."""
    config = lm.config.__class__.from_dict(lm.config.to_dict())
    dtype = dtype or next(lm.parameters()).dtype
    config.torch_dtype = dtype
    hf = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    missing, unexpected = hf.load_state_dict(lm.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"state dict does not fit {type(hf).__name__}: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    check_export_dir(out_dir, "export", overwrite)  # again at the moment of writing: a folder made meanwhile
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if kept is not None:
            with open(os.path.join(tmp, "pruning.json"), "w") as f:
                json.dump(kept, f)
        with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:
            json.dump({"written_by": "llmshearing", "pruned": kept is not None, "dtype": str(dtype)}, f)
    return out_dir


def export_model(model, out_dir: str, tokenizer, dtype=None, overwrite: bool = False) -> dict | None:
    """The dense HF model of a ComposerLM: pruning folds and slices the masks, plain training saves as is."""
    lm, kept = finalize(model.model, model.l0) if model.l0 is not None else (model.model, None)
    save_hf(lm, out_dir, tokenizer, kept, dtype=dtype, overwrite=overwrite)
    return kept


def export_trained(trainer, cfg, tokenizer, out_dir: str, overwrite: bool = False) -> dict | None:
    """Write the trained model as a dense HF model (rank 0) when training ends. Under FSDP every rank takes part
    in gathering the full state dict to rank 0's CPU, which loads it into an unwrapped model of the run's config
    and exports that (the same path as exporting a checkpoint)."""
    from composer.utils import dist

    from llmshearing.model.composer_model import student_state, unwrap
    from llmshearing.train.builders import build_model

    model, kept = unwrap(trainer.state.model), None
    if trainer.state.fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(trainer.state.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_global_rank() == 0:
            model = build_model(cfg, load_weights=False)
            model.load_state_dict(student_state(full), strict=True)
        del full
    if dist.get_global_rank() == 0:
        kept = export_model(model, out_dir, tokenizer, overwrite=overwrite)
    dist.barrier()
    return kept


def export_checkpoint(checkpoint: str, out_dir: str, config_path: str | None = None,
                      dtype: str | None = None, overwrite: bool = False) -> dict | None:
    """`llmshearing export`: a Composer checkpoint -> dense HF model (of the target shape when pruning)."""
    check_export_dir(out_dir, "out_dir", overwrite)  # before the checkpoint is read
    cfg, model = load_checkpoint(checkpoint, config_path)
    return export_model(model, out_dir, model_tokenizer(cfg.model), dtype_of(dtype) if dtype else None, overwrite)
