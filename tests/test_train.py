"""End to end: the real Composer launcher on the tiny recipe, checkpoint -> `llmshearing export` -> HF."""
import json
import os
import sys

import pytest
import torch
from conftest import BIN, CONTINUE_YAML, TINY_YAML, paths, run, weights_log
from transformers import AutoModelForCausalLM

from llmshearing.model.hf import load_hf_config
from llmshearing.pruning.shapes import shape_of
from llmshearing.pruning.target import resolve_target
from llmshearing.train.composer_model import ComposerLM
from llmshearing.pruning.masks import L0Module
from llmshearing.model.loading import from_pretrained
from llmshearing.data.layout import DomainSequences
from llmshearing.data.reweighting import update_weights
from llmshearing.train.restore import load_checkpoint

pytestmark = pytest.mark.slow  # Composer training runs / subprocesses: left out of `make test-fast`


def test_composer_launcher_prunes_checkpoints_and_exports(tiny_setup, tmp_path):
    folder = str(tmp_path / "run")
    proc = run([os.path.join(BIN, "composer"), "train.py", TINY_YAML, *paths(tiny_setup, folder),
                "wandb.project=tiny", f"wandb.dir={tmp_path}/wandb"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.exists(os.path.join(folder, "ep0-ba30-rank0.pt"))
    for name in ("run_config.yaml", "pruning_log.jsonl", "pruning_shape.png", "pruning_lambdas.png"):
        assert os.path.getsize(os.path.join(folder, name)) > 0, name
    with open(os.path.join(folder, "pruning_log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(30))
    assert rows[-1]["l0/layer/target_sparsity"] == pytest.approx(0.25)  # warm-up (10ba) done
    assert rows[5]["l0/layer/target_sparsity"] == pytest.approx(0.25 * 5 / 10)
    assert os.listdir(os.path.join(str(tmp_path), "wandb"))  # offline wandb run written

    out = str(tmp_path / "from_checkpoint")
    proc = run([os.path.join(BIN, "llmshearing"), "export", os.path.join(folder, "ep0-ba30-rank0.pt"), out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = AutoModelForCausalLM.from_pretrained(out).eval()
    b = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "export")).eval()
    ids = torch.randint(0, a.config.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=0, rtol=0)
        # the masked model of the checkpoint with the export's (target-shape) masks computes what the export computes
        _, masked = load_checkpoint(os.path.join(folder, "ep0-ba30-rank0.pt"))
        with masked.l0.target_masks():
            torch.testing.assert_close(a(ids).logits, masked({"input_ids": ids}), atol=1e-4, rtol=0)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"]) == (3, 48, 2, 1, 64)
    with open(os.path.join(out, "pruning.json")) as f:
        assert len(json.load(f)["layers"]) == 3

    again = run([os.path.join(BIN, "llmshearing"), "export", os.path.join(folder, "ep0-ba30-rank0.pt"), out])
    assert again.returncode == 2 and "holds an earlier export; pass --overwrite" in again.stderr  # nothing overwritten silently

    # Dynamic batch loading: after every eval the weights follow the paper's rule from the logged losses.
    rows = weights_log(folder)
    assert [r["batch"] for r in rows] == [10, 20, 30] and [r["effect_batch"] for r in rows] == [10, 20, 30]
    previous = [0.5, 0.5]  # equal proportions in the tiny shards
    for row in rows:
        expected, _ = update_weights(previous, row["losses"], [4.0, 3.0], smoothing=1e-4)  # the default rule: paper
        assert row["weights"] == pytest.approx(expected.tolist(), abs=1e-12)
        previous = row["weights"]
    with open(os.path.join(folder, "domain_weights.json")) as f:
        assert list(json.load(f).values()) == pytest.approx(rows[-1]["weights"])
    for name in ("domain_weights.png", "domain_gaps.png"):
        assert os.path.getsize(os.path.join(folder, name)) > 0
    ckpt = torch.load(os.path.join(folder, "ep0-ba30-rank0.pt"), map_location="cpu", weights_only=False)
    state = ckpt["state"]["dataset_state"]["train"]
    # set by the eval after batch 30, in effect from batch 30 (the next one): nothing left pending
    assert state["batch"] == 30 and sum(state["counts"]) == 30 * 4 and state["weights"] == rows[2]["weights"]
    assert state["pending"] == []

    # Resume from the batch-15 checkpoint (2 dataloader workers): the same batches, the same mask noise,
    # so the same evals, domain weights and final weights, bit for bit.
    resumed = str(tmp_path / "resumed")
    proc = run([os.path.join(BIN, "composer"), "train.py", TINY_YAML, *paths(tiny_setup, resumed),
                f"load_path={folder}/ep0-ba15-rank0.pt"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert weights_log(resumed) == rows[1:]
    other = torch.load(os.path.join(resumed, "ep0-ba30-rank0.pt"), map_location="cpu", weights_only=False)
    for key, value in ckpt["state"]["model"].items():
        assert torch.equal(value, other["state"]["model"][key]), key

    # Continued pretraining of the export, starting from the weights pruning ended with.
    cont = str(tmp_path / "continue")
    proc = run([os.path.join(BIN, "composer"), "train.py", CONTINUE_YAML, f"model.path={folder}/export",
                f"data.shards={tiny_setup['shards']}", f"data.proportions={folder}/domain_weights.json",
                f"save_folder={cont}", f"export_dir={cont}/export", "progress_bar=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = weights_log(cont)[0]
    expected, _ = update_weights(rows[-1]["weights"], first["losses"], [4.0, 3.0], smoothing=1e-4)
    assert first["weights"] == pytest.approx(expected.tolist(), abs=1e-12)
    continued = AutoModelForCausalLM.from_pretrained(os.path.join(cont, "export")).eval()
    assert continued.config.to_dict()["hidden_size"] == 48 and not os.path.exists(os.path.join(cont, "export", "pruning.json"))
    with torch.no_grad():
        assert not torch.equal(continued(ids).logits, a(ids).logits)  # it trained


def test_launcher_reports_config_errors_without_traceback(tiny_setup, tmp_path):
    proc = run([sys.executable, "train.py", TINY_YAML, *paths(tiny_setup, str(tmp_path)), "schedular.name=constant"])
    assert proc.returncode == 2
    assert "unknown key 'schedular'; did you mean 'scheduler'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run_config.yaml")  # stopped before writing anything


def test_export_of_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = run([os.path.join(BIN, "llmshearing"), "export", str(tmp_path / "nope.pt"), str(tmp_path / "out")])
    assert proc.returncode == 2 and "checkpoint" in proc.stderr and "does not exist" in proc.stderr
    assert not os.path.exists(tmp_path / "out")


def test_short_pruning_run_reaches_target_shape(tiny_setup):
    """Joint training of weights, masks and multipliers drives every expected size to the target."""
    torch.manual_seed(0)
    source = load_hf_config(tiny_setup["model"])
    target = resolve_target({"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                             "num_key_value_heads": 1, "intermediate_size": 48}, source)
    train = torch.stack([DomainSequences(tiny_setup["shards"], "prose", "prune")[i]["input_ids"] for i in range(128)])
    model = ComposerLM(from_pretrained(tiny_setup["model"], attn_impl="sdpa"),
                          L0Module(shape_of(source), target, warmup_steps=50))
    model.train()
    opt = torch.optim.AdamW(model.param_groups(1e-3, 0.0, 0.1, 0.1))
    for step in range(250):
        model.l0.step = step
        rows = train[torch.randint(0, len(train), (4,))][:, :32]
        batch = {"input_ids": rows, "labels": rows}
        model.loss(model(batch), batch)["total"].backward()
        opt.step()
        opt.zero_grad()
    expected = model.l0.expected_shape()
    for key, value in target.as_dict().items():
        assert expected[key] == pytest.approx(value, rel=0.1), (key, expected)


def test_fixed_mixture_keeps_the_weights_and_logs_losses(tiny_setup, tmp_path):
    folder = str(tmp_path / "fixed")
    proc = run([sys.executable, "train.py", TINY_YAML, *paths(tiny_setup, folder), "data.dynamic=null",
                "data.proportions={prose: 0.25, code: 0.75}", "max_duration=20ba", "export_dir=null", "data.num_workers=0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = weights_log(folder)
    assert [r["weights"] for r in rows] == [[0.25, 0.75]] * 2 and all(r["gaps"] is None for r in rows)
    assert all(len(r["losses"]) == 2 for r in rows)
    assert os.path.exists(os.path.join(folder, "domain_weights.png")) and not os.path.exists(os.path.join(folder, "domain_gaps.png"))
