"""Throughput of shearing: training with masks vs without, and inference of the source, the uniformly
pruned target and a non-uniform model of the same size (the paper's Table 4 question: is a uniform
target architecture faster than the per-layer shapes unconstrained pruning produces?).

    python -m bench.throughput                                  # SmolLM2-135M -> smollm2-135m-half, CPU fp32
    python -m bench.throughput --device cuda --dtype bfloat16   # the same on a GPU
    python -m bench.throughput --quick --out /tmp/t.json        # tiny random model, seconds (used by the test)

A benchmark, not a test: numbers depend on the machine and on what else runs on it. Pruned weights are
real (export.finalize with top-k masks of a fresh L0Module), but speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

from llmshearing.compat import set_attn_implementation
from llmshearing.devices import DTYPES
from llmshearing.pruning.export import head_rows
from llmshearing.model.hf import head_dim_of
from llmshearing.pruning.shapes import param_count, PRESETS, Shape, shape_of
from llmshearing.io import atomic_write_text
from llmshearing.train.run import malloc_trim

# --quick: a SmolLM2-like tiny source (9 heads in 3 KV groups) and a target with the half preset's ratios.
QUICK_SOURCE = dict(num_hidden_layers=6, num_attention_heads=9, num_key_value_heads=3)
QUICK_TARGET = Shape(4, 48, 4, 2, 64)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- machine and memory

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPU time that was busy over the next `seconds` (/proc/stat; None elsewhere): the
    1-minute load average lags by a minute and still counts the previous benchmark, this does not."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        (t0, i0), _, (t1, i1) = sample(), time.sleep(seconds), sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (i1 - i0) / max(1, t1 - t0)


def machine_info(device: str) -> dict:
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Extra memory at the peak of a phase, over what was in use when it started.

    CUDA: torch.cuda.max_memory_allocated (exact tensor bytes). CPU (Linux): the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs) minus its RSS at the start, after malloc_trim(0) has handed
    freed heap pages back (without it, memory freed by an earlier phase is reused unseen and the delta
    reads 0). Page-granular and allocator-dependent, so it is reported next to the exact parameter and
    KV-cache bytes.
    """

    def __init__(self, device: str):
        self.device = device
        self.kind = ("cuda max_memory_allocated - memory_allocated at start" if device == "cuda"
                     else "cpu: VmHWM (peak RSS, reset per phase) - VmRSS at start, after malloc_trim(0)")

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            malloc_trim()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self.start = _proc_status_kb("VmRSS") * 1024
            except (OSError, TypeError):
                self.start = None
        self.bytes = None
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        elif self.start is not None:
            self.bytes = _proc_status_kb("VmHWM") * 1024 - self.start
        return False


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- models

def load_source(args):
    """The source as an HF model (fp32, CPU): SmolLM2-135M, or a tiny random one with --quick."""
    from transformers import AutoModelForCausalLM

    if args.quick:
        from llmshearing.experiments.tiny import tiny_config

        torch.manual_seed(args.seed)
        config = tiny_config("smollm2-gqa", **QUICK_SOURCE)
        set_attn_implementation(config, "sdpa")
        return AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32,
                                                attn_implementation="sdpa").eval()


def decoder_from_hf(hf):
    from llmshearing.model.decoder import DecoderLM

    lm = DecoderLM(hf.config, attn_impl="auto")
    lm.load_state_dict(hf.state_dict(), strict=True)
    return lm


def hf_from_decoder(lm):
    """The HF model with `lm`'s weights (as prune.save_hf builds it, without writing files)."""
    from transformers import AutoModelForCausalLM

    config = lm.config.__class__.from_dict(lm.config.to_dict())
    set_attn_implementation(config, "sdpa")
    hf = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(lm.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if k != "lm_head.weight"], (missing, unexpected)
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


def pruned(lm, target: Shape, seed: int):
    """A dense pruned DecoderLM of `target` via the project's own path: top-k test-time masks, finalize."""
    from llmshearing.pruning.masks import L0Module
    from llmshearing.pruning.export import finalize

    torch.manual_seed(seed)
    l0 = L0Module(shape_of(lm.config), target, seed=seed)
    return finalize(lm, l0)[0]


