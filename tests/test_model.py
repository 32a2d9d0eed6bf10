import json
import os

import pytest
import torch
from conftest import FAMILIES
from transformers import AutoConfig, AutoModelForCausalLM

from llmshearing.model.hf import head_dim_of, is_gemma, layer_norm, reference_attention
from llmshearing.pruning.shapes import param_count, Shape, shape_of
from llmshearing.pruning.masks import L0Module
from llmshearing.model.decoder import DecoderLM
from llmshearing.pruning.export import finalize, save_hf
from llmshearing.experiments.tiny import random_model

TOL = 1e-4  # fp32 logits of magnitude ~1: differences come from summation order only (seen: < 1e-6)
TARGETS = {  # every structure shrinks; GQA targets keep num_heads divisible by num_kv_heads
    "llama-mha": Shape(3, 48, 2, 2, 64),
    "smollm2-gqa": Shape(3, 48, 2, 1, 64),  # 6/2 -> 2/1: drops a group and a query head per group
    "mistral": Shape(3, 40, 2, 1, 48),
    "qwen2": Shape(2, 32, 2, 1, 80),
    "qwen3": Shape(3, 48, 2, 1, 64),  # head_dim 32: attention 2 x 32 = 64 wide in a 48-wide model
    "gemma2": Shape(3, 48, 2, 1, 64),  # dropping a layer leaves a non-alternating layer_types (exported)
    "gemma3": Shape(3, 40, 2, 1, 64),
    "phi3": Shape(3, 40, 2, 1, 64),  # head_dim 16: 2 x 16 = 32 wide in a 40-wide model
    "pythia": Shape(3, 48, 3, 3, 64),  # GPT-NeoX: hidden = heads x head_dim 16, KV heads = heads
}


def ours(hf) -> DecoderLM:
    from llmshearing.model.layouts import decoder_state

    lm = DecoderLM(hf.config, attn_impl="sdpa")
    lm.load_state_dict(decoder_state(hf.config, hf.state_dict()), strict=True)  # Phi-3 / NeoX: fused ones split
    return lm.eval()


# Variants of the tiny families the family list does not cover: sequential GPT-NeoX residual, GPT-NeoX with tied
# embeddings (the final LayerNorm's weight and bias undo the hidden gate), Phi-3 with longrope and tied embeddings
# as Phi-4-mini (original_max_position_embeddings 16 < 40 tokens: the long factors)
VARIANTS = {
    "pythia-sequential": ("pythia", dict(use_parallel_residual=False)),
    "pythia-tied": ("pythia", dict(tie_word_embeddings=True)),
    "phi3-longrope": ("phi3", dict(rope_scaling={"type": "su", "short_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5],
                                                  "long_factor": [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]},
                                   original_max_position_embeddings=16, max_position_embeddings=64,
                                   tie_word_embeddings=True)),
}


def model_of(name: str):
    """The random HF model of a family or of a VARIANTS entry."""
    family, overrides = VARIANTS.get(name, (name, {}))
    return random_model(family, **overrides)


MODELS = FAMILIES + list(VARIANTS)


@pytest.mark.parametrize("family", MODELS)
def test_matches_transformers(family):
    hf = model_of(family)
    ids = torch.randint(0, hf.config.vocab_size, (2, 40))  # 40 > mistral's sliding window of 24
    with torch.no_grad():
        logits = ours(hf)(ids)
        torch.testing.assert_close(logits, hf(ids).logits, atol=TOL, rtol=0)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        torch.testing.assert_close(loss, hf(ids, labels=ids).loss, atol=TOL, rtol=0)


