"""One decoder for LLaMA-family models (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3, GPT-NeoX) with
optional pruning masks.

Parameter names follow Hugging Face's Llama exactly (`model.layers.0.self_attn.q_proj.weight`, ...), so a Llama,
Mistral or Qwen checkpoint loads with `load_state_dict` and a pruned one saves back without key surgery; Phi-3's
fused projections and GPT-NeoX's names are split and renamed when read and fused back when exported
(model/layouts.py).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llmshearing.errors import ConfigError
from llmshearing.model.hf import (attention_biases, gated_mlp, head_dim_of, is_gemma, kv_heads_of, layer_norm, mlp_bias,
                                  norm_eps, qk_norm, sliding_layer)

try:  # optional GPU kernel; torch SDPA is the fallback everywhere
    import flash_attn
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn = flash_attn_func = None


def _normalized(x, eps, kept_dims=None):
    """x / rms(x) in fp32. With a hidden mask, pruned dims are zero and the mean of squares is taken over the
    `kept_dims` that a sliced model would have."""
    x = x.float()
    sq = x.pow(2)
    var = sq.mean(-1, keepdim=True) if kept_dims is None else sq.sum(-1, keepdim=True) / kept_dims
    return x * torch.rsqrt(var + eps)


def rms_norm(x, weight, eps, kept_dims=None):
    """RMSNorm in fp32 as HF does (Llama: cast, then times the weight)."""
    return weight * _normalized(x, eps, kept_dims).to(x.dtype)


def gated_rms_norm(x, weight, eps, kept_dims=None):
    """rms_norm, where `kept_dims` may also be (kept, gate) (`norm_mask`): the output is then multiplied by the
    gate (`pruning.hidden_mask: original`)."""
    gate = None
    if isinstance(kept_dims, tuple):
        kept_dims, gate = kept_dims
    out = rms_norm(x, weight, eps, kept_dims)
    return out if gate is None else out * gate.to(out.dtype)


def norm_mask(m: "Masks"):
    """What every RMSNorm of a masked forward takes: the kept hidden dims, and with `pruning.hidden_mask: original`
    the hidden gate on its output too (the export folds that gate into the norm weights; RMSNorm families only)."""
    return m.hidden_kept if m.norm_gate is None else (m.hidden_kept, m.norm_gate)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, kept_dims=None, hidden=None):  # hidden: LayerNorm's argument, unused by RMSNorm
        return gated_rms_norm(x, self.weight, self.eps, kept_dims)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: times (1 + weight) in fp32, then cast (HF Gemma2RMSNorm / Gemma3RMSNorm). `scale` (d,)
    multiplies the output too: the residual-write gates of a post-norm (the export folds them into the weight)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x, kept_dims=None, scale=None):
        w = 1.0 + self.weight.float()
        if scale is not None:
            w = w * scale.float()
        return (_normalized(x, self.eps, kept_dims) * w).to(x.dtype)


def eager_attention(q, k, v, scale: float, softcap: float | None, mask):
    """softmax(softcap(q k^T * scale) + causal/window mask) v, as HF's eager attention computes it (softmax in fp32):
    SDPA and flash-attn's default build have no logit soft-capping. q (B, H, T, hd), k/v (B, KV, T, hd), mask (T, T)
    bool (True: attend). Returns (B, T, H, hd)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v).transpose(1, 2)


