"""What the recipes share with the paper's released code (docs/fidelity.md): the tiny paper recipe differs from the
paper recipe only where a laptop must, and the dynamic-batch-loading rules give the hand-computed weights."""
import math
import os
import sys

import pytest
from conftest import REPO, jsonl, paths, run, weights_log
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from llmshearing.callbacks import DynamicLoading
from llmshearing.data.reweighting import RULES, update_weights

PAPER_TINY = os.path.join("yamls", "testing", "prune_paper_tiny.yaml")
# What may differ: model, data, target, reference losses, batch sizes, durations, device/precision, fsdp, and the
# run's own folder names.
ALLOWED = {"run_name", "model.path", "data.shards", "data.dynamic.reference_losses", "data.eval_sequences_per_domain",
           "pruning.target", "pruning.lagrangian_warmup", "scheduler.t_warmup", "max_duration", "eval_interval",
           "save_interval", "global_train_batch_size", "device_train_microbatch_size", "device_eval_batch_size",
           "precision", "device", "save_folder", "export_dir"}


def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("target", "reference_losses"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_paper_tiny_recipe_differs_from_the_paper_recipe_only_where_a_laptop_must():
    paper = flat(OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "yamls", "prune_1.3b.yaml"))))
    tiny = flat(OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, PAPER_TINY))))
    differing = {k for k in paper.keys() | tiny.keys() if paper.get(k, "<absent>") != tiny.get(k, "<absent>")}
    assert differing - ALLOWED == set(), differing - ALLOWED
    for key in ("optimizer.clip_grad_norm", "data.dynamic.rule", "data.dynamic.smoothing", "data.num_workers",
                "pruning.mask_lr", "fsdp.activation_checkpointing"):
        assert tiny[key] == paper[key], key


def test_dynamic_loading_rules_with_hand_computed_weights():
    """w = (0.5, 0.5), losses (3.0, 2.0), references (2.5, 2.5), eta 1, c = 1e-4.
    paper (Algorithm 1): gaps (0.5, 0) -> softmax(log w + gap) = (e^0.5, 1) / (e^0.5 + 1) = (0.622459, 0.377541);
    released code: gaps (0.5, -0.5) -> (e^0.5, e^-0.5) / sum = (0.731059, 0.268941); then (1 - c) w + c / 2."""
    w, losses, ref = [0.5, 0.5], [3.0, 2.0], [2.5, 2.5]
    c = 1e-4
    for rule, raw in (("paper", [0.622459, 0.377541]), ("released", [0.731059, 0.268941])):
        new, gap = update_weights(w, losses, ref, eta=1.0, smoothing=c, clamp_min=RULES[rule])
        assert gap.tolist() == pytest.approx([0.5, 0.0] if rule == "paper" else [0.5, -0.5])
        assert new.tolist() == pytest.approx([(1 - c) * x + c / 2 for x in raw], abs=1e-6)
        assert math.isclose(sum(new), 1.0)
    callback = DynamicLoading(["a", "b"], ref, rule="released")
    assert callback.clamp_min is None and callback.smoothing == 1e-4
    assert DynamicLoading(["a", "b"], ref).clamp_min == 0.0  # the paper's rule is the default


@pytest.mark.slow
def test_paper_tiny_recipe_runs_and_starts_from_the_dense_model(tiny_setup, tmp_path):
    folder = str(tmp_path / "paper")
    proc = run([sys.executable, "train.py", PAPER_TINY, *paths(tiny_setup, folder), "wandb=null"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = jsonl(os.path.join(folder, "pruning_log.jsonl"))
    assert len(log) == 40
    # log_alpha at ln 100: every gate open with probability 0.998 -> expected sparsity 0.002 at step 0
    for key in (k for k in log[0] if k.endswith("/expected_sparsity")):
        assert log[0][key] == pytest.approx(1 - 0.997982, abs=1e-4), key
    assert all(r["l0/layer/target_sparsity"] == pytest.approx(0.25) for r in log[8:])  # after the 8-batch warm-up
    assert len(weights_log(folder)) == 4  # an update every 10 batches
    model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "export"))
    assert model.config.num_hidden_layers == 3 and model.config.intermediate_size == 64