def random_masks(l0: L0Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in l0.masks.values():
            m.log_alpha.copy_(torch.randn(m.shape, generator=g) * 2 + 1)  # some kept values below 1


@pytest.mark.parametrize("hidden_mask", ["residual", "original"])
@pytest.mark.parametrize("family", MODELS)
def test_masked_equals_sliced_equals_reloaded_export(family, hidden_mask, tmp_path):
    hf = model_of(family)
    if hidden_mask == "original" and (is_gemma(hf.config) or layer_norm(hf.config)):
        pytest.skip("pruning.hidden_mask=original is for RMSNorm families (config refuses it for this one)")
    lm = ours(hf)
    target = TARGETS[VARIANTS[family][0] if family in VARIANTS else family]
    if family == "phi3-longrope":  # transformers checks longrope's factors against hidden // heads = head_dim
        target = Shape(3, 32, 2, 1, 64)
    l0 = L0Module(shape_of(hf.config), target, eval_target_model=True, hidden_mask=hidden_mask).eval()  # the export's
    random_masks(l0, seed=3)
    ids = torch.randint(0, hf.config.vocab_size, (2, 40))
    with torch.no_grad():
        masked = lm(ids, l0())
        pruned, kept = finalize(lm, l0)
        sliced = pruned(ids)
    torch.testing.assert_close(sliced, masked, atol=TOL, rtol=0)
    assert masked.abs().max() > 0.1  # not trivially zero
    if hidden_mask == "original":  # the gate on the norm outputs changes the function (kept gates are < 1 here)
        l0.hidden_mask = "residual"
        with torch.no_grad():
            assert (lm(ids, l0()) - masked).abs().max() > 1e-2
        l0.hidden_mask = hidden_mask

    save_hf(pruned, str(tmp_path / "export"), kept=kept)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), **reference_attention(hf.config)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, masked, atol=TOL, rtol=0)

    with open(tmp_path / "export" / "config.json") as f:
        exported = json.load(f)
    assert shape_of(reloaded.config) == target
    assert exported["model_type"] == hf.config.model_type and type(reloaded) is type(hf)
    assert exported["head_dim"] == head_dim_of(hf.config)
    assert sum(p.numel() for p in reloaded.parameters()) == param_count(target, hf.config)
    assert [len(h) for h in kept["heads"]] == [target.num_attention_heads] * target.num_hidden_layers
    assert [len(i) for i in kept["intermediate"]] == [target.intermediate_size] * target.num_hidden_layers
    assert os.path.exists(tmp_path / "export" / "pruning.json")