class LayerNorm(nn.Module):
    """GPT-NeoX's LayerNorm (weight and bias). With a hidden mask, mean and variance are over the kept dims (pruned
    dims of the residual stream are zero) and weight and bias are zero in pruned dims, so the output there is zero:
    what the sliced model's LayerNorm computes over its dims, in the kept ones."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x, kept_dims=None, hidden=None):
        if hidden is None:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        on = (hidden > 0).float()
        xf = x.float()
        centred = (xf - xf.sum(-1, keepdim=True) / kept_dims) * on
        var = centred.pow(2).sum(-1, keepdim=True) / kept_dims
        return (centred * torch.rsqrt(var + self.eps) * self.weight + self.bias * on).to(x.dtype)


def make_norm(config: PretrainedConfig, dim: int) -> nn.Module:
    return (LayerNorm if layer_norm(config) else RMSNorm)(dim, norm_eps(config))


class _MaskedLinear(torch.autograd.Function):
    """y = F.linear(x * cols, W * rows[:, None], b * rows): input gates on the activations, output gates folded
    into the weight rows. Saves only what the plain linear saves (x and W) plus the gate vectors: x * cols is
    recomputed in backward (one cheap product) instead of being stored, and the row gates' gradient is a
    reduction over the weight (grad_W' * W), not over every token. Matmuls run in the dtype the forward's ran
    in (autocast), accumulating into the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias, cols, rows):
        xm = x if cols is None else x * cols.to(x.dtype)
        w = weight if rows is None else weight * rows.to(weight.dtype)[:, None]
        b = bias if bias is None or rows is None else bias * rows.to(bias.dtype)
        y = F.linear(xm, w, b)
        ctx.save_for_backward(x, weight, bias, cols, rows)
        ctx.compute_dtype = y.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, cols, rows = ctx.saved_tensors
        dt = ctx.compute_dtype
        acc = torch.promote_types(dt, torch.float32)  # reductions and weight gradients at least in fp32
        xm = (x if cols is None else x * cols.to(x.dtype)).to(dt)
        w = (weight if rows is None else weight * rows.to(weight.dtype)[:, None]).to(dt)
        g = grad.to(dt)
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = grad_w = grad_b = grad_cols = grad_rows = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            grad_xm = g @ w
            if ctx.needs_input_grad[0]:
                grad_x = (grad_xm if cols is None else grad_xm * cols.to(dt)).to(x.dtype)
            if ctx.needs_input_grad[3]:
                grad_cols = (grad_xm.to(acc) * x.to(acc)).reshape(-1, x.shape[-1]).sum(0).to(cols.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[4]:
            grad_wfold = (g2.t() @ xm.reshape(-1, xm.shape[-1])).to(acc)  # d loss / d (W * rows)
            if ctx.needs_input_grad[1]:
                grad_w = (grad_wfold if rows is None else grad_wfold * rows.to(acc)[:, None]).to(weight.dtype)
            if ctx.needs_input_grad[4]:
                grad_rows = (grad_wfold * weight.to(acc)).sum(1)
        if bias is not None and (ctx.needs_input_grad[2] or ctx.needs_input_grad[4]):
            gsum = g2.to(acc).sum(0)
            if ctx.needs_input_grad[2]:
                grad_b = (gsum if rows is None else gsum * rows.to(acc)).to(bias.dtype)
            if ctx.needs_input_grad[4]:
                grad_rows = grad_rows + gsum * bias.to(acc)
        if grad_rows is not None:
            grad_rows = grad_rows.to(rows.dtype)
        return grad_x, grad_w, grad_b, grad_cols, grad_rows


def masked_linear(x: torch.Tensor, linear: nn.Linear, cols: torch.Tensor | None = None,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """linear(x * cols) * rows without storing a masked copy of any activation (see _MaskedLinear)."""
    if cols is None and rows is None:
        return linear(x)
    return _MaskedLinear.apply(x, linear.weight, linear.bias, cols, rows)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """RoPE over the first cos.shape[-1] dims of each head (partial rotary: Phi-3's partial_rotary_factor, GPT-NeoX's
    rotary_pct); the rest pass through."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot = x[..., :r]
    return torch.cat((rot * cos + rotate_half(rot) * sin, x[..., r:]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, use_flash: bool = False, layer_idx: int = 0):
        super().__init__()
        d, hd = config.hidden_size, head_dim_of(config)
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, kv_heads_of(config), hd
        qkv_bias, o_bias = attention_biases(config)
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=o_bias)
        gemma = is_gemma(config)
        if qk_norm(config):  # Qwen3, Gemma 3: over head_dim, which pruning never changes, so masks leave them alone
            norm = GemmaRMSNorm if gemma else RMSNorm
            self.q_norm = norm(hd, config.rms_norm_eps)
            self.k_norm = norm(hd, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        window = getattr(config, "sliding_window", None)
        if config.model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
            window = None
        if gemma:  # per layer: config.layer_types (sliding_attention / full_attention)
            window = window if sliding_layer(config, layer_idx) else None
        self.sliding_window = window
        # Gemma: scores scaled by query_pre_attn_scalar**-0.5 (not head_dim's) and soft-capped (Gemma 2)
        self.scaling = config.query_pre_attn_scalar ** -0.5 if gemma else None
        self.softcap = getattr(config, "attn_logit_softcapping", None) if gemma else None
        self.use_flash = use_flash

    def forward(self, x, cos, sin, head_mask=None, out_scale=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        window = self.sliding_window if self.sliding_window and T > self.sliding_window else None
        if self.use_flash and not self.softcap and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            out = flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, softmax_scale=self.scaling,
                window_size=(window - 1, 0) if window else (-1, -1),
            )  # (B, T, H, hd)
        else:
            mask = None
            i = torch.arange(T, device=x.device)
            if window or self.softcap:
                mask = i[None, :] <= i[:, None]
            if window:
                mask = mask & (i[:, None] - i[None, :] < window)
            if self.softcap:  # Gemma 2: the eager math (no fused kernel soft-caps the scores)
                out = eager_attention(q, k, v, self.scaling, self.softcap, mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                     enable_gqa=True, scale=self.scaling)
                out = out.transpose(1, 2)
        cols = None if head_mask is None else head_mask.repeat_interleave(self.head_dim)  # a gate per head
        return masked_linear(out.reshape(B, T, -1), self.o_proj, cols, out_scale)


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        d, i, bias = config.hidden_size, config.intermediate_size, mlp_bias(config)
        # GPT-NeoX's MLP is not gated: up_proj / down_proj hold dense_h_to_4h / dense_4h_to_h (model/layouts.py)
        self.gate_proj = nn.Linear(d, i, bias=bias) if gated_mlp(config) else None
        self.up_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)
        # Gemma: GELU with the tanh approximation (hidden_activation gelu_pytorch_tanh); GPT-NeoX: its hidden_act, not
        # gated; the others: SiLU (SwiGLU)
        self.act = ((lambda t: F.gelu(t, approximate="tanh")) if is_gemma(config) else F.silu if gated_mlp(config)
                    else ACT2FN[config.hidden_act])

    def forward(self, x, intermediate_mask=None, out_scale=None):
        h = self.act(self.up_proj(x)) if self.gate_proj is None else self.act(self.gate_proj(x)) * self.up_proj(x)
        return masked_linear(h, self.down_proj, intermediate_mask, out_scale)


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, use_flash: bool = False, layer_idx: int = 0):
        super().__init__()
        self.self_attn = Attention(config, use_flash, layer_idx)
        self.mlp = MLP(config)
        self.gemma = is_gemma(config)
        # Gemma 3: sliding layers take RoPE of rope_local_base_freq (DecoderLM.layer_ropes)
        self.local_rope = config.model_type == "gemma3_text" and sliding_layer(config, layer_idx)
        if self.gemma:
            self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
            # Gemma: post_attention_layernorm is after attention; the MLP has a norm on each side
            self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        else:
            self.input_layernorm = make_norm(config, config.hidden_size)
            self.post_attention_layernorm = make_norm(config, config.hidden_size)
        # GPT-NeoX: attention and MLP both read the layer's input and add to it (use_parallel_residual)
        self.parallel = config.model_type == "gpt_neox" and config.use_parallel_residual

    def forward(self, x, cos, sin, layer_gate=None, head_mask=None, intermediate_mask=None, hidden=None, kept=None):
        # Residual writes are scaled by the layer gate and zero in pruned hidden dims: one (d,) vector, applied
        # by the output projections (to their weight rows or outputs, see masked_linear).
        write = hidden if layer_gate is None else layer_gate * (hidden if hidden is not None else x.new_ones(x.shape[-1]))
        if self.gemma:
            return self._gemma_forward(x, cos, sin, write, head_mask, intermediate_mask, hidden, kept)
        attn = self.self_attn(self.input_layernorm(x, kept, hidden), cos, sin, head_mask, write)
        if self.parallel:
            return x + attn + self.mlp(self.post_attention_layernorm(x, kept, hidden), intermediate_mask, write)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x, kept, hidden), intermediate_mask, write)

    def _gemma_forward(self, x, cos, sin, write, head_mask, intermediate_mask, hidden, kept):
        """Gemma's sandwich: x + post_norm(block(pre_norm(x))). A post-norm's RMS must see what the sliced model's
        o_proj / down_proj give, so their pruned output rows are zeroed by a 0/1 gate (no scaling: the RMS would undo
        part of it) and the post-norm averages over the kept dims; the write gates (layer gate x hidden gate) scale
        the post-norm's output, the residual write, as the output projections' rows do for Llama. The export slices
        the projections and folds the write gates into the post-norms' (1 + weight)."""
        rows = None if hidden is None else (hidden > 0).to(hidden.dtype)
        a = self.self_attn(self.input_layernorm(x, kept), cos, sin, head_mask, rows)
        x = x + self.post_attention_layernorm(a, kept, write)
        m = self.mlp(self.pre_feedforward_layernorm(x, kept), intermediate_mask, rows)
        return x + self.post_feedforward_layernorm(m, kept, write)


class Backbone(nn.Module):
    def __init__(self, config: PretrainedConfig, use_flash: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, use_flash, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps) if is_gemma(config) else \
            make_norm(config, config.hidden_size)


ATTN_IMPLS = ("auto", "sdpa", "flash")


def resolve_attn_impl(attn_impl: str) -> bool:
    """'sdpa' never uses flash-attn; 'flash' requires it; 'auto' uses it when installed (on CUDA, half
    precision, decided per call)."""
    if attn_impl not in ATTN_IMPLS:
        raise ConfigError(f"model.attn_impl must be auto, sdpa or flash, got '{attn_impl}'")
    if attn_impl == "flash" and flash_attn_func is None:
        raise ConfigError("model.attn_impl=flash needs flash-attn, which is not importable here: "
                          "pip install 'llmshearing[gpu]' on a CUDA machine, or set model.attn_impl=auto / sdpa")
    return attn_impl != "sdpa" and flash_attn_func is not None


def attention_kernel(attn_impl: str, device: str, precision: str) -> str:
    """The kernel a training run will use, in words (logged once at start)."""
    half = precision in ("amp_bf16", "amp_fp16")
    if resolve_attn_impl(attn_impl) and device == "gpu" and half:
        return f"flash-attn {getattr(flash_attn, '__version__', '?')} (model.attn_impl={attn_impl})"
    why = ("model.attn_impl=sdpa" if attn_impl == "sdpa" else "flash-attn is not installed" if flash_attn_func is None
           else "flash-attn runs only on CUDA in bf16/fp16")
    return f"torch scaled_dot_product_attention ({why})"


class DecoderLM(nn.Module):
    """Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 / Phi-3 / GPT-NeoX causal LM. `forward(input_ids, masks)`
    returns logits."""

    def __init__(self, config: PretrainedConfig, attn_impl: str = "auto"):
        super().__init__()
        self.config = config
        self.model = Backbone(config, resolve_attn_impl(attn_impl))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    # Composer's FSDP asks each child of the ComposerModel (this module), not the ComposerModel itself:
    # every decoder layer is its own FSDP unit, checkpointed at the same boundary when asked.
    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        return isinstance(module, DecoderLayer)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        return isinstance(module, DecoderLayer)

    def tie_weights(self) -> None:
        """One tensor for embedding and head when the config ties them (call again after `to_empty`,
        which allocates a separate tensor for each)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, T: int, dtype, device, config: PretrainedConfig | None = None):
        # Recomputed per call (cheap) rather than a buffer, so meta-device init and FSDP need no care.
        config = config or self.config
        scaling = getattr(config, "rope_scaling", None) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        # longrope (Phi-3) takes its long factors past original_max_position_embeddings, as transformers does
        extra = {"seq_len": T} if rope_type == "longrope" else {}
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, device, **extra)
        pos = torch.arange(T, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def layer_ropes(self, T: int, dtype, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) of every layer: one pair for all, except Gemma 3's sliding layers, whose RoPE has base
        rope_local_base_freq and no scaling (HF Gemma3TextModel.rotary_emb_local)."""
        full = self.rope(T, dtype, device)
        if not any(layer.local_rope for layer in self.model.layers):
            return [full] * len(self.model.layers)
        local_config = copy.copy(self.config)
        local_config.rope_theta, local_config.rope_scaling = self.config.rope_local_base_freq, {"rope_type": "default"}
        local = self.rope(T, dtype, device, local_config)
        return [local if layer.local_rope else full for layer in self.model.layers]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows; Gemma's times sqrt(hidden_size), the normalizer in the rows' dtype as HF computes it
        (bf16 weights round sqrt(3072) = 55.43 to 55.5). A pruned export keeps the
        source's factor: finalize folds sqrt(source hidden) / sqrt(kept hidden) into the embedding."""
        x = self.model.embed_tokens(input_ids)
        if is_gemma(self.config):
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        return x

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """lm_head, then Gemma 2's final soft-cap tanh(logits / c) * c (final_logit_softcapping)."""
        logits = self.lm_head(hidden_states)
        cap = getattr(self.config, "final_logit_softcapping", None) if is_gemma(self.config) else None
        return torch.tanh(logits / cap) * cap if cap else logits

    def forward(self, input_ids: torch.Tensor, masks: Masks | None = None) -> torch.Tensor:
        m = masks or Masks()
        x = self.embed(input_ids)
        if m.hidden is not None:
            x = x * m.hidden.to(x.dtype)
        ropes = self.layer_ropes(input_ids.shape[1], x.dtype, x.device)
        for i, layer in enumerate(self.model.layers):
            gate = None if m.layer is None else m.layer[i]
            # A closed layer is skipped only at test time: in training every rank must run every
            # layer (FSDP all-gathers per layer), and the gate's gradient is zero there anyway.
            if gate is not None and not self.training and float(gate) == 0.0:
                continue
            x = layer(
                x, *ropes[i], gate,
                None if m.head is None else m.head[i],
                None if m.intermediate is None else m.intermediate[i],
                m.hidden, norm_mask(m),
            )
        # GPT-NeoX's final LayerNorm takes the hidden mask (zero in pruned dims); Gemma's third argument is a scale
        return self.logits(self.model.norm(x, m.hidden_kept, m.hidden) if layer_norm(self.config)
                           else self.model.norm(x, norm_mask(m)))


@dataclass
class Masks:
    """What the model multiplies in its forward. None means that structure is not pruned. The masks' values come
    from `pruning.masks.L0Module`; the type lives here so the model does not depend on how masks are learned."""

    layer: torch.Tensor | None = None  # (L,)
    hidden: torch.Tensor | None = None  # (d,)
    hidden_kept: int | torch.Tensor | None = None  # dims RMSNorm averages over
    head: torch.Tensor | None = None  # (L, H): kv-group gate x in-group query gate
    intermediate: torch.Tensor | None = None  # (L, I)
    norm_gate: torch.Tensor | None = None  # (d,) gate on every RMSNorm output (`hidden_mask: original`), else None
