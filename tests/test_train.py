"""End to end: the real Composer launcher on the tiny recipe, checkpoint -> `llmshearing export` -> HF."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM

from llmshearing.arch import load_hf_config, resolve_target, shape_of
from llmshearing.composer_model import ShearingModel
from llmshearing.data import build_datasets
from llmshearing.l0 import L0Module
from llmshearing.model import from_pretrained
from llmshearing.train import load_pruning_checkpoint

TINY_YAML = os.path.join("yamls", "testing", "prune_tiny.yaml")
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": REPO}


def paths(setup, folder):
    return [f"model.path={setup['model']}", f"data.domains.prose={setup['prose']}",
            f"data.domains.code={setup['code']}", f"save_folder={folder}", f"export_dir={folder}/export"]


def run(args, **kw):
    return subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300, **kw)


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
        # the masked model of the checkpoint in eval mode computes what the export computes
        _, masked = load_pruning_checkpoint(os.path.join(folder, "ep0-ba30-rank0.pt"))
        torch.testing.assert_close(a(ids).logits, masked({"input_ids": ids}), atol=1e-4, rtol=0)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"]) == (3, 48, 2, 1, 64)
    with open(os.path.join(out, "pruning.json")) as f:
        assert len(json.load(f)["layers"]) == 3

    again = run([os.path.join(BIN, "llmshearing"), "export", os.path.join(folder, "ep0-ba30-rank0.pt"), out])
    assert again.returncode == 2 and "exists; pass overwrite" in again.stderr  # nothing overwritten silently


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
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    source = load_hf_config(tiny_setup["model"])
    target = resolve_target({"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                             "num_key_value_heads": 1, "intermediate_size": 48}, source)
    train, _ = build_datasets({"prose": tiny_setup["prose"]}, AutoTokenizer.from_pretrained(tiny_setup["model"]),
                              32, 64, 20000)
    model = ShearingModel(from_pretrained(tiny_setup["model"], attn_impl="sdpa"),
                          L0Module(shape_of(source), target, warmup_steps=50))
    model.train()
    opt = torch.optim.AdamW(model.param_groups(1e-3, 0.0, 0.1, 0.1))
    for step in range(250):
        model.l0.step = step
        batch = train[torch.randint(0, len(train), (4,))]
        model.loss(model(batch), batch)["total"].backward()
        opt.step()
        opt.zero_grad()
    expected = model.l0.expected_shape()
    for key, value in target.as_dict().items():
        assert expected[key] == pytest.approx(value, rel=0.1), (key, expected)
