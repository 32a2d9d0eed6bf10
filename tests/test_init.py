"""`pruning.init`: activation-initialised masks start on the one-shot activation choice, export the target shape,
are not recomputed on resume; the uniform init is unchanged; a bad init is a clear config error."""
import json
import os
import sys

import pytest
import torch
from conftest import BIN, TINY_YAML, jsonl, paths, run

from llmshearing.errors import ConfigError
from llmshearing.experiments.reproduce import Settings, calibration_ids
from llmshearing.model.hf import load_hf_config
from llmshearing.pruning.export import kept_units
from llmshearing.pruning.masks import LOG_ALPHA_RANGE, L0Module, init_bands
from llmshearing.pruning.oneshot import oneshot_prune
from llmshearing.pruning.shapes import shape_of
from llmshearing.pruning.target import resolve_target
from llmshearing.train.config import load_config

TARGET = {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
          "intermediate_size": 64}
ACTIVATION = ["pruning.init=activation", "pruning.init_drop=null", "pruning.lagrangian_warmup=0ba"]


def built(cfg):
    """The ComposerLM of `build_trainer(cfg)` as the Trainer holds it before training (step 0)."""
    from llmshearing.compat import close_trainer
    from llmshearing.train.builders import build_trainer
    from llmshearing.train.config import run_dir
    from llmshearing.train.run_folder import unlock

    trainer, _ = build_trainer(cfg)
    try:
        return trainer.state.model
    finally:
        close_trainer(trainer)
        unlock(run_dir(cfg))


def test_activation_init_starts_on_the_oneshot_act_choice(tiny_setup, tmp_path, capsys):
    folder = str(tmp_path / "run")
    model = built(load_config(TINY_YAML, [*paths(tiny_setup, folder), "data.num_workers=0", *ACTIVATION]))
    l0 = model.l0
    assert "mask init: activation importance on 8 calibration sequences (512 tokens" in capsys.readouterr().out

    # the oneshot_act arm of reproduce-mini on the same shards: same calibration sequences, same keep sets
    ids = calibration_ids(Settings(shards=tiny_setup["shards"], calibration=4))
    oneshot = oneshot_prune(tiny_setup["model"], TARGET, str(tmp_path / "oneshot"), method="activation",
                            calibration=ids)
    kept = kept_units(l0)
    for key in ("layers", "hidden", "kv_heads", "heads", "intermediate"):
        assert kept[key] == oneshot[key], key

    (k_low, k_high), (d_low, d_high) = init_bands(LOG_ALPHA_RANGE)
    for name, mask in l0.masks.items():
        alpha = mask.log_alpha.detach()
        chosen = torch.zeros_like(alpha, dtype=torch.bool).scatter_(-1, mask.keep_index(), True)
        assert ((alpha > k_low) & (alpha < k_high))[chosen].all(), name  # inside the clamp range: trainable
        assert ((alpha > d_low) & (alpha < d_high))[~chosen].all(), name
        assert (alpha.sort(-1).values.diff(dim=-1) > 0).all(), name  # no ties in a row: the scores' order

    with open(os.path.join(folder, "mask_init.json")) as f:
        record = json.load(f)
    assert record["calibration_tokens"] == int(ids.numel()) == 512 and record["calibration_sequences"] == 8
    assert record["expected_shape_step0"] == pytest.approx(l0.expected_shape())
    for key, value in TARGET.items():  # the masks start near the target, not near the source
        assert abs(record["expected_shape_step0"][key] - value) < 0.15 * value, key


def test_uniform_init_is_unchanged(tiny_setup, tmp_path, monkeypatch):
    """The default draws what it drew before this option existed (a function of the seed alone) and scores nothing."""
    import llmshearing.pruning.oneshot as oneshot

    monkeypatch.setattr(oneshot, "activation_scores", lambda *a: pytest.fail("uniform init scored activations"))
    folder = str(tmp_path / "run")
    cfg = load_config(TINY_YAML, [*paths(tiny_setup, folder), "data.num_workers=0", "pruning.init_drop=null"])
    assert cfg.pruning.init == "uniform"
    l0 = built(cfg).l0
    source = load_hf_config(tiny_setup["model"])
    fresh = L0Module(shape_of(source), resolve_target(TARGET, source), seed=cfg.seed)
    for name, mask in l0.masks.items():
        assert torch.equal(mask.log_alpha, fresh.masks[name].log_alpha), name
    # N(5, 0.01) from the seed, as before this option (values drawn by the code of commit 7988cef, seed 17)
    assert l0.masks["layer"].log_alpha.tolist() == pytest.approx([4.9859, 5.0023, 5.0003, 5.0035], abs=1e-4)
    assert not os.path.exists(os.path.join(folder, "mask_init.json"))


