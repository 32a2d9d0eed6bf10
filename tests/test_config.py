"""Bad input stops before any work, with a message that names the key and the fix."""
import os
import re

import pytest
from conftest import REPO

from llmshearing.arch import PRESETS, Shape, load_hf_config, resolve_target
from llmshearing.config import check_fsdp, load_config
from llmshearing.errors import ConfigError
from llmshearing.tiny import tiny_config

TINY_YAML = os.path.join(REPO, "yamls", "testing", "prune_tiny.yaml")


def tiny_overrides(setup):
    return [f"model.path={setup['model']}", f"data.domains.prose={setup['prose']}", f"data.domains.code={setup['code']}"]


def test_tiny_recipe_validates(tiny_setup):
    cfg = load_config(TINY_YAML, tiny_overrides(tiny_setup))
    assert cfg.pruning.target["num_hidden_layers"] == 3 and cfg.max_duration == "30ba"


@pytest.mark.parametrize("yaml_name", ["prune_1.3b.yaml", "prune_2.7b.yaml", "demo_smollm2.yaml"])
def test_shipped_recipes_parse(yaml_name, tmp_path):
    from omegaconf import OmegaConf

    from llmshearing.config import TrainConfig, _build

    raw = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "yamls", yaml_name)), resolve=True)
    cfg = _build(TrainConfig, raw, "")  # all keys known and well typed (paths exist only on the cluster)
    assert cfg.pruning is not None
    if cfg.fsdp is not None:  # the GPU recipes' FSDP section is a valid Composer FSDPConfig
        check_fsdp(cfg.fsdp)
        assert cfg.fsdp["sharding_strategy"] == "FULL_SHARD" and cfg.precision == "amp_bf16"
    with open(os.path.join(REPO, "yamls", yaml_name)) as f:
        header = "".join(line for line in f if line.startswith("#"))
    assert "composer train.py yamls/" + yaml_name in header  # the command that runs it


def test_paper_recipes_target_the_paper_shapes():
    from omegaconf import OmegaConf

    for name, preset in (("prune_1.3b.yaml", "sheared-llama-1.3b"), ("prune_2.7b.yaml", "sheared-llama-2.7b")):
        raw = OmegaConf.load(os.path.join(REPO, "yamls", name))
        assert raw.pruning.target == preset
        assert raw.max_duration == "3200ba" and raw.global_train_batch_size == 32 and raw.data.seq_len == 4096
    assert PRESETS["sheared-llama-1.3b"] == Shape(24, 2048, 16, 16, 5504)
    assert PRESETS["sheared-llama-2.7b"] == Shape(32, 2560, 20, 20, 6912)


def test_paper_targets_fit_llama2_7b():
    llama2 = tiny_config("llama-mha", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    assert resolve_target("sheared-llama-1.3b", llama2) == PRESETS["sheared-llama-1.3b"]
    assert resolve_target("sheared-llama-2.7b", llama2) == PRESETS["sheared-llama-2.7b"]


@pytest.mark.parametrize("override, message", [
    ("pruning.target.hidden_size=128", "target.hidden_size=128 is larger than the source's 64"),
    ("pruning.target.num_hidden_layers=0", "target.num_hidden_layers=0 must be at least 1"),
    ("pruning.target={num_attention_heads: 3, num_key_value_heads: 2}", "num_attention_heads=3 is not divisible by"),
    ("pruning.target.hidden_sise=32", "unknown keys ['hidden_sise']"),
    ("pruning.target=no-such-preset", "neither a preset"),
])
def test_impossible_targets(tiny_setup, override, message):
    cfg = load_config(TINY_YAML, tiny_overrides(tiny_setup) + [override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_target(cfg.pruning.target, load_hf_config(cfg.model.path))


def test_more_heads_per_group_than_source(tiny_setup):
    source = load_hf_config(tiny_setup["model"])  # 6 heads, 2 KV groups: 3 per group
    with pytest.raises(ConfigError, match="keeps 4 query heads per KV group but the source has only 3"):
        resolve_target({"num_attention_heads": 4, "num_key_value_heads": 1}, source)


def test_source_heads_not_divisible_by_kv_heads(tmp_path):
    config = tiny_config("llama-mha", num_attention_heads=4, num_key_value_heads=3)
    config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible by num_key_value_heads=3"):
        load_hf_config(str(tmp_path))


@pytest.mark.parametrize("override, message", [
    ("optimiser.lr=1", "unknown key 'optimiser'; did you mean 'optimizer'?"),
    ("pruning.lagrangian_warmpu=3ba", "unknown key 'pruning.lagrangian_warmpu'; did you mean 'pruning.lagrangian_warmup'"),
    ("model.path=/does/not/exist", "model.path '/does/not/exist' does not exist"),
    ("data.domains.prose=/no/such/text.jsonl", "data.domains.prose: '/no/such/text.jsonl' does not exist"),
    ("max_duration=ten", "'max_duration'='ten' is not a duration"),
    ("global_train_batch_size=abc", "'global_train_batch_size' must be of type int"),
    ("device_train_microbatch_size=3", "must divide the per-device batch 4"),
    ("precision=fp8", "precision must be"),
    ("pruning.init_drop=1.5", "init_drop must be in"),
    ("fsdp.sharding_stratgy=FULL_SHARD", "unknown key 'fsdp.sharding_stratgy'; did you mean 'fsdp.sharding_strategy'?"),
])
def test_bad_config_keys(tiny_setup, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY_YAML, tiny_overrides(tiny_setup) + [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


def test_tokenizer_vocab_larger_than_embedding(tiny_setup, tmp_path):
    from transformers import AutoTokenizer

    from llmshearing.data import build_datasets

    tokenizer = AutoTokenizer.from_pretrained(tiny_setup["model"])
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(10)])
    with pytest.raises(ConfigError, match="tokenizer has 394 tokens but the model's embedding has only 384 rows"):
        build_datasets({"prose": tiny_setup["prose"]}, tokenizer, 64, 256, None, vocab_size=384)


def test_domain_too_small(tiny_setup, tmp_path):
    from transformers import AutoTokenizer

    from llmshearing.data import build_datasets

    small = tmp_path / "small.txt"
    small.write_text("just a few words")
    tokenizer = AutoTokenizer.from_pretrained(tiny_setup["model"])
    with pytest.raises(ConfigError, match="data.domains.small: only"):
        build_datasets({"small": str(small)}, tokenizer, 64, 256, None)
