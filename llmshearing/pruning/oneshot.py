"""One-shot structured pruning (weight magnitude, or activation importance): the baselines LLM-Shearing's
learned masks must beat.

No training: every prunable unit gets a score (from its weights, or from its contribution on a few
calibration sequences), and the scores are handed to the same machinery the L0 masks use at test time (`HardConcrete.keep_index` keeps the
top-k per row, `export.finalize` slices), so there is one slicer and the result has the target shape exactly.

Scores are squared L2 norms (sums of squared weights; the same order as the L2 norm):

* intermediate unit i of layer l: row i of gate_proj and up_proj + column i of down_proj;
* query head h: its rows of q_proj + its columns of o_proj;
* KV group g: its rows of k_proj and v_proj + the scores of the query heads it serves;
* hidden dim j: column j of the embedding (and of an untied lm_head) + column j of every q/k/v/gate/up
  (what reads dim j) + row j of every o_proj/down_proj (what writes it);
* layer l: |o_proj|^2 + |down_proj|^2, the size of what the layer writes into the residual stream.

On SmolLM2-135M weight magnitude chose worse layers and intermediate units than three random draws did, and
was within the random draws' range for hidden dims and heads (docs/runs/reproduce_mini.md), so `activation_scores`
gives a second one-shot baseline from a few calibration sequences: each unit's average contribution and each
layer's block influence. The same scores can start the L0 masks instead (`pruning.init: activation`,
llmshearing/train/mask_init.py), through `set_scores` with trainable log_alpha bands.
"""
from __future__ import annotations

import torch

from llmshearing.data.layout import DomainSequences, read_manifest, refuse_test
from llmshearing.data.tokenizer import load_tokenizer
from llmshearing.model.hf import head_dim_of, load_hf_config
from llmshearing.model.loading import from_pretrained
from llmshearing.pruning.export import finalize, save_hf
from llmshearing.pruning.shapes import param_count, shape_of
from llmshearing.pruning.target import resolve_target
from llmshearing.pruning.masks import L0Module, row_ranks
from llmshearing.model.decoder import DecoderLM

SCORING = {"magnitude": "magnitude: squared L2 norm of each unit's weights (llmshearing/pruning/oneshot.py)",
           "activation": "activation: mean contribution of each unit and block influence of each layer on "
                         "calibration sequences (llmshearing/pruning/oneshot.py)"}
# log_alpha of every unit is OPEN + rank/units: the order of the scores decides keep_index, and the
# test-time gate value sigmoid(log_alpha / beta * 0.8) rounds to exactly 1.0 in float32 from log_alpha ~ 12 on,
# so finalize folds nothing into the weights: the kept weights are the source's, unscaled. The masks are built
# without the training clamp to [ln 0.01, ln 100], which would tie all these values.
OPEN = 30.0


def _sq_rows(w: torch.Tensor, n: int) -> torch.Tensor:
    """Squared norm of `n` equal blocks of rows of w (out, in) -> (n,)."""
    return w.float().pow(2).reshape(n, -1).sum(-1)


def _sq_cols(w: torch.Tensor, n: int) -> torch.Tensor:
    """Squared norm of `n` equal blocks of columns of w (out, in) -> (n,)."""
    return w.float().pow(2).reshape(w.shape[0], n, -1).sum((0, 2))


@torch.no_grad()
def magnitude_scores(lm: DecoderLM) -> dict[str, torch.Tensor]:
    """Scores of every unit, shaped like the L0 masks of `llmshearing.pruning.masks.mask_specs` (all five levels)."""
    cfg, src = lm.config, shape_of(lm.config)
    KV, R, H = src.num_key_value_heads, src.heads_per_group, src.num_attention_heads
    hidden = lm.model.embed_tokens.weight.float().pow(2).sum(0)
    if not cfg.tie_word_embeddings:
        hidden = hidden + lm.lm_head.weight.float().pow(2).sum(0)
    layer, head, kv_head, inter = [], [], [], []
    for block in lm.model.layers:
        a, m = block.self_attn, block.mlp
        q_head = _sq_rows(a.q_proj.weight, H) + _sq_cols(a.o_proj.weight, H)  # (H,) in group-major order
        head.append(q_head.reshape(KV, R))
        kv_head.append(_sq_rows(a.k_proj.weight, KV) + _sq_rows(a.v_proj.weight, KV) + q_head.reshape(KV, R).sum(-1))
        reads = [p.weight for p in (m.gate_proj, m.up_proj) if p is not None]  # GPT-NeoX: no gate_proj
        inter.append(sum(_sq_rows(w, w.shape[0]) for w in reads) + _sq_cols(m.down_proj.weight, m.down_proj.in_features))
        for w in (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, *reads):
            hidden = hidden + w.float().pow(2).sum(0)
        for w in (a.o_proj.weight, m.down_proj.weight):
            hidden = hidden + w.float().pow(2).sum(1)
        layer.append(a.o_proj.weight.float().pow(2).sum() + m.down_proj.weight.float().pow(2).sum())
    return {"layer": torch.stack(layer), "hidden": hidden, "kv_head": torch.stack(kv_head),
            "head": torch.stack(head), "intermediate": torch.stack(inter)}