@pytest.mark.slow
def test_activation_init_run_exports_the_target_and_resume_does_not_rescore(tiny_setup, tmp_path):
    """The real launcher: the export has the target shape; resuming from a checkpoint takes the masks from it
    (no scoring, no record) and ends bit-identical to the uninterrupted run."""
    folder, resumed = str(tmp_path / "run"), str(tmp_path / "resumed")
    common = [sys.executable, "train.py", TINY_YAML, *ACTIVATION, "max_duration=10ba", "save_interval=5ba",
              "eval_interval=10ba", "log_to_console=false"]
    proc = run([*common, *paths(tiny_setup, folder)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("mask init: activation importance") == 1
    with open(os.path.join(folder, "export", "config.json")) as f:
        config = json.load(f)
    assert {k: config[k] for k in TARGET} == TARGET

    proc = run([*common, *paths(tiny_setup, resumed), f"load_path={folder}/ep0-ba5-rank0.pt"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mask init" not in proc.stdout and not os.path.exists(os.path.join(resumed, "mask_init.json"))
    a = torch.load(os.path.join(folder, "ep0-ba10-rank0.pt"), map_location="cpu", weights_only=False)["state"]["model"]
    b = torch.load(os.path.join(resumed, "ep0-ba10-rank0.pt"), map_location="cpu", weights_only=False)["state"]["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_fsdp_ranks_start_from_rank0s_init(tiny_setup, tmp_path):
    """Under FSDP only rank 0 reads the weights and scores; the other rank gets its log_alpha by broadcast (without
    it, the eval's rank check would find the ranks' masks differ and stop the run)."""
    folder = str(tmp_path / "two")
    recipe = os.path.join("yamls", "testing", "prune_tiny_fsdp.yaml")
    proc = run([os.path.join(BIN, "composer"), "-n", "2", "train.py", recipe,
                *paths(tiny_setup, folder), *ACTIVATION, "max_duration=2ba", "eval_interval=2ba", "save_interval=2ba",
                "export_dir=null", "data.num_workers=0"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("mask init: activation importance") == 1  # rank 0 alone
    assert [r["ranks"] for r in jsonl(os.path.join(folder, "rank_checks.jsonl"))] == [2]


def test_autoresume_is_a_resume(tiny_setup, tmp_path):
    from llmshearing.train.mask_init import resumes

    folder = tmp_path / "run"
    cfg = load_config(TINY_YAML, [*paths(tiny_setup, str(folder)), *ACTIVATION, "autoresume=true"])
    assert not resumes(cfg)
    folder.mkdir()
    (folder / "ep0-ba5-rank0.pt").write_bytes(b"")
    os.symlink("ep0-ba5-rank0.pt", folder / "latest-rank0.pt")
    assert resumes(cfg)


@pytest.mark.parametrize("held, says", [(["pruning.mask_eps=1e-3"], "pruning.mask_eps=null"),
                                        (["pruning.lambda_optimizer=sgd"], "without pruning.penalty"),
                                        (["pruning.lambda_optimizer=sgd", "pruning.penalty=10000"], "half open"),
                                        (["pruning.init_at_target=true"], "use pruning.lagrangian_warmup=0ba")])
def test_the_uniform_init_with_settings_measured_to_fail_warns_and_the_released_settings_do_not(
        tiny_setup, tmp_path, capsys, held, says):
    folder = str(tmp_path / "run")
    uniform = [*paths(tiny_setup, folder), "pruning.init=uniform", "pruning.lagrangian_warmup=2ba"]
    load_config(TINY_YAML, uniform)
    assert "warning: pruning.init" not in capsys.readouterr().err
    load_config(TINY_YAML, [*uniform, *held])
    assert says in capsys.readouterr().err
    load_config(TINY_YAML, [*paths(tiny_setup, folder), *ACTIVATION, *held])
    assert says not in capsys.readouterr().err


def test_the_uniform_init_with_the_penalty_says_what_was_measured_at_its_ramp_length(tiny_setup, tmp_path, capsys):
    """pruning.penalty with plain multipliers left the uniform init's gates half open with a 16-step ramp (round 5); with
    an 80-step one they decide and the model ends no worse (rounds 6-7): a shorter ramp warns, a long one does not."""
    damped = [*paths(tiny_setup, str(tmp_path / "run")), "pruning.init=uniform", "pruning.lambda_optimizer=sgd",
              "pruning.penalty=10000", "max_duration=200ba"]
    load_config(TINY_YAML, [*damped, "pruning.lagrangian_warmup=79ba"])
    err = capsys.readouterr().err
    assert "half open" in err and "an 80-step ramp or longer lets the gates decide" in err
    load_config(TINY_YAML, [*damped, "pruning.lagrangian_warmup=80ba"])
    assert "pruning.penalty" not in capsys.readouterr().err


def test_activation_init_with_a_warmup_warns(tiny_setup, tmp_path, capsys):
    load_config(TINY_YAML, [*paths(tiny_setup, str(tmp_path / "run")), *ACTIVATION, "pruning.lagrangian_warmup=10ba"])
    assert "the Lagrangian first reopens them" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("pruning.init=magnitude", "pruning.init must be uniform (every gate starts open) or activation"),
    ("pruning.init_sequences=0", "pruning.init_sequences must be >= 1"),
    ("pruning.log_alpha_clamp=[-1,1]", "is too narrow for both"),
])
def test_bad_init_is_a_config_error(tiny_setup, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(TINY_YAML, [*paths(tiny_setup, str(tmp_path / "run")), *ACTIVATION, override])
