"""Parameter budgets: `pruning.target: {params: N}` solves a valid uniform shape whose count is an HF model's."""
import json
import math
import os
import re

import pytest
import torch
from conftest import REPO
from transformers import (AutoConfig, AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPTNeoXConfig, LlamaConfig,
                          MistralConfig, Phi3Config,
                          Qwen2Config, Qwen3Config)

from llmshearing.cli import main as cli_main
from llmshearing.errors import ConfigError
from llmshearing.experiments.tiny import tiny_config
from llmshearing.model.hf import head_dim_of, load_hf_config
from llmshearing.pruning.budget import budget_tolerance, size_multiple, smallest_shape, solve_budget
from llmshearing.pruning.shapes import SHAPE_KEYS, Shape, param_count, shape_of, target_config, validate_target
from llmshearing.pruning.target import resolve_target
from llmshearing.train.config import load_config

SMOLLM2_JSON = os.path.join(REPO, "data", "models", "smollm2-135m", "config.json")


def smollm2_135m():
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                       rope_theta=100000.0, max_position_embeddings=8192)


def llama2_7b():
    return AutoConfig.from_pretrained(os.path.join(REPO, "yamls", "models", "llama-2-7b.json"))


def mistral_7b():
    return MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=1e6)


def qwen2_0_5b():
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)


def qwen3_0_6b():
    return Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                       rope_theta=1e6)


def gemma2_2b():
    return Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4096)


def gemma3_1b():
    return Gemma3TextConfig(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                            sliding_window=512, rope_theta=1e6, rope_local_base_freq=10000.0)


def phi3_mini():  # Phi-3-mini-4k-instruct
    return Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False, sliding_window=2047,
                      max_position_embeddings=4096, pad_token_id=32000)


def pythia_1_4b():
    return GPTNeoXConfig(vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=16, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)


SOURCES = {"smollm2-135m": smollm2_135m, "llama-2-7b": llama2_7b, "mistral-7b": mistral_7b, "qwen2-0.5b": qwen2_0_5b,
           "qwen3-0.6b": qwen3_0_6b, "gemma-2-2b": gemma2_2b, "gemma-3-1b": gemma3_1b, "phi-3-mini": phi3_mini,
           "pythia-1.4b": pythia_1_4b}
# the published counts; Qwen3-0.6B's card says 0.6B and 0.44B non-embedding: this is the count by hand (per layer
# 3 x 2,097,152 attention + 9,437,184 MLP + 2,048 layer norms + 256 q_norm/k_norm, + 151,936 x 1,024 tied + 1,024)
SOURCE_PARAMS = {"smollm2-135m": 134_515_008, "llama-2-7b": 6_738_415_616, "mistral-7b": 7_241_732_096,
                 "qwen2-0.5b": 494_032_768, "qwen3-0.6b": 596_049_920,
                 # Gemma (cards: 2.6B, 1B): 4 norms per layer, + Gemma 3's q/k norms
                 "gemma-2-2b": 2_614_341_888, "gemma-3-1b": 999_885_952,
                 "phi-3-mini": 3_821_079_552, "pythia-1.4b": 1_414_647_808}