# Activation scoring runs the calibration sequences through the model a few at a time (at least one) and the
# per-head outputs a few tokens at a time, so its temporaries are bounded whatever the number of sequences: at
# Llama-2-7B x 4096 tokens the largest is 256 MiB (a head chunk) or one MLP activation (172 MiB), where scoring all
# 28 sequences at once built a 56 GiB per-head tensor. Peak memory: `activation_peak_bytes`.
SCORE_PASS_TOKENS = 4096  # tokens per forward pass
HEAD_CHUNK_ELEMENTS = 2**26  # fp32 elements of one chunk of per-head outputs (256 MiB)


def sequences_per_pass(seq_len: int) -> int:
    """Calibration sequences one forward pass of activation scoring takes: SCORE_PASS_TOKENS worth, at least one."""
    return max(1, SCORE_PASS_TOKENS // seq_len)


def activation_peak_bytes(config, seq_len: int, weight_bytes: int = 4) -> int:
    """Peak memory of `activation_scores` on one device, assuming a fused attention kernel (flash / memory-efficient
    SDPA on CUDA, torch's flash kernel on CPU; the math fallback adds 4 * H * T^2 bytes per sequence): the weights
    (`weight_bytes` each; mask_init scores the fp32 training model) plus the larger of a pass's two phases, over
    n = seq_len * sequences_per_pass tokens in fp32 and without gradients:
      MLP:       the three widest activations (gate, up and their product; then the product and the hook's |.|) and
                 five residual-width tensors: 4 * n * (3 I + 5 d);
      attention: three residual-width tensors, q/k/v, the attention output and its reshaped copy, and one chunk of
                 per-head outputs: 4 * (n * (3 d + (H + 2 KV) hd + 2 H hd) + min(HEAD_CHUNK_ELEMENTS, n H d)).
    Checked against the live meta tensors of a pass at Llama-2-7B and Llama-3.1-8B x 4096 tokens (docs/devices.md)."""
    d, I, hd = config.hidden_size, config.intermediate_size, head_dim_of(config)
    H, KV = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    n = seq_len * sequences_per_pass(seq_len)
    mlp = n * (3 * I + 5 * d)
    attention = n * (3 * d + (H + 2 * KV) * hd + 2 * H * hd) + min(HEAD_CHUNK_ELEMENTS, n * H * d)
    return int(param_count(shape_of(config), config)) * weight_bytes + 4 * max(mlp, attention)


@torch.no_grad()
def block_influence(lm: DecoderLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-layer importance from activations: 1 - mean cosine similarity between a layer's input and output
    hidden states (Men et al. 2024, "ShortGPT"), on a few calibration sequences (`sequences_per_pass` at a time).
    A layer that barely changes the residual stream scores near 0."""
    B, T = input_ids.shape
    per = sequences_per_pass(T)
    total = None
    ropes = None
    for a in range(0, B, per):
        x = lm.embed(input_ids[a:a + per])  # Gemma's scaled by sqrt(hidden)
        if ropes is None:
            ropes = lm.layer_ropes(T, x.dtype, x.device)  # Gemma 3: its sliding layers' own base
        sums = []
        for layer, rope in zip(lm.model.layers, ropes):
            y = layer(x, *rope)
            sums.append(torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).sum())
            x = y
        total = torch.stack(sums) if total is None else total + torch.stack(sums)
    return 1 - total / (B * T)


@torch.no_grad()
def activation_scores(lm: DecoderLM, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores from what each unit contributes on calibration sequences `input_ids` (B, T), same shapes as
    `magnitude_scores`:

    * intermediate unit i: mean |silu(gate_i) * up_i| x |down_proj[:, i]| (its average write, Wanda-style);
    * query head h: mean norm of its output through o_proj; KV group: the sum over its query heads;
    * hidden dim j: mean |x_j| of the residual stream entering the layers (massive-activation dims win);
    * layer: `block_influence`.

    Means are sums over the passes and chunks (bounded memory, see SCORE_PASS_TOKENS) divided by the B*T tokens.
    """
    src = shape_of(lm.config)
    KV, R, H = src.num_key_value_heads, src.heads_per_group, src.num_attention_heads
    L = len(lm.model.layers)
    sums, hooks = {"act": [0] * L, "head": [0] * L, "resid": [0] * L}, []

    def add(key: str, i: int, value: torch.Tensor) -> None:
        sums[key][i] = sums[key][i] + value

    for i, block in enumerate(lm.model.layers):
        def mlp_hook(mod, args, i=i):
            add("act", i, args[0].abs().float().sum((0, 1)))

        def head_hook(mod, args, i=i):
            x = args[0].reshape(-1, H, args[0].shape[-1] // H)  # (tokens, H, hd): the heads' outputs before o_proj
            w = mod.weight.float().reshape(mod.weight.shape[0], H, -1)  # (d, H, hd)
            rows = max(1, HEAD_CHUNK_ELEMENTS // (H * w.shape[0]))
            for a in range(0, x.shape[0], rows):
                add("head", i, torch.einsum("nhk,dhk->nhd", x[a:a + rows].float(), w).norm(dim=-1).sum(0))

        def resid_hook(mod, args, i=i):
            add("resid", i, args[0].abs().float().sum((0, 1)))

        hooks += [block.mlp.down_proj.register_forward_pre_hook(mlp_hook),
                  block.self_attn.o_proj.register_forward_pre_hook(head_hook),
                  block.register_forward_pre_hook(resid_hook)]
    try:
        layer = block_influence(lm, input_ids)
    finally:
        for h in hooks:
            h.remove()
    n = input_ids.numel()
    down_norms = [block.mlp.down_proj.weight.float().norm(dim=0) for block in lm.model.layers]
    head = (torch.stack(sums["head"]) / n).reshape(-1, KV, R)
    return {"layer": layer, "hidden": (torch.stack(sums["resid"]) / n).mean(0), "kv_head": head.sum(-1), "head": head,
            "intermediate": torch.stack([s / n * w for s, w in zip(sums["act"], down_norms)])}


@torch.no_grad()
def set_scores(l0: L0Module, scores: dict[str, torch.Tensor], kept: tuple[float, float] | None = None,
               dropped: tuple[float, float] | None = None) -> None:
    """Make `l0`'s masks keep the top-scoring units of every row. By default (one-shot) every log_alpha is
    OPEN + rank/units, so each kept gate's test-time value is exactly 1. With `kept` and `dropped` (low, high)
    bands of log_alpha (the training init `pruning.init: activation`), the top `keep` units of each row are
    spread evenly over `kept` and the others over `dropped`, in score order: same keep set, trainable values."""
    for name, mask in l0.masks.items():
        s = scores[name]
        if tuple(s.shape) != mask.shape:
            raise ValueError(f"scores for '{name}' have shape {tuple(s.shape)}, the mask {mask.shape}")
        rank = row_ranks(s).float()  # 0 = lowest score; ties broken by index
        if kept is None:
            mask.log_alpha.copy_(OPEN + rank / s.shape[-1])
            continue
        drop = mask.units - mask.keep
        low = rank < drop
        where = torch.where(low, (rank + 0.5) / drop, (rank - drop + 0.5) / mask.keep)  # in (0, 1) within the band
        a, b = torch.where(low, dropped[0], kept[0]), torch.where(low, dropped[1], kept[1])
        mask.log_alpha.copy_(a + (b - a) * where)


def calibration_ids(root: str, domains: list[str] | None = None, per_domain: int = 4, split: str = "prune",
                    remote: str | None = None) -> torch.Tensor:
    """The first `per_domain` sequences of every domain's `split` (B, T), domains in the shards' order by default:
    the data of activation scoring (the oneshot_act arm, `pruning.init: activation`)."""
    refuse_test(split, "activation calibration")
    domains = list(read_manifest(root)["domains"]) if domains is None else domains
    seqs = [DomainSequences(root, d, split, per_domain, remote=remote) for d in domains]
    return torch.stack([s[i]["input_ids"] for s in seqs for i in range(len(s))])


def oneshot_prune(model_path: str, target, out_dir: str, gguf_file: str | None = None, overwrite: bool = False,
                  method: str = "magnitude", calibration: torch.Tensor | None = None) -> dict:
    """Prune the HF model at `model_path` to `target` (preset, config path or dims) in one shot and write the
    dense HF model (+ tokenizer, `pruning.json` with the kept units and the scoring) to `out_dir`, atomically.
    `method`: "magnitude" (no data) or "activation" (needs `calibration`, token ids (B, T))."""
    if method not in SCORING:
        raise ValueError(f"method must be one of {list(SCORING)}, got '{method}'")
    if method == "activation" and calibration is None:
        raise ValueError("activation scoring needs calibration token ids")
    config = load_hf_config(model_path, gguf_file)
    lm = from_pretrained(model_path, gguf_file, attn_impl="sdpa")
    l0 = L0Module(shape_of(config), resolve_target(target, config), log_alpha_range=None)
    set_scores(l0, magnitude_scores(lm) if method == "magnitude" else activation_scores(lm, calibration))
    pruned, kept = finalize(lm, l0)
    kept = {**kept, "scoring": SCORING[method]}
    if calibration is not None and method == "activation":
        kept["calibration_tokens"] = int(calibration.numel())
    save_hf(pruned, out_dir, load_tokenizer(model_path, gguf_file), kept, overwrite=overwrite)
    return kept
