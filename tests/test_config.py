"""Bad input stops before any work, with a message that names the key and the fix."""
import os
import re

import pytest
from conftest import REPO

from llmshearing.model.hf import load_hf_config
from llmshearing.pruning.shapes import PRESETS, Shape
from llmshearing.pruning.target import resolve_target
from llmshearing.train.config import check_fsdp, load_config
from llmshearing.errors import ConfigError
from llmshearing.experiments.tiny import tiny_config

TINY_YAML = os.path.join(REPO, "yamls", "testing", "prune_tiny.yaml")


def tiny_overrides(setup):
    return [f"model.path={setup['model']}", f"data.shards={setup['shards']}"]


def test_tiny_recipe_validates(tiny_setup):
    cfg = load_config(TINY_YAML, tiny_overrides(tiny_setup))
    assert cfg.pruning.target["num_hidden_layers"] == 3 and cfg.max_duration == "30ba"


@pytest.mark.parametrize("yaml_name", ["prune_1.3b.yaml", "prune_2.7b.yaml", "demo_smollm2.yaml", "continue_1.3b.yaml",
                                       "continue_2.7b.yaml", "demo_continue.yaml", "prune_llama3_3b.yaml",
                                       "prune_llama3_1b.yaml", "continue_llama3_3b.yaml", "continue_llama3_1b.yaml",
                                       "prune_qwen3_1.7b.yaml", "continue_qwen3_1.7b.yaml"])
def test_shipped_recipes_parse(yaml_name, tmp_path):
    from omegaconf import OmegaConf

    from llmshearing.train.config import from_mapping, TrainConfig

    raw = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "yamls", yaml_name)), resolve=True)
    cfg = from_mapping(TrainConfig, raw, "")  # all keys known and well typed (paths exist only on the cluster)
    assert (cfg.pruning is not None) == yaml_name.startswith(("prune", "demo_smollm2"))
    assert cfg.data.dynamic is not None  # dynamic batch loading in every stage, as in the paper
    if cfg.fsdp is not None:  # the GPU recipes' FSDP section is a valid Composer FSDPConfig
        check_fsdp(cfg.fsdp)
        assert cfg.fsdp["sharding_strategy"] == "FULL_SHARD" and cfg.precision == "amp_bf16"
    with open(os.path.join(REPO, "yamls", yaml_name)) as f:
        header = "".join(line for line in f if line.startswith("#"))
    assert "composer train.py yamls/" + yaml_name in header  # the command that runs it
    if "llama3" in yaml_name or "qwen3" in yaml_name:  # the multi-node line is complete (every launcher flag it needs)
        assert "--master_addr $MASTER --master_port $MASTER_PORT train.py yamls/" + yaml_name in header


def test_paper_recipes_follow_the_paper():
    from omegaconf import OmegaConf

    for size in ("1.3b", "2.7b"):
        prune = OmegaConf.load(os.path.join(REPO, "yamls", f"prune_{size}.yaml"))
        assert prune.pruning.target == f"sheared-llama-{size}" and prune.data.split == "prune"
        assert prune.max_duration == "3200ba" and prune.global_train_batch_size == 32
        cont = OmegaConf.load(os.path.join(REPO, "yamls", f"continue_{size}.yaml"))
        assert cont.max_duration == "48000ba" and cont.global_train_batch_size == 256  # x 4096 = 50.3B tokens
        assert cont.optimizer.lr == 1e-4 and cont.scheduler.t_warmup == "1440ba"  # 3% of 48,000
        assert cont.eval_interval == "400ba" and cont.save_interval == "3200ba" and cont.data.split == "continue"
        ref = OmegaConf.load(os.path.join(REPO, "yamls", "reference", f"sheared-llama-{size}.yaml"))
        assert len(ref.reference_losses) == 7
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
    with pytest.raises(ConfigError, match=re.escape(message)):  # validate resolves the target, before any work
        load_config(TINY_YAML, tiny_overrides(tiny_setup) + [override])


