"""One-shot pruning: exactly the target config, the highest-scoring units (magnitude, activation), the source's weights unscaled."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmshearing.pruning.oneshot import oneshot_prune

TARGET = {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
          "intermediate_size": 64}


def top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.argsort(scores, descending=True, stable=True)[:k].tolist())


def test_oneshot_keeps_the_largest_units_with_the_target_shape(tiny_setup, tmp_path):
    source = AutoModelForCausalLM.from_pretrained(tiny_setup["model"]).eval()
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    cfg = source.config
    hd = cfg.head_dim
    # Plant units that must win or lose, so the test fails if scores are read from the wrong axis.
    sd["model.layers.1.mlp.up_proj.weight"][7] *= 20    # intermediate unit 7 of layer 1: kept
    sd["model.layers.1.mlp.gate_proj.weight"][3] *= 0   # unit 3 of layer 1: dropped
    sd["model.layers.1.mlp.up_proj.weight"][3] *= 0
    sd["model.layers.1.mlp.down_proj.weight"][:, 3] *= 0
    sd["model.layers.2.mlp.down_proj.weight"] *= 0.01   # layer 2 writes almost nothing: dropped
    sd["model.layers.2.self_attn.o_proj.weight"] *= 0.01
    sd["model.embed_tokens.weight"][:, 5] *= 30          # hidden dim 5: kept
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied: one tensor
    planted = str(tmp_path / "planted")
    source.load_state_dict(sd)
    source.save_pretrained(planted)
    from llmshearing.data.tokenizer import load_tokenizer
    load_tokenizer(tiny_setup["model"]).save_pretrained(planted)

    out = str(tmp_path / "oneshot")
    kept = oneshot_prune(planted, TARGET, out)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert {k: config[k] for k in TARGET} == TARGET and config["head_dim"] == hd
    with open(os.path.join(out, "pruning.json")) as f:
        assert json.load(f)["layers"] == kept["layers"]

    # Scores computed here independently of llmshearing.pruning.oneshot, straight from the HF state dict.
    sq = lambda w: w.float().pow(2)  # noqa: E731
    L, H, KV = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    layer = torch.stack([sq(sd[f"model.layers.{l}.self_attn.o_proj.weight"]).sum()
                         + sq(sd[f"model.layers.{l}.mlp.down_proj.weight"]).sum() for l in range(L)])
    assert kept["layers"] == top(layer, 3) and 2 not in kept["layers"]
    hidden = sq(sd["model.embed_tokens.weight"]).sum(0)
    for l in range(L):
        p = f"model.layers.{l}."
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            hidden += sq(sd[p + n + ".weight"]).sum(0)
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            hidden += sq(sd[p + n + ".weight"]).sum(1)
    assert kept["hidden"] == top(hidden, 48) and 5 in kept["hidden"]
    for new, l in enumerate(kept["layers"]):
        p = f"model.layers.{l}."
        inter = (sq(sd[p + "mlp.gate_proj.weight"]).sum(1) + sq(sd[p + "mlp.up_proj.weight"]).sum(1)
                 + sq(sd[p + "mlp.down_proj.weight"]).sum(0))
        assert kept["intermediate"][new] == top(inter, 64)
        q = torch.stack([sq(sd[p + "self_attn.q_proj.weight"][h * hd:(h + 1) * hd]).sum()
                         + sq(sd[p + "self_attn.o_proj.weight"][:, h * hd:(h + 1) * hd]).sum() for h in range(H)])
        group = torch.stack([sq(sd[p + "self_attn.k_proj.weight"][g * hd:(g + 1) * hd]).sum()
                             + sq(sd[p + "self_attn.v_proj.weight"][g * hd:(g + 1) * hd]).sum()
                             + q[g * (H // KV):(g + 1) * (H // KV)].sum() for g in range(KV)])
        g = top(group, 1)
        assert kept["kv_heads"][new] == g
        in_group = q[g[0] * (H // KV):(g[0] + 1) * (H // KV)]
        assert kept["heads"][new] == [g[0] * (H // KV) + r for r in top(in_group, 2)]
    assert 1 in kept["layers"]
    new1 = kept["layers"].index(1)
    assert 7 in kept["intermediate"][new1] and 3 not in kept["intermediate"][new1]

    # The export holds the source's weights sliced, not scaled by gate values.
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    d = torch.tensor(kept["hidden"])
    i = torch.tensor(kept["intermediate"][new1])
    got = pruned.state_dict()
    torch.testing.assert_close(got[f"model.layers.{new1}.mlp.gate_proj.weight"],
                               sd["model.layers.1.mlp.gate_proj.weight"][i][:, d], atol=0, rtol=0)
    torch.testing.assert_close(got[f"model.layers.{new1}.mlp.down_proj.weight"],
                               sd["model.layers.1.mlp.down_proj.weight"][d][:, i], atol=0, rtol=0)
    torch.testing.assert_close(got["model.embed_tokens.weight"], sd["model.embed_tokens.weight"][:, d], atol=0, rtol=0)
    torch.testing.assert_close(got["model.norm.weight"], sd["model.norm.weight"][d], atol=0, rtol=0)


def test_activation_scores_follow_what_units_contribute(tiny_setup, tmp_path):
    """Block influence matches HF's hidden states; a unit that writes nothing is dropped, a loud one kept."""
    from llmshearing.data.layout import DomainSequences
    from llmshearing.model.loading import from_pretrained
    from llmshearing.pruning.oneshot import activation_scores, block_influence

    calib = torch.stack([DomainSequences(tiny_setup["shards"], d, "prune")[i]["input_ids"]
                         for d in ("prose", "code") for i in range(4)])
    source = AutoModelForCausalLM.from_pretrained(tiny_setup["model"]).eval()
    with torch.no_grad():
        hs = source(calib, output_hidden_states=True).hidden_states  # inputs of layers 0..L-1, then the final norm's output
    lm = from_pretrained(tiny_setup["model"], attn_impl="sdpa")
    bi = block_influence(lm, calib)
    L = source.config.num_hidden_layers
    want = [1 - torch.nn.functional.cosine_similarity(hs[l], hs[l + 1], dim=-1).mean() for l in range(L - 1)]
    assert bi[:L - 1].tolist() == pytest.approx([float(w) for w in want], abs=1e-4)

    sd = {k: v.clone() for k, v in source.state_dict().items()}
    sd["model.layers.0.mlp.down_proj.weight"][:, 11] = 0   # unit 11 of layer 0 writes nothing: dropped
    sd["model.layers.0.mlp.up_proj.weight"][12] *= 50      # unit 12 of layer 0 is loud: kept
    sd["model.layers.2.mlp.down_proj.weight"] *= 1e-3      # layer 2 barely changes the residual stream: dropped
    sd["model.layers.2.self_attn.o_proj.weight"] *= 1e-3
    planted = str(tmp_path / "planted")
    source.load_state_dict(sd)
    source.save_pretrained(planted)
    from llmshearing.data.tokenizer import load_tokenizer
    load_tokenizer(tiny_setup["model"]).save_pretrained(planted)
    scores = activation_scores(from_pretrained(planted, attn_impl="sdpa"), calib)
    assert scores["intermediate"][0, 11] == 0 and int(scores["intermediate"][0].argmax()) == 12
    assert int(scores["layer"].argmin()) == 2

    kept = oneshot_prune(planted, TARGET, str(tmp_path / "act"), method="activation", calibration=calib)
    with open(os.path.join(tmp_path, "act", "config.json")) as f:
        config = json.load(f)
    assert {k: config[k] for k in TARGET} == TARGET
    assert kept["scoring"].startswith("activation") and kept["calibration_tokens"] == calib.numel()
    assert 2 not in kept["layers"] and 0 in kept["layers"]
    assert 12 in kept["intermediate"][0] and 11 not in kept["intermediate"][0]
    for level in ("intermediate", "hidden"):
        want = scores[level] if level == "hidden" else scores[level][0]
        assert (kept[level] if level == "hidden" else kept[level][0]) == top(want, TARGET[f"{level}_size"])