def hf_params(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def total(config) -> int:
    return int(param_count(shape_of(config), config))


def distortion(shape: Shape, config, factor: float) -> float:
    src = shape_of(config)
    return sum(math.log(getattr(shape, k) / (factor * getattr(src, k))) ** 2 for k in SHAPE_KEYS)


@pytest.mark.parametrize("name", SOURCES)
def test_source_counts_are_the_published_ones(name):
    assert total(SOURCES[name]()) == hf_params(SOURCES[name]()) == SOURCE_PARAMS[name]


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("name", SOURCES)
def test_solved_shape_is_a_valid_model_of_the_budget(name, fraction):
    config = SOURCES[name]()
    src = shape_of(config)
    budget = round(fraction * total(config))
    solution = solve_budget(config, budget)
    shape = solution.shape
    pruned = target_config(config, shape)
    assert solution.params == int(param_count(shape, config)) == hf_params(pruned)
    assert abs(solution.params - budget) <= budget_tolerance(shape, config) < 0.02 * budget
    validate_target(src, shape)
    assert head_dim_of(pruned) == head_dim_of(config)
    assert shape.num_attention_heads % shape.num_key_value_heads == 0
    assert shape.heads_per_group <= src.heads_per_group
    assert shape.hidden_size % 64 == 0 and shape.intermediate_size % 64 == 0
    assert shape != src and all(getattr(shape, k) <= getattr(src, k) for k in SHAPE_KEYS)
    # the config keys resolve to the same shape
    assert resolve_target({"params": budget}, config) == shape
    assert resolve_target({"params_fraction": fraction}, config) == shape
    # the rule: no neighbour within tolerance is closer to the source's proportions
    for alt, n in solution.alternatives:
        assert n == int(param_count(alt, config))
        if abs(n - budget) <= budget_tolerance(alt, config):
            assert distortion(alt, config, solution.factor) >= distortion(shape, config, solution.factor)


def test_documented_examples():
    """docs/budget.md's examples; a change of rule changes them (and must change the doc)."""
    llama = solve_budget(llama2_7b(), 1_300_000_000)
    assert llama.shape == Shape(18, 2304, 18, 18, 6208) and llama.params == 1_302_121_728
    smol = solve_budget(smollm2_135m(), 70_000_000)
    assert smol.shape == Shape(23, 448, 6, 2, 1216) and smol.params == 70_181_440
    assert len(smol.alternatives) == 4 and len(set(s for s, _ in smol.alternatives) | {smol.shape}) == 5


@pytest.mark.skipif(not os.path.exists(SMOLLM2_JSON), reason="data/ not fetched (make fetch)")
def test_real_smollm2_config_matches_the_constructed_one():
    real = load_hf_config(SMOLLM2_JSON)
    assert solve_budget(real, 70_000_000) == solve_budget(smollm2_135m(), 70_000_000)


def test_rounding_multiple():
    assert [size_multiple(n) for n in (4096, 11008, 14336, 576, 1536, 896, 4864)] == [64] * 7
    assert size_multiple(64) == 8 and size_multiple(96) == 8 and size_multiple(48) == 4 and size_multiple(4095) == 1


def test_tiny_source_uses_finer_multiples():
    config = tiny_config("smollm2-gqa")  # 4 layers, hidden 64, 6 heads / 2 KV, intermediate 96
    budget = round(0.5 * total(config))
    shape = solve_budget(config, budget).shape
    validate_target(shape_of(config), shape)
    assert shape.hidden_size % 8 == 0 and shape.intermediate_size % 8 == 0 and shape.hidden_size < 64
    assert abs(param_count(shape, config) - budget) <= budget_tolerance(shape, config)
    assert hf_params(target_config(config, shape)) == param_count(shape, config)


def test_edges_of_the_feasible_range():
    config = smollm2_135m()
    low = int(param_count(smallest_shape(shape_of(config)), config))
    assert solve_budget(config, low).shape == Shape(1, 64, 1, 1, 64)
    near_source = resolve_target({"params": total(config) - 1}, config)
    validate_target(shape_of(config), near_source)
    assert near_source != shape_of(config)  # a budget below the source must prune something


@pytest.mark.parametrize("spec, message", [
    ({"params": 134_515_008}, "pruning.target.params=134,515,008 is outside the feasible range [3,174,592, 134,515,008)"),
    ({"params": 10**12}, "outside the feasible range"),
    ({"params": 3_174_591}, "outside the feasible range [3,174,592,"),
    ({"params": 0}, "outside the feasible range"),
    ({"params": -5}, "outside the feasible range"),
    ({"params": 70_000_000.5}, "pruning.target.params: 70000000.5 is not a whole number"),
    ({"params": "70000000.5"}, "is not a whole number"),
    ({"params": "lots"}, "pruning.target.params: expected a positive number"),
    ({"params": True}, "pruning.target.params: expected a whole number"),
    ({"params": [1]}, "pruning.target.params: expected a whole number"),
    ({"params_fraction": 0}, "params_fraction: expected a number in (0, 1), got 0"),
    ({"params_fraction": 1}, "expected a number in (0, 1), got 1"),
    ({"params_fraction": 1.5}, "expected a number in (0, 1)"),
    ({"params_fraction": "half"}, "expected a number in (0, 1)"),
    ({"params_fraction": 0.001}, "params_fraction=0.001 is below the smallest valid shape 1/64/1/1/64 (3,174,592 params); "
                                 "feasible: [0.0237, 1)"),
    ({"params": 7e7, "params_fraction": 0.5}, "exactly one of {params: N} or {params_fraction: F}"),
    ({"params": 7e7, "num_hidden_layers": 20}, "without dims"),
])
def test_impossible_budgets(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_target(spec, smollm2_135m())


@pytest.mark.parametrize("value", [70_000_000, 7e7, "7e7", "70M", "70000000", "0.07B"])
def test_budget_spellings(value):
    assert resolve_target({"params": value}, smollm2_135m()) == Shape(23, 448, 6, 2, 1216)


def test_cli_json_matches_the_solver(tmp_path, capsys):
    smollm2_135m().to_json_file(str(tmp_path / "config.json"))
    for source in (str(tmp_path), str(tmp_path / "config.json")):
        assert cli_main(["target", source, "--params", "70M", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        solution = solve_budget(smollm2_135m(), 70_000_000)
        assert out == {"shape": solution.shape.as_dict(), "params": solution.params, "budget": 70_000_000,
                       "alternatives": [{"shape": s.as_dict(), "params": n} for s, n in solution.alternatives]}
        assert list(out["shape"]) == list(SHAPE_KEYS)
    assert cli_main(["target", str(tmp_path), "--fraction", "0.5", "--json", "--alternatives", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budget"] == round(0.5 * SOURCE_PARAMS["smollm2-135m"]) and len(out["alternatives"]) == 2
    assert cli_main(["target", str(tmp_path), "--params", "7e7"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"chosen +23 +448 +6 +2 +1216 +70,181,440 +\+181,440", text), text
    assert "multiples of 64" in text and len(text.strip().splitlines()) == 3 + 1 + 4


@pytest.mark.parametrize("args, message", [
    (["--params", "200M"], "--params=200,000,000 is outside the feasible range"),
    (["--params", "70000000.5"], "--params: '70000000.5' is not a whole number"),
    (["--fraction", "1.0"], "--fraction: expected a number in (0, 1)"),
    (["--params", "70M", "--fraction", "0.5"], "exactly one of --params N"),
    ([], "exactly one of --params N"),
])
def test_cli_errors(tmp_path, capsys, args, message):
    smollm2_135m().to_json_file(str(tmp_path / "config.json"))
    assert cli_main(["target", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_budget_in_a_run_config(tiny_setup):
    base = [f"model.path={tiny_setup['model']}", f"data.shards={tiny_setup['shards']}"]
    yaml = os.path.join(REPO, "yamls", "testing", "prune_tiny.yaml")
    source = load_hf_config(tiny_setup["model"])
    for spec, budget in [("{params: 80000}", 80_000), ("{params: 8e4}", 80_000), ("{params: 80K}", 80_000),
                         ("{params_fraction: 0.5}", round(0.5 * total(source)))]:
        cfg = load_config(yaml, base + [f"pruning.target={spec}"])
        shape = resolve_target(cfg.pruning.target, source)
        assert shape == solve_budget(source, budget).shape
        assert abs(param_count(shape, source) - budget) <= budget_tolerance(shape, source)
    with pytest.raises(ConfigError, match=re.escape("pruning.target.params=10,000,000 is outside the feasible range")):
        load_config(yaml, base + ["pruning.target={params: 10000000}"])  # impossible targets stop at validation


def test_qwen3_preset_takes_the_released_1_7b_shape():
    """qwen3-1.7b is Qwen3-1.7B's shape (its shipped config resolves to the preset, same head_dim); the counts are the
    released models' (transformers' numel), and the pruned model has the 1.7B's parameters plus the output embedding
    the 8B does not tie (151,936 x 2,048)."""
    from llmshearing.pruning.shapes import PRESETS
    from llmshearing.train.plan import load_model_config

    models = os.path.join(REPO, "yamls", "models")
    source, small = (load_model_config(os.path.join(models, f"qwen3-{n}.json")) for n in ("8b", "1.7b"))
    assert resolve_target(os.path.join(models, "qwen3-1.7b.json"), source) == PRESETS["qwen3-1.7b"] == shape_of(small)
    assert total(source) == hf_params(source) == 8_190_735_360
    assert total(small) == hf_params(small) == 1_720_574_976
    pruned = target_config(source, PRESETS["qwen3-1.7b"])
    assert param_count(PRESETS["qwen3-1.7b"], source) == hf_params(pruned) == 1_720_574_976 + 151936 * 2048


def test_llama3_presets_take_the_released_small_models_shapes():
    """llama-3.2-3b is Llama-3.2-3B's shape (its shipped config resolves to the preset); Llama-3.2-1B's config is
    refused (head_dim 64, never pruned) with the way out, and llama-3.2-1b-hd128 has the 1B's parameters but for the
    output embedding the 8B does not tie (128,256 x 2,048)."""
    from llmshearing.pruning.shapes import PRESETS
    from llmshearing.train.plan import load_model_config

    models = os.path.join(REPO, "yamls", "models")
    source = load_model_config(os.path.join(models, "llama-3.1-8b.json"))
    small = {n: load_model_config(os.path.join(models, f"llama-3.2-{n}.json")) for n in ("3b", "1b")}
    assert resolve_target(os.path.join(models, "llama-3.2-3b.json"), source) == PRESETS["llama-3.2-3b"]
    assert shape_of(small["3b"]) == resolve_target("llama-3.2-3b", source)
    with pytest.raises(ConfigError, match="has head_dim 64 but the source has 128; head_dim is never pruned"):
        resolve_target(os.path.join(models, "llama-3.2-1b.json"), source)
    hd128 = resolve_target("llama-3.2-1b-hd128", source)
    assert param_count(hd128, source) == param_count(shape_of(small["1b"]), small["1b"]) + 128256 * 2048
    assert param_count(hd128, source) == 1_498_482_688