def nonuniform_counts(src: Shape, tgt: Shape) -> list[tuple[int, int, int]]:
    """Per-layer (KV heads, query heads per group, intermediate) with the target's totals but unequal layers.

    Layers go in pairs (2k, 2k+1) whose sums equal two target layers, so totals, and hence the parameter
    count, match the uniform target exactly: one layer of a pair gets more attention heads than the
    other, and the intermediate size moves up in one and down in the other by an amount that grows
    with k (CoFiPruning-like spread, from near the target to near the source size or half the target).
    """
    L, kv_t, r_t, i_t = tgt.num_hidden_layers, tgt.num_key_value_heads, tgt.heads_per_group, tgt.intermediate_size
    KV, R, I = src.num_key_value_heads, src.heads_per_group, src.intermediate_size
    options = [(kw, rw, 2 * kv_t - kw, rn) for kw in range(1, KV + 1) for rw in range(1, R + 1) for rn in range(1, R + 1)]
    head_options = sorted(  # (wide KV, its heads per group, narrow KV, its heads per group), widest spread first
        ((kw, rw, kn, rn) for kw, rw, kn, rn in options
         if 1 <= kn <= KV and kw * rw + kn * rn == 2 * kv_t * r_t and kw * rw > kn * rn),
        key=lambda o: (-(o[0] * o[1] - o[2] * o[3]), o),
    ) or [(kv_t, r_t, kv_t, r_t)]
    pairs = L // 2
    delta_max = min(I - i_t, i_t // 2)
    counts = []
    for k in range(pairs):
        kw, rw, kn, rn = head_options[k % len(head_options)]
        delta = round(delta_max * (k + 1) / pairs)
        wide_mlp_first = k % 2 == 0  # the wide-attention layer is not always the wide-MLP layer
        counts.append((kw, rw, i_t + delta if wide_mlp_first else i_t - delta))
        counts.append((kn, rn, i_t - delta if wide_mlp_first else i_t + delta))
    if L % 2:
        counts.append((kv_t, r_t, i_t))
    return counts


def nonuniform_layers(src: Shape, tgt: Shape, seed: int = 0) -> list[dict]:
    """Which units each layer keeps (indices into a layer with the source's heads and intermediate):
    a seeded random choice, so the slicing test sees kept units that are not simply the first ones."""
    gen = torch.Generator().manual_seed(seed)
    KV, R, I = src.num_key_value_heads, src.heads_per_group, src.intermediate_size

    def choose(n: int, k: int) -> list[int]:
        return sorted(torch.randperm(n, generator=gen)[:k].tolist())

    plan = []
    for kv, r, inter in nonuniform_counts(src, tgt):
        groups = choose(KV, kv)
        plan.append({"kv_heads": groups, "heads": [g * R + q for g in groups for q in choose(R, r)],
                     "intermediate": choose(I, inter)})
    return plan


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous())
    return layer


@torch.no_grad()
def slice_nonuniform(carrier, plan: list[dict]):
    """Cut each layer of an HF Llama `carrier` (all source heads and intermediate dims) down to its own
    shape. transformers 4.53 LlamaAttention reshapes with -1 heads and reads only head_dim and
    num_key_value_groups, and LlamaMLP reads nothing but its Linears, so new Linears plus a per-layer
    num_key_value_groups make a working per-layer-shaped model (the DynamicCache holds per-layer tensors)."""
    assert len(plan) == len(carrier.model.layers), (len(plan), len(carrier.model.layers))
    model = copy.deepcopy(carrier)
    hd = head_dim_of(model.config)
    for layer, keep in zip(model.model.layers, plan):
        attn, mlp = layer.self_attn, layer.mlp
        q_rows, kv_rows = head_rows(keep["heads"], hd), head_rows(keep["kv_heads"], hd)
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            lin = getattr(attn, name)
            setattr(attn, name, _linear(lin.weight[rows], None if lin.bias is None else lin.bias[rows]))
        attn.o_proj = _linear(attn.o_proj.weight[:, q_rows], attn.o_proj.bias)
        attn.num_key_value_groups = len(keep["heads"]) // len(keep["kv_heads"])
        i_idx = torch.tensor(keep["intermediate"], dtype=torch.long)
        for name in ("gate_proj", "up_proj"):
            lin = getattr(mlp, name)
            setattr(mlp, name, _linear(lin.weight[i_idx], None if lin.bias is None else lin.bias[i_idx]))
        mlp.down_proj = _linear(mlp.down_proj.weight[:, i_idx], mlp.down_proj.bias)
        mlp.intermediate_size = len(i_idx)
    return model.eval()


