"""bench.throughput end to end (--quick) and the non-uniform model it times: the comparison of uniform
and non-uniform pruning only means something if the non-uniform model really has per-layer shapes, the
same size, and computes what its slicing claims. bench.gpu_check on CPU: every check present and passing.
No assertion on timing."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, REPO)

from bench.throughput import (  # noqa: E402
    QUICK_SOURCE, QUICK_TARGET, layer_shapes, nonuniform_counts, nonuniform_layers, slice_nonuniform,
    zero_removed,
)
from llmshearing.compat import set_attn_implementation  # noqa: E402
from llmshearing.model.hf import head_dim_of  # noqa: E402
from llmshearing.pruning.shapes import param_count, PRESETS, Shape, shape_of  # noqa: E402
from llmshearing.experiments.tiny import tiny_config  # noqa: E402


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_quick_benchmark_end_to_end(tmp_path):
    out = tmp_path / "throughput.json"
    proc = subprocess.run([sys.executable, "-m", "bench.throughput", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| uniform |" in proc.stdout and "| nonuniform |" in proc.stdout  # the markdown table
    r = json.loads(out.read_text())

    for key in ("cpu_model", "cpu_count", "torch_threads"):
        assert r["machine"][key], key
    assert r["torch"] == torch.__version__
    s = r["settings"]
    for key in ("train_batch", "train_seq", "infer_batch", "prompt_len", "new_tokens", "repeats"):
        assert _positive(s[key]), key

    for name in ("masked_source", "dense_source"):
        t = r["train"][name]
        assert _positive(t["tokens_per_s"]) and len(t["step_s"]) == s["train_repeats"]
        assert all(map(_positive, t["step_s"]))
    for name in ("source", "uniform", "nonuniform"):
        i = r["inference"][name]
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "param_bytes", "kv_cache_bytes"):
            assert _positive(i[key]), (name, key)
        assert len(i["decode_s"]) == s["repeats"] and all(map(_positive, i["prefill_s"] + i["decode_s"]))
        assert i["peak_extra_bytes"] is None or i["peak_extra_bytes"] >= 0
    assert set(r["ratios"]) >= {"train_masked_over_dense", "prefill_uniform_over_source", "decode_uniform_over_source",
                                "prefill_uniform_over_nonuniform", "decode_uniform_over_nonuniform"}
    assert all(map(_positive, r["ratios"].values()))
    assert set(r["ratios_per_round"]) == set(r["ratios"])
    for name, pr in r["ratios_per_round"].items():
        assert len(pr["all"]) == (s["train_repeats"] if name.startswith("train") else s["repeats"])
        assert 0 < pr["min"] <= pr["median"] <= pr["max"]

    m = r["models"]
    src, uni, non = m["source"], m["uniform"], m["nonuniform"]
    # Shapes as read from the modules of the models that were timed.
    assert {(l["heads"], l["kv_heads"], l["intermediate"]) for l in src["per_layer"]} == {(9, 3, 96)}
    assert {(l["heads"], l["kv_heads"], l["intermediate"]) for l in uni["per_layer"]} == {(4, 2, 64)}
    assert len({l["heads"] for l in non["per_layer"]}) > 1
    assert len({l["kv_heads"] for l in non["per_layer"]}) > 1
    assert len({l["intermediate"] for l in non["per_layer"]}) > 1
    assert non["num_hidden_layers"] == uni["num_hidden_layers"] and non["hidden_size"] == uni["hidden_size"]
    assert abs(non["params"] - uni["params"]) <= 0.01 * uni["params"]
    assert uni["params"] == uni["param_count_formula"]
    assert src["params"] > 2 * uni["params"]
    assert non["slicing_check_max_abs_diff"] < 1e-5
    # KV cache size follows the KV heads actually kept: equal totals give equal caches.
    kv_uni, kv_non = r["inference"]["uniform"]["kv_cache_bytes"], r["inference"]["nonuniform"]["kv_cache_bytes"]
    assert kv_uni == kv_non < r["inference"]["source"]["kv_cache_bytes"]


def _carrier(layers: int, seed: int = 0):
    """A random HF Llama with the quick source's heads and intermediate, and non-trivial norms."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config("smollm2-gqa", **{**QUICK_SOURCE, "num_hidden_layers": layers})
    set_attn_implementation(config, "sdpa")
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def test_nonuniform_slicing_equals_zeroed_reference():
    carrier = _carrier(4)
    src = shape_of(carrier.config)
    target = Shape(4, src.hidden_size, QUICK_TARGET.num_attention_heads, QUICK_TARGET.num_key_value_heads,
                   QUICK_TARGET.intermediate_size)
    plan = nonuniform_layers(src, target, seed=1)
    sliced = slice_nonuniform(carrier, plan)
    shapes = layer_shapes(sliced)
    assert [(l["heads"], l["kv_heads"], l["intermediate"]) for l in shapes] == [
        (len(p["heads"]), len(p["kv_heads"]), len(p["intermediate"])) for p in plan]
    assert len({l["heads"] for l in shapes}) > 1 and len({l["intermediate"] for l in shapes}) > 1
    assert any(p["heads"] != list(range(len(p["heads"]))) for p in plan)  # not just the first units

    ids = torch.randint(0, carrier.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = sliced(ids).logits
        want = zero_removed(carrier, plan)(ids).logits
        full = carrier(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - full).abs().max() > 1e-3  # the removed units mattered, so the check can fail
    # A slicing that keeps other units than the plan says does not pass the check.
    other = nonuniform_layers(src, target, seed=2)
    assert [len(p["intermediate"]) for p in other] == [len(p["intermediate"]) for p in plan] and other != plan
    with torch.no_grad():
        assert (slice_nonuniform(carrier, other)(ids).logits - want).abs().max() > 1e-3


def test_nonuniform_decode_with_kv_cache_matches_full_forward():
    """Per-layer KV-head counts must work with HF's DynamicCache: cached one-token steps give the logits
    of a full forward over the same tokens."""
    from transformers import DynamicCache

    carrier = _carrier(4)
    src = shape_of(carrier.config)
    target = Shape(4, src.hidden_size, QUICK_TARGET.num_attention_heads, QUICK_TARGET.num_key_value_heads,
                   QUICK_TARGET.intermediate_size)
    plan = nonuniform_layers(src, target, seed=2)
    model = slice_nonuniform(carrier, plan)
    ids = torch.randint(0, carrier.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()
        steps = [model(ids[:, :6], past_key_values=cache, use_cache=True).logits]
        for t in range(6, 10):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    kv_per_layer = [k.shape[1] for k, _ in cache]
    assert kv_per_layer == [len(p["kv_heads"]) for p in plan] and len(set(kv_per_layer)) > 1


@pytest.mark.parametrize("target", ["smollm2-135m-half", "sheared-llama-1.3b", "sheared-llama-2.7b"])
def test_nonuniform_counts_keep_totals(target):
    """The real benchmark's shapes (no model built): same totals as the uniform target, so the same
    parameter count, with layers that differ."""
    from transformers import AutoConfig

    if target == "smollm2-135m-half":
        source = AutoConfig.for_model("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                      tie_word_embeddings=True, head_dim=64)
    else:  # Llama-2-7B
        source = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    src, tgt = shape_of(source), PRESETS[target]
    counts = nonuniform_counts(src, tgt)
    assert len(counts) == tgt.num_hidden_layers
    assert sum(kv for kv, _, _ in counts) == tgt.num_hidden_layers * tgt.num_key_value_heads
    assert sum(kv * r for kv, r, _ in counts) == tgt.num_hidden_layers * tgt.num_attention_heads
    assert sum(i for _, _, i in counts) == tgt.num_hidden_layers * tgt.intermediate_size
    assert all(1 <= kv <= src.num_key_value_heads and 1 <= r <= src.heads_per_group
               and 1 <= i <= src.intermediate_size for kv, r, i in counts)
    assert len({i for _, _, i in counts}) > 1
    if src.heads_per_group > tgt.heads_per_group or src.num_key_value_heads > tgt.num_key_value_heads:
        assert len({kv * r for kv, r, _ in counts}) > 1
    # Per-layer parameters are linear in heads, KV heads and intermediate, so equal totals = equal size.
    hd = head_dim_of(source)
    h = tgt.hidden_size
    nonuni = sum(h * (kv * r + 2 * kv) * hd + kv * r * hd * h + 3 * h * i + 2 * h for kv, r, i in counts)
    embed = source.vocab_size * h * (1 if source.tie_word_embeddings else 2) + h
    assert nonuni + embed == param_count(tgt, source)


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_every_check_passes(tiny_setup, tmp_path):
    """`python -m bench.gpu_check --device cpu`: the GPU check's stages on CPU (tiny MHA and GQA sources, 1 and 2
    ranks over gloo), so a recipe or trainer change that breaks the check fails here and not first on a GPU."""
    from conftest import ENV
    from bench import gpu_check

    out, work = tmp_path / "report.json", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--out", str(out), "--work",
                           str(work), "--tiny", os.path.dirname(tiny_setup["model"]), "--budget", "900"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    c = r["checks"]
    assert r["ok"] and r["device"] == "cpu" and r["world_sizes"] == [1, 2]
    assert set(c) == {"train_mha_1_rank", "train_gqa_2_ranks", "train_masked_1_rank", "train_dense_1_rank",
                      "export_mha", "export_gqa", "sigterm_then_autoresume_gqa", "throughput"}
    assert all(check["ok"] and not check.get("problems") for check in c.values()), c
    # The MHA source has as many KV heads as heads; the GQA source fewer.
    mha, gqa = (gpu_check.TINY_TARGETS[f] for f in ("llama-mha", "smollm2-gqa"))
    assert r["sources"]["mha"]["target"] == mha and r["sources"]["gqa"]["target"] == gqa
    for name, ranks, batches in (("train_mha_1_rank", 1, 4), ("train_gqa_2_ranks", 2, 4),
                                 ("train_masked_1_rank", 1, 4), ("train_dense_1_rank", 1, 4)):
        t = c[name]
        assert (t["world_size"], t["batches"], t["precision"]) == (ranks, batches, "fp32")
        assert "scaled_dot_product_attention" in t["attention"]
        assert _positive(t["tokens_per_s"]) and _positive(t["median_step_s"]) and math.isfinite(t["final_loss"])
        assert len(t["grad_norms"]) == batches and all(map(_positive, t["grad_norms"]))  # clipping ran every batch
    for name in ("export_mha", "export_gqa"):
        assert c[name]["max_abs_logit_diff_fp32"] < 1e-4 < c[name]["max_abs_logit_fp32"]
    assert c["export_mha"]["shape"] == mha and c["export_gqa"]["shape"] == gqa
    s = c["sigterm_then_autoresume_gqa"]
    assert (s["stopped_after"], s["resumed_at"]) == (gpu_check.STOP_AFTER, gpu_check.STOP_AFTER)
    assert s["logs_equal"] and s["domain_weights_equal"] and s["max_abs_weight_diff"] == 0 == s["max_rel_loss_diff"]
    t = c["throughput"]
    assert all(map(_positive, (t["masked_tokens_per_s"], t["dense_tokens_per_s"], t["masked_over_dense_step"])))

    # The export check can fail: a changed weight in the export is caught.
    from safetensors.torch import load_file, save_file

    export = work / "gqa" / "export" / "model.safetensors"
    weights = load_file(str(export))
    weights["model.layers.0.mlp.down_proj.weight"][0] += 1.0
    save_file(weights, str(export), metadata={"format": "pt"})
    bad = gpu_check.check_export(str(work / "gqa"), gqa, "cpu")
    assert not bad["ok"] and bad["max_abs_logit_diff_fp32"] > 1e-3


def test_gpu_check_refuses_bad_arguments(tmp_path, capsys):
    from bench import gpu_check

    if not torch.cuda.is_available():
        assert gpu_check.main(["--device", "gpu", "--out", str(tmp_path / "r.json")]) == 2
        assert "--device cpu" in capsys.readouterr().err
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "mha").mkdir()
    assert gpu_check.main(["--device", "cpu", "--work", str(tmp_path / "work")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