def test_kept_heads_belong_to_kept_groups():
    hf = random_model("smollm2-gqa")
    l0 = L0Module(shape_of(hf.config), TARGETS["smollm2-gqa"], eval_target_model=True).eval()
    random_masks(l0, seed=5)
    _, kept = finalize(ours(hf), l0)
    per_group = hf.config.num_attention_heads // hf.config.num_key_value_heads
    for heads, groups in zip(kept["heads"], kept["kv_heads"]):
        assert sorted({h // per_group for h in heads}) == groups
        assert all(sum(h // per_group == g for h in heads) == 2 for g in groups)  # same count per group


@pytest.mark.parametrize("family", MODELS)
def test_param_count_matches_model(family):
    hf = model_of(family)
    assert param_count(shape_of(hf.config), hf.config) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_keeps_tied_embeddings_one_tensor(family, tmp_path):
    from llmshearing.model.loading import from_pretrained

    hf = random_model(family)
    hf.save_pretrained(tmp_path)
    lm = from_pretrained(str(tmp_path), attn_impl="sdpa")
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == hf.config.tie_word_embeddings
    unique = {id(p): p for p in lm.parameters()}.values()
    assert sum(p.numel() for p in unique) == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, hf.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids), hf(ids).logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("gates", ["cols", "rows", "both"])
@pytest.mark.parametrize("bias", [False, True])
def test_masked_linear_equals_masking_the_activations(gates, bias):
    """masked_linear (row gates folded into the weight, x * cols recomputed in backward instead of stored) gives
    linear(x * cols) * rows and the same gradients for x, weight, bias and both gate vectors."""
    from llmshearing.model.decoder import masked_linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 16, bias=bias).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    cols = torch.rand(24, dtype=torch.float64, requires_grad=True) if gates != "rows" else None
    rows = torch.rand(16, dtype=torch.float64, requires_grad=True) if gates != "cols" else None
    leaves = [t for t in (x, cols, rows, linear.weight, linear.bias) if t is not None]
    grad_out = torch.randn(2, 5, 16, dtype=torch.float64)

    def run(fn):
        for t in leaves:
            t.grad = None
        y = fn()
        y.backward(grad_out)
        return [y.detach()] + [t.grad.clone() for t in leaves]

    reference = run(lambda: linear(x if cols is None else x * cols) * (1 if rows is None else rows))
    for a, b in zip(run(lambda: masked_linear(x, linear, cols, rows)), reference):
        torch.testing.assert_close(a, b)


def test_unsupported_families_are_refused_naming_what_they_need():
    from transformers import AutoConfig

    from llmshearing.errors import ConfigError
    from llmshearing.experiments.tiny import tiny_config
    from llmshearing.model.hf import SUPPORTED_MODEL_TYPES, check_source_config

    assert {"phi3", "gpt_neox"} <= set(SUPPORTED_MODEL_TYPES)
    for model_type in ("falcon", "gpt2"):
        with pytest.raises(ConfigError, match=f"model_type '{model_type}' is not supported; supported LLaMA-family "
                                              f"types: {', '.join(SUPPORTED_MODEL_TYPES)} \\(a new family needs"):
            check_source_config(AutoConfig.for_model(model_type))
    # Gemma 2 / Gemma 3 text are read (Gemma 1, model_type gemma, is not: no post-norms)
    check_source_config(tiny_config("gemma2"))
    check_source_config(tiny_config("gemma3"))
    with pytest.raises(ConfigError, match="gemma2: hidden_activation 'gelu' is not supported"):
        check_source_config(tiny_config("gemma2", hidden_activation="gelu"))
    # Qwen's per-layer windows (full attention below max_window_layers) are not what the decoder computes
    with pytest.raises(ConfigError, match="use_sliding_window with full-attention layers below max_window_layers=2"):
        check_source_config(tiny_config("qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=2))
    check_source_config(tiny_config("qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=0))


def test_pythia_checkpoint_buffers_are_ignored(tmp_path):
    """Pythia's released safetensors hold attention.bias / masked_bias / rotary inv_freq buffers beside the weights:
    from_pretrained (and the weights check) skip them as transformers does."""
    from safetensors.torch import load_file, save_file

    from llmshearing.model.loading import from_pretrained

    hf = random_model("pythia")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8)
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, hf.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(str(tmp_path), attn_impl="sdpa")(ids), hf(ids).logits, atol=TOL,
                                   rtol=0)


def test_gpt_neox_and_phi3_target_rules():
    """GPT-NeoX's config has no head_dim or KV heads: hidden follows heads x head_dim, KV heads follow the heads (a
    target may leave them out); Phi-3 with longrope keeps hidden // heads = head_dim; each refusal is one line."""
    from llmshearing.errors import ConfigError
    from llmshearing.pruning.target import resolve_target

    neox = random_model("pythia").config
    assert resolve_target({"num_attention_heads": 3, "hidden_size": 48}, neox) == Shape(4, 48, 3, 3, 96)
    with pytest.raises(ConfigError, match="target keeps 2 query heads per KV group but the source has only 1"):
        resolve_target({"num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 32}, neox)
    with pytest.raises(ConfigError, match="hidden_size must be num_attention_heads x 16 = 48, got 40"):
        resolve_target({"num_attention_heads": 3, "hidden_size": 40}, neox)
    solved = resolve_target({"params_fraction": 0.5}, neox)  # the budget solver keeps hidden = heads x head_dim
    assert solved.hidden_size == 16 * solved.num_attention_heads == 16 * solved.num_key_value_heads
    longrope = model_of("phi3-longrope").config
    with pytest.raises(ConfigError, match="phi3 with rope_scaling"):
        resolve_target({"hidden_size": 40, "num_attention_heads": 2, "num_key_value_heads": 1}, longrope)
    assert resolve_target({"hidden_size": 40, "num_attention_heads": 2, "num_key_value_heads": 1},
                          random_model("phi3").config).hidden_size == 40  # no rope scaling: any hidden size


# family -> (target overrides of prune_tiny.yaml's 3/48/2/1/64, the exported shape, a layer-0 weight continued
# pretraining must change, or None: no continued pretraining, which runs no family-specific code for Phi-3);
# GPT-NeoX keeps hidden = heads x head_dim 16 and KV heads = heads, and its continued model's config has no KV heads
END_TO_END = {
    "qwen3": ([], Shape(3, 48, 2, 1, 64), "model.layers.0.mlp.up_proj.weight"),
    "gemma2": ([], Shape(3, 48, 2, 1, 64), "model.layers.0.mlp.up_proj.weight"),
    # continued pretraining of a dense Gemma export is gemma2's run; not repeated (slow-test time)
    "gemma3": ([], Shape(3, 48, 2, 1, 64), None),
    "phi3": ([], Shape(3, 48, 2, 1, 64), None),
    "pythia": (["pruning.target.num_attention_heads=3", "pruning.target.num_key_value_heads=3"],
               Shape(3, 48, 3, 3, 64), "gpt_neox.layers.0.attention.query_key_value.weight"),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(END_TO_END))  # the families the other end-to-end tests (smollm2-gqa) do not run
def test_family_end_to_end_through_composer(family, tmp_path):
    """make-tiny --family, prune with the real Composer launcher to the target, the export loads as the same HF
    family (Qwen3: q_norm / k_norm copied; Phi-3 / GPT-NeoX: projections fused again) and equals the checkpoint's
    masked model, then continued pretraining of the export trains and exports again (Gemma 2: soft-capped eager
    attention, post-norm gates, Gemma 3: two RoPE bases, q/k norms; the Gemma exports are read with transformers'
    eager attention, its reference)."""
    from conftest import BIN, CONTINUE_YAML, TINY_YAML, paths, run

    from llmshearing.train.restore import load_checkpoint

    setup = {"model": str(tmp_path / "tiny" / "model"), "shards": str(tmp_path / "tiny" / "shards")}
    made = run([os.path.join(BIN, "llmshearing"), "make-tiny", str(tmp_path / "tiny"), "--family", family])
    assert made.returncode == 0, made.stderr[-3000:]
    folder = str(tmp_path / "prune")
    overrides, expected, changed = END_TO_END[family]
    proc = run([os.path.join(BIN, "composer"), "train.py", TINY_YAML, *paths(setup, folder), "max_duration=12ba",
                "eval_interval=6ba", "save_interval=12ba", "data.num_workers=0", *overrides], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    export = os.path.join(folder, "export")
    hf = AutoModelForCausalLM.from_pretrained(export, **reference_attention(AutoConfig.from_pretrained(export))).eval()
    source = AutoModelForCausalLM.from_pretrained(setup["model"])
    assert type(hf) is type(source) and hf.config.model_type == source.config.model_type
    assert shape_of(hf.config) == expected
    ids = torch.randint(0, hf.config.vocab_size, (2, 32))
    _, masked = load_checkpoint(os.path.join(folder, "ep0-ba12-rank0.pt"))
    with torch.no_grad(), masked.l0.target_masks():
        torch.testing.assert_close(hf(ids).logits, masked({"input_ids": ids}), atol=TOL, rtol=0)
    if family == "qwen3":  # the norms over head_dim come through untouched (trained, then copied)
        kept = json.load(open(os.path.join(export, "pruning.json")))["layers"]
        for new, old in enumerate(kept):
            torch.testing.assert_close(hf.model.layers[new].self_attn.q_norm.weight,
                                       masked.model.model.layers[old].self_attn.q_norm.weight.detach(), atol=0, rtol=0)
    if changed is None:
        return
    cont = str(tmp_path / "continue")
    proc = run([os.path.join(BIN, "composer"), "train.py", CONTINUE_YAML, f"model.path={export}",
                f"data.shards={setup['shards']}", f"save_folder={cont}", f"export_dir={cont}/export",
                f"data.proportions={folder}/domain_weights.json", "max_duration=6ba", "eval_interval=6ba",
                "save_interval=6ba", "data.num_workers=0", "progress_bar=false", "log_to_console=false"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = AutoModelForCausalLM.from_pretrained(os.path.join(cont, "export"))
    assert type(again) is type(source) and shape_of(again.config) == shape_of(hf.config)
    assert not torch.equal(again.state_dict()[changed], hf.state_dict()[changed])


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_matches_transformers_eager_and_each_feature_matters(family):
    """Logits and loss equal transformers' eager Gemma (the reference: its SDPA path drops the attention soft-cap)
    over 40 tokens, longer than the tiny sliding window (16); each Gemma feature the decoder implements changes
    transformers' logits here (so the parity would catch its absence): windowing, query_pre_attn_scalar, the
    soft-caps (Gemma 2), the local RoPE base (Gemma 3)."""
    import copy

    from llmshearing.model.distill import lm_loss

    hf = random_model(family)
    ids = torch.randint(0, hf.config.vocab_size, (2, 40))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    with torch.no_grad():
        ref = hf(ids, labels=ids)
        logits = ours(hf)(ids)
        torch.testing.assert_close(logits, ref.logits, atol=TOL, rtol=0)
        torch.testing.assert_close(lm_loss(logits, labels), ref.loss, atol=1e-5, rtol=0)
        if family == "gemma3":  # no soft-cap: transformers' SDPA path is the same model (ours runs SDPA for it)
            from llmshearing.compat import set_attn_implementation

            sdpa = type(hf)(copy.deepcopy(hf.config)).eval()
            set_attn_implementation(sdpa.config, "sdpa")
            sdpa.load_state_dict(hf.state_dict())
            torch.testing.assert_close(sdpa(ids).logits, logits, atol=TOL, rtol=0)
        assert hf.config.layer_types[:2] == ["sliding_attention", "full_attention"]
        changes = {"sliding_window": 64, "query_pre_attn_scalar": hf.config.head_dim}
        if family == "gemma2":
            changes.update(attn_logit_softcapping=None, final_logit_softcapping=None)
        else:
            changes.update(rope_local_base_freq=hf.config.rope_theta)
        for key, value in changes.items():
            config = copy.deepcopy(hf.config)
            setattr(config, key, value)
            other = type(hf)(config).eval()
            other.load_state_dict(hf.state_dict())
            assert (other(ids).logits - ref.logits).abs().max() > 1e-2, key


def test_gemma_export_keeps_each_kept_layers_attention_type(tmp_path):
    """Dropping layers breaks Gemma's sliding/full alternation: the export writes the kept layers' own types."""
    hf = random_model("gemma2")
    l0 = L0Module(shape_of(hf.config), Shape(2, 64, 4, 2, 96), eval_target_model=True).eval()
    with torch.no_grad():
        l0.masks["layer"].log_alpha.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0]))  # keep layers 0 and 2 (sliding)
        pruned, kept = finalize(ours(hf), l0)
    assert kept["layers"] == [0, 2] and pruned.config.layer_types == ["sliding_attention"] * 2
    save_hf(pruned, str(tmp_path / "export"), kept=kept)
    with open(tmp_path / "export" / "config.json") as f:
        assert json.load(f)["layer_types"] == ["sliding_attention"] * 2
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), **reference_attention(hf.config))
    ids = torch.randint(0, hf.config.vocab_size, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_block_influence_reads_transformers_hidden_states(family):
    """oneshot's layer-by-layer pass (block influence, `pruning.init: activation`) embeds and ropes as the model does
    (sqrt(hidden) scaling, Gemma 3's local RoPE base): its scores are those of transformers' per-layer hidden states."""
    from llmshearing.pruning.oneshot import block_influence

    hf = random_model(family)
    ids = torch.randint(0, hf.config.vocab_size, (2, 40))
    with torch.no_grad():
        hs = hf(ids, output_hidden_states=True).hidden_states  # the layers' inputs, then the final norm's output
        want = torch.stack([1 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()
                            for a, b in zip(hs[:-2], hs[1:-1])])
        got = block_influence(ours(hf), ids)
    torch.testing.assert_close(got[:-1], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_embedding_normalizer_rounds_as_transformers(family):
    """sqrt(hidden_size) in the embedding's dtype, as transformers computes it: in bf16, sqrt(72) = 8.485 is 8.5."""
    from transformers import AutoModelForCausalLM

    from llmshearing.experiments.tiny import tiny_config

    config = tiny_config(family, hidden_size=72)
    hf = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16, **reference_attention(config)).eval()
    lm = DecoderLM(hf.config, attn_impl="sdpa").to(torch.bfloat16)
    lm.load_state_dict(hf.state_dict())
    ids = torch.randint(0, config.vocab_size, (1, 8))
    with torch.no_grad():
        want = hf(ids, output_hidden_states=True).hidden_states[0]
        got = lm.embed(ids)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert torch.equal(got, lm.model.embed_tokens(ids) * 8.5)


def test_eval_loads_gemma_with_its_reference_attention(tmp_path):
    """`llmshearing eval` reads a Gemma 2 folder with transformers' eager attention: its default SDPA path would drop
    the attention soft-cap, and the losses would not be the model's."""
    from llmshearing.eval.evaluate import load_model

    hf = random_model("gemma2")
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(0, hf.config.vocab_size, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(hf)(ids), atol=TOL, rtol=0)