@torch.no_grad()
def zero_removed(carrier, plan: list[dict]):
    """The reference for slice_nonuniform: the carrier with every removed unit's output weights zeroed
    (o_proj columns of removed query heads, including all heads of removed KV groups; down_proj columns
    of removed intermediate dims). It computes what the sliced model must compute."""
    model = copy.deepcopy(carrier)
    hd = head_dim_of(model.config)
    for layer, keep in zip(model.model.layers, plan):
        o = layer.self_attn.o_proj.weight
        removed = [h for h in range(o.shape[1] // hd) if h not in keep["heads"]]
        if removed:
            o[:, head_rows(removed, hd)] = 0
        down = layer.mlp.down_proj.weight
        removed = [i for i in range(down.shape[1]) if i not in set(keep["intermediate"])]
        if removed:
            down[:, torch.tensor(removed)] = 0
    return model.eval()


def layer_shapes(hf) -> list[dict]:
    """Per-layer shapes read from the modules themselves (not from a plan or config)."""
    hd = head_dim_of(hf.config)
    return [{"heads": l.self_attn.q_proj.out_features // hd, "kv_heads": l.self_attn.k_proj.out_features // hd,
             "intermediate": l.mlp.gate_proj.out_features} for l in hf.model.layers]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors are counted once


def build_models(args, log_fn=log) -> tuple[dict, dict, object]:
    """source / uniform / nonuniform HF models (fp32, CPU), their description, and the source DecoderLM."""
    source = load_source(args)
    src_shape = shape_of(source.config)
    target = QUICK_TARGET if args.quick else PRESETS[args.target]
    lm = decoder_from_hf(source)
    log_fn(f"source {src_shape.as_dict()} -> target {target.as_dict()}")
    uniform = hf_from_decoder(pruned(lm, target, args.seed))
    # The carrier has the target's layers and hidden size with every head and intermediate dim of the
    # source; the non-uniform model is cut out of it layer by layer.
    carrier_shape = Shape(target.num_hidden_layers, target.hidden_size, src_shape.num_attention_heads,
                          src_shape.num_key_value_heads, src_shape.intermediate_size)
    carrier = hf_from_decoder(pruned(lm, carrier_shape, args.seed))
    plan = nonuniform_layers(src_shape, target, args.seed)
    nonuniform = slice_nonuniform(carrier, plan)
    ids = torch.randint(0, source.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(args.seed))
    with torch.inference_mode():
        diff = float((nonuniform(ids).logits - zero_removed(carrier, plan)(ids).logits).abs().max())
    del carrier
    log_fn(f"non-uniform slicing check: max |logits - zeroed carrier logits| = {diff:.2e}")
    models = {"source": source, "uniform": uniform, "nonuniform": nonuniform}
    info = {
        name: {"per_layer": layer_shapes(m), "params": n_params(m),
               "non_embedding_params": n_params(m) - m.model.embed_tokens.weight.numel()
               - (0 if m.config.tie_word_embeddings else m.lm_head.weight.numel()),
               "hidden_size": m.model.embed_tokens.weight.shape[1], "num_hidden_layers": len(m.model.layers)}
        for name, m in models.items()
    }
    info["source"]["shape"] = src_shape.as_dict()
    info["uniform"]["shape"] = target.as_dict()
    info["uniform"]["param_count_formula"] = param_count(target, source.config)
    info["nonuniform"]["slicing_check_max_abs_diff"] = diff
    return models, info, lm


# ---------------------------------------------------------------- timing

def train_bench(lm, target: Shape, args, device: str) -> dict:
    """tokens/s of fwd + bwd + AdamW for the masked source (L0 masks sampled each step, Lagrangian in the
    loss, mask and multiplier parameters in the optimizer) and the dense source; same weights, batch and
    sequence, steps alternated so that load from other processes hits both alike."""
    from llmshearing.train.composer_model import ComposerLM
    from llmshearing.pruning.masks import L0Module

    lm = lm.to(device).train()
    l0 = L0Module(shape_of(lm.config), target, seed=args.seed).to(device).train()
    variants = {"masked_source": ComposerLM(lm, l0), "dense_source": ComposerLM(lm, None)}
    opts = {name: torch.optim.AdamW(m.param_groups(lr=1e-4, weight_decay=0.0, mask_lr=1.0, lambda_lr=1.0))
            for name, m in variants.items()}
    ids = torch.randint(0, lm.config.vocab_size, (args.train_batch, args.train_seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(args.seed))
    batch = {"input_ids": ids, "labels": ids}
    amp = args.dtype != "float32"
    times = {name: [] for name in variants}
    peaks = {name: None for name in variants}
    for it in range(args.warmup + args.train_repeats):
        for name, model in variants.items():
            if model.l0 is not None:
                model.l0.step = it
            with PeakMemory(device) as mem:
                sync(device)
                start = time.perf_counter()
                with torch.autocast(device_type=device, dtype=DTYPES[args.dtype], enabled=amp):
                    out = model(batch)
                    loss = model.loss(out, batch)
                (loss["total"] if isinstance(loss, dict) else loss).backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                sync(device)
                elapsed = time.perf_counter() - start
            timed = it >= args.warmup
            if timed:
                times[name].append(elapsed)
                peaks[name] = max(peaks[name] or 0, mem.bytes or 0) if mem.bytes is not None else peaks[name]
            log(f"train {name:14s} {'rep' if timed else 'warmup'} {it - args.warmup + 1 if timed else it + 1}: "
                f"{elapsed:.3f} s")
    tokens = args.train_batch * args.train_seq
    result = {name: {"tokens_per_s": tokens / statistics.median(t), "step_s": t, "step_s_median": statistics.median(t),
                     "peak_extra_bytes": peaks[name], "peak_extra_kind": PeakMemory(device).kind}
              for name, t in times.items()}
    del variants, opts
    lm.to("cpu")
    return result


@torch.inference_mode()
def generate_once(model, prompt: torch.Tensor, new_tokens: int, device: str) -> tuple[float, float, int]:
    """Greedy generation with the HF KV cache: (prefill s, decode s, KV-cache bytes). Prefill is one forward
    over the prompt that fills the cache and keeps only the last position's logits (as `generate` does);
    decode is `new_tokens` one-token forwards reading and extending the cache. No EOS stop."""
    from transformers import DynamicCache

    cache = DynamicCache()
    sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    decode = time.perf_counter() - start
    assert cache.get_seq_length() == prompt.shape[1] + new_tokens
    kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cache)
    return prefill, decode, kv_bytes


def inference_bench(models: dict, args, device: str) -> dict:
    """Prefill and decode tokens/s of each model; repeats go round-robin over the models."""
    dtype = DTYPES[args.dtype]
    for m in models.values():
        m.to(device=device, dtype=dtype)
    vocab = min(m.config.vocab_size for m in models.values())
    prompt = torch.randint(0, vocab, (args.infer_batch, args.prompt_len), device=device,
                           generator=torch.Generator(device=device).manual_seed(args.seed))
    runs = {name: {"prefill_s": [], "decode_s": [], "peak": None, "kv": None} for name in models}
    for it in range(args.warmup + args.repeats):
        for name, model in models.items():
            with PeakMemory(device) as mem:
                prefill, decode, kv = generate_once(model, prompt, args.new_tokens, device)
            timed = it >= args.warmup
            if timed:
                r = runs[name]
                r["prefill_s"].append(prefill)
                r["decode_s"].append(decode)
                r["kv"] = kv
                if mem.bytes is not None:
                    r["peak"] = max(r["peak"] or 0, mem.bytes)
            log(f"infer {name:10s} {'rep' if timed else 'warmup'} {it - args.warmup + 1 if timed else it + 1}: "
                f"prefill {prefill:.3f} s, decode {args.new_tokens} tokens {decode:.3f} s")
    result = {}
    for name, r in runs.items():
        model = models[name]
        result[name] = {
            "prefill_tokens_per_s": args.infer_batch * args.prompt_len / statistics.median(r["prefill_s"]),
            "decode_tokens_per_s": args.infer_batch * args.new_tokens / statistics.median(r["decode_s"]),
            "prefill_s": r["prefill_s"], "decode_s": r["decode_s"],
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "kv_cache_bytes": r["kv"],
            "peak_extra_bytes": r["peak"], "peak_extra_kind": PeakMemory(device).kind,
        }
    return result


RATIO_PAIRS = {  # name: (section, numerator, denominator, time series); a speed ratio = denominator time / numerator time
    "train_masked_over_dense": ("train", "masked_source", "dense_source", "step_s"),
    **{f"{phase}_{a}_over_{b}": ("inference", a, b, f"{phase}_s") for phase in ("prefill", "decode")
       for a, b in (("uniform", "source"), ("nonuniform", "source"), ("uniform", "nonuniform"))},
}


def ratios(train: dict, infer: dict) -> tuple[dict, dict]:
    """Speed ratios two ways: of the medians, and per round (the two runs of one round were timed back to
    back, so load from other processes that drifts between rounds cancels; their median and range)."""
    sections = {"train": train, "inference": infer}
    of_medians, per_round = {}, {}
    for name, (section, a, b, series) in RATIO_PAIRS.items():
        if not sections[section]:  # --train-only
            continue
        ta, tb = sections[section][a][series], sections[section][b][series]
        of_medians[name] = statistics.median(tb) / statistics.median(ta)
        rounds = [y / x for x, y in zip(ta, tb)]
        per_round[name] = {"median": statistics.median(rounds), "min": min(rounds), "max": max(rounds), "all": rounds}
    return of_medians, per_round


def _mb(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f}"


def markdown(result: dict) -> str:
    s, m, tr, inf, rt = result["settings"], result["models"], result["train"], result["inference"], result["ratios"]
    lines = [
        f"Training (fwd + bwd + AdamW, {s['train_batch']} x {s['train_seq']} tokens, {s['dtype']}, median of "
        f"{s['train_repeats']} after {s['warmup']} warm-up):", "",
        "| model | tokens/s | step s (median) | peak extra MB |", "|---|---|---|---|",
    ]
    for name in ("masked_source", "dense_source"):
        lines.append(f"| {name} | {tr[name]['tokens_per_s']:,.1f} | {tr[name]['step_s_median']:.3f} | "
                     f"{_mb(tr[name]['peak_extra_bytes'])} |")
    lines += [] if not inf else [
        "", f"Inference (batch {s['infer_batch']}, prompt {s['prompt_len']}, {s['new_tokens']} greedy new tokens "
        f"with KV cache, {s['dtype']}, median of {s['repeats']} after {s['warmup']} warm-up):", "",
        "| model | params | non-emb. params | heads per layer | intermediate per layer | prefill tok/s | "
        "decode tok/s | param MB | KV cache MB | peak extra MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("source", "uniform", "nonuniform") if inf else ():
        pl, r = m[name]["per_layer"], inf[name]
        heads = sorted({l["heads"] for l in pl})
        inter = sorted({l["intermediate"] for l in pl})
        lines.append(
            f"| {name} | {m[name]['params']:,} | {m[name]['non_embedding_params']:,} | "
            f"{heads[0] if len(heads) == 1 else f'{heads[0]}-{heads[-1]}'} | "
            f"{inter[0] if len(inter) == 1 else f'{inter[0]}-{inter[-1]}'} | {r['prefill_tokens_per_s']:,.1f} | "
            f"{r['decode_tokens_per_s']:,.1f} | {_mb(r['param_bytes'])} | {_mb(r['kv_cache_bytes'])} | "
            f"{_mb(r['peak_extra_bytes'])} |")
    pr = result["ratios_per_round"]
    lines += ["", "| speed ratio | of the medians | median per round | per-round range |", "|---|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {pr[k]['median']:.3f} | {pr[k]['min']:.2f}-{pr[k]['max']:.2f} |"
              for k, v in rt.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny random model, few iterations (seconds)")
    p.add_argument("--model", default="data/models/smollm2-135m", help="HF source model directory")
    p.add_argument("--target", default="smollm2-135m-half", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="inference weights; training keeps fp32 weights under autocast to this dtype")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice; 1 with --quick)")
    p.add_argument("--train-batch", type=int, default=None)
    p.add_argument("--train-seq", type=int, default=None)
    p.add_argument("--infer-batch", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed generations per model")
    p.add_argument("--train-repeats", type=int, default=None, help="timed training steps per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-only", action="store_true", help="only the masked vs dense training step")
    p.add_argument("--out", default=None, help="JSON output (default: runs/bench/throughput[-quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        defaults = dict(train_batch=2, train_seq=32, train_repeats=2, infer_batch=2, prompt_len=16, new_tokens=8,
                        warmup=1, repeats=2)
    else:
        defaults = dict(train_batch=2, train_seq=256, train_repeats=3, infer_batch=1, prompt_len=128, new_tokens=64,
                        warmup=1, repeats=5)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    if args.threads is None and args.quick:
        args.threads = 1  # ops on a 64-wide model are too small to split; 2 threads only wait on each other
    if args.threads:
        torch.set_num_threads(args.threads)
    out_path = args.out or os.path.join("runs", "bench", "throughput-quick.json" if args.quick else "throughput.json")

    started = time.time()
    load_before, busy_before = os.getloadavg(), cpu_busy()
    busy = busy_before is not None and busy_before > 0.10
    if busy:
        log(f"WARNING: the machine is busy ({busy_before:.0%} of its {os.cpu_count()} cores in use before the start, load "
            f"average {load_before[0]:.2f}): other processes hide or inflate overheads; speed ratios from this run do "
            f"not count (recorded as busy)")
    log(f"building models ({'quick: tiny random source' if args.quick else args.model})")
    models, info, lm = build_models(args)
    target = QUICK_TARGET if args.quick else PRESETS[args.target]
    log("training benchmark: masked vs dense source")
    train = train_bench(lm, target, args, args.device)
    del lm
    gc.collect()
    infer = {}
    if not args.train_only:
        log("inference benchmark: source, uniform, non-uniform")
        infer = inference_bench(models, args, args.device)

    import transformers

    result = {
        "command": "python -m bench.throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(args.device), "loadavg_1m_before": load_before[0],
                    "loadavg_1m_after": os.getloadavg()[0], "cpu_busy_before": busy_before, "busy": busy},
        "torch": torch.__version__, "transformers": transformers.__version__,
        "settings": {k: getattr(args, k) for k in ("quick", "model", "target", "device", "dtype", "train_batch",
                                                   "train_seq", "infer_batch", "prompt_len", "new_tokens", "warmup",
                                                   "repeats", "train_repeats", "seed")},
        "models": info, "train": train, "inference": infer,
        "wall_s": time.time() - started,
    }
    result["ratios"], result["ratios_per_round"] = ratios(train, infer)
    if args.quick:
        result["settings"]["model"] = f"tiny random smollm2-gqa {QUICK_SOURCE}"
        result["settings"]["target"] = QUICK_TARGET.as_dict()
    table = markdown(result)
    print(table, flush=True)
    atomic_write_text(out_path, json.dumps(result, indent=1) + "\n")
    log(f"wrote {out_path} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