def test_an_unsupported_family_is_refused_by_validation(tiny_setup, tmp_path):
    """Refused before any data or weights are touched (it used to pass validation and fail in the builders)."""
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=4).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=re.escape("model.path: '" + str(tmp_path) + "': model_type 'gpt2' is not "
                                                    "supported")):
        load_config(TINY_YAML, tiny_overrides(tiny_setup) + [f"model.path={tmp_path}"])


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
    ("data.shards=/no/such/shards", "no shards at '/no/such/shards'"),
    ("data.domains=[prose,wiki]", "domain 'wiki' has no shards"),
    ("data.domains=[prose,prose]", "lists a domain twice"),
    ("data.split=train", "data.split must be prune or continue"),
    ("data.proportions={prose: 0.5, code: 0.6}", "data.proportions must sum to 1"),
    ("data.proportions={prose: 1.0}", "missing ['code']"),
    ("data.proportions=/no/weights.json", "does not exist (expected a domain_weights.json)"),
    ("data.dynamic.reference_losses=[4.0]", "needs one loss per domain"),
    ("data.dynamic.reference_losses={prose: 4.0, cod: 3.0}", "missing ['code'], unknown ['cod']"),
    ("data.dynamic.reference_losses=/no/ref.yaml", "'llmshearing reference-loss"),
    ("data.dynamic.smoothing=1.5", "smoothing must be in [0, 1)"),
    ("data.dynamic.etta=2", "unknown key 'data.dynamic.etta'; did you mean 'data.dynamic.eta'?"),
    ("data.seq_len=64", "unknown key 'data.seq_len'"),
    ("max_duration=2ep", "no epochs"),
    ("max_duration=ten", "'max_duration'='ten' is not a duration"),
    ("global_train_batch_size=abc", "'global_train_batch_size' must be of type int"),
    ("device_train_microbatch_size=3", "must divide the per-device batch 4"),
    ("precision=fp8", "precision must be"),
    ("pruning.init_drop=1.5", "init_drop must be in"),
    ("load_path=/no/ckpt.pt", "load_path '/no/ckpt.pt' does not exist"),
    ("dist_timeout=0", "dist_timeout' must be a positive number of seconds"),
    ("save_on_sigterm=maybe", "'save_on_sigterm' must be of type bool"),
    ("data.num_workers=-1", "data.num_workers must be >= 0"),
    ("data.eval_sequences_per_domain=0", "eval_sequences_per_domain must be >= 1"),
    ("fsdp.sharding_stratgy=FULL_SHARD", "unknown key 'fsdp.sharding_stratgy'; did you mean 'fsdp.sharding_strategy'?"),
    ("model.attn_impl=flash", "model.attn_impl=flash needs flash-attn"),
    ("model.attn_impl=xformers", "model.attn_impl must be auto, sdpa or flash"),
    ("save_folder=s3://bucket/run", "save_folder='s3://bucket/run': remote folders are not supported"),
    ("pruning.log_alpha_clamp=[3.0, -3.0]", "pruning.log_alpha_clamp must be [low, high] with low < high"),
    ("optimizer.clip_grad_norm=0", "optimizer.clip_grad_norm must be a positive number or null"),
    ("data.dynamic.rule=doremi", "data.dynamic.rule must be paper (gap clamped at 0) or released (no clamp)"),
])
def test_bad_config_keys(tiny_setup, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY_YAML, tiny_overrides(tiny_setup) + [override])


def test_autoresume_needs_a_save_folder(tiny_setup):
    with pytest.raises(ConfigError, match="autoresume=true needs save_folder"):
        load_config(TINY_YAML, tiny_overrides(tiny_setup) + ["save_folder=null", "autoresume=true"])


def test_batch_not_divisible_by_world_size(tiny_setup, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="global_train_batch_size=4 must be a positive multiple of the world size 3"):
        load_config(TINY_YAML, tiny_overrides(tiny_setup))


@pytest.mark.parametrize("damage, message", [
    (lambda f: os.remove(f), "is missing (listed in"),
    (lambda f: os.truncate(f, 100), "is 100 bytes but"),
])
def test_missing_or_truncated_shard_file(tiny_setup, tmp_path, damage, message):
    import shutil

    shards = str(tmp_path / "shards")
    shutil.copytree(tiny_setup["shards"], shards)
    damage(os.path.join(shards, "code", "prune", "shard.00000.mds"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY_YAML, tiny_overrides(tiny_setup) + [f"data.shards={shards}"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


def test_shards_of_another_tokenizer_are_refused(tiny_setup, tmp_path):
    from llmshearing.data.tokenizer import check_tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_setup["model"])
    check_tokenizer(tiny_setup["shards"], tokenizer, 384)
    with pytest.raises(ConfigError, match="embedding of .* has only 300 rows"):
        check_tokenizer(tiny_setup["shards"], tokenizer, 300)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(10)])
    with pytest.raises(ConfigError, match="vocabulary differs from this run's tokenizer"):
        check_tokenizer(tiny_setup["shards"], tokenizer, 394)


@pytest.mark.slow
def test_launcher_refuses_wrong_tokenizer_before_training(tiny_setup, tmp_path):
    """A model whose tokenizer is not the shards' one stops at start with exit code 2."""
    import shutil
    import subprocess
    import sys

    from llmshearing.experiments.tiny import train_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_setup["model"], model)
    train_tokenizer(["another corpus entirely, another vocabulary " * 50], 300).save_pretrained(model)
    proc = subprocess.run([sys.executable, "train.py", TINY_YAML, f"model.path={model}",
                           f"data.shards={tiny_setup['shards']}", f"save_folder={tmp_path}/run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "rebuild the shards with the model's tokenizer" in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run" / "ep0-ba1-rank0.pt")
