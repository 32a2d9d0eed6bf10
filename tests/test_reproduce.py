"""`make reproduce-mini` end to end at the smallest scale on the tiny setup: every arm through the real
Composer trainer, equal budgets read from the checkpoints, the table, the plots, the fixed arm, resumption."""
import dataclasses
import gc
import glob
import json
import os

import pytest
import torch
from composer.core import State

from llmshearing.train.composer_model import ComposerLM
from llmshearing.errors import ConfigError
from llmshearing.experiments.reproduce import reproduce, Settings

pytestmark = pytest.mark.slow  # Composer training runs / subprocesses: left out of `make test-fast`

TARGET = {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
          "intermediate_size": 64}
ARMS = ["sheared", "scratch", "oneshot", "oneshot_act", "fixed", "sheared_p50"]
DOMAINS = ["prose", "code"]
STEPS, BATCH, SEQ = 8, 2, 64  # the tiny shards hold 64-token sequences


def checkpoint(folder):
    """The last Composer checkpoint of a stage folder, read here independently of llmshearing.experiments.reproduce."""
    paths = glob.glob(os.path.join(folder, "ep0-ba*-rank0.pt"))
    assert len(paths) == 1, paths
    return torch.load(paths[0], map_location="cpu", weights_only=False)["state"]


def rows(folder):
    with open(os.path.join(folder, "domain_weights.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.timeout(400)
def test_reproduce_mini_end_to_end(tiny_setup, tmp_path, capsys):
    out = str(tmp_path / "out")
    target = "{" + ", ".join(f"{k}: {v}" for k, v in TARGET.items()) + "}"
    s = Settings(out=out, model=tiny_setup["model"], shards=tiny_setup["shards"], target=target, steps=STEPS,
                 batch=BATCH, prune_share=0.25, sweep=(0.25, 0.5), evals=4, keep_checkpoints=True,
                 # below the tiny random model's losses (~6 nats), so the dynamic arms' weights have to move
                 reference_losses="{prose: 4.0, code: 3.0}", overrides=("optimizer.lr=1e-3",))
    # The default arms leave out the magnitude one-shot arm; asked for later, it joins the same folder's summary.
    default = reproduce(s)
    assert list(default["arms"]) == [a for a in ARMS if a != "oneshot"]
    # Each stage's trainer is freed once it is done (Composer's atexit hook used to hold all ten: 16.5 GB at scale 1).
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) in (ComposerLM, State)]
    summary = reproduce(s, ["oneshot"])
    assert list(summary["arms"]) == ARMS
    for name in ("summary.json", "summary.md", "loss_curves.png", "domain_weights.png", "prune_share.png",
                 "source_losses.json", *(f"{arm}/result.json" for arm in ARMS)):
        assert os.path.getsize(os.path.join(out, name)) > 0, name

    # Equal budgets, from the Composer checkpoints of every stage: batches, samples, tokens and the mixture's counts.
    prune_batches = {"sheared": 2, "fixed": 2, "sheared_p50": 4, "scratch": 0, "oneshot": 0, "oneshot_act": 0}
    for arm in ARMS:
        stages = ["prune", "continue"] if prune_batches[arm] else ["continue"]
        tokens = 0
        for stage in stages:
            state = checkpoint(os.path.join(out, arm, stage))
            ts = state["timestamp"]["Timestamp"]
            data = state["dataset_state"]["train"]
            want = prune_batches[arm] if stage == "prune" else STEPS - prune_batches[arm]
            assert ts["batch"] == want and ts["sample"] == want * BATCH == sum(data["counts"]), (arm, stage)
            assert ts["token"] == ts["sample"] * SEQ
            tokens += ts["token"]
        assert tokens == STEPS * BATCH * SEQ == summary["arms"][arm]["total_tokens"], arm
    assert summary["equal_budget"]

    # The table: every arm x domain, numbers that are the perplexities of the summary's losses.
    with open(os.path.join(out, "summary.md")) as f:
        report = f.read()
    table = report.split("\n\n")[2].splitlines()
    assert table[0] == "| arm | prose | code | mean |"
    body = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert list(body) == ["source (not pruned)", *ARMS]
    for arm in ARMS:
        cells = [float(c) for c in body[arm].strip("| ").split(" | ")[1:]]
        ppl = summary["arms"][arm]["final_perplexity"]
        assert cells[:2] == pytest.approx([ppl[d] for d in DOMAINS], abs=0.006) and all(c > 1 for c in cells)
        # the curves end where the final table is: the trainer's last eval = domain_losses of the reloaded export
        last = summary["arms"][arm]["curve"][-1]
        assert last["tokens"] == STEPS * BATCH * SEQ
        assert [last["losses"][d] for d in DOMAINS] == pytest.approx(
            [summary["arms"][arm]["final_losses"][d] for d in DOMAINS], abs=1e-4)

    # The fixed arm never changed its weights; the dynamic sheared arm did.
    for stage in ("prune", "continue"):
        assert all(r["weights"] == [0.5, 0.5] and r["gaps"] is None for r in rows(os.path.join(out, "fixed", stage)))
    assert any(r["weights"] != [0.5, 0.5] for r in rows(os.path.join(out, "sheared", "prune")))
    assert summary["arms"]["sheared"]["start_weights"] == {"prose": 0.5, "code": 0.5}
    with open(os.path.join(out, "sheared", "prune", "domain_weights.json")) as f:
        pruned_end = json.load(f)
    with open(os.path.join(out, "sheared", "continue.json")) as f:
        assert json.load(f)["start_weights"] == pytest.approx(pruned_end)  # continued from pruning's mixture

    # Every arm's models have the target shape; one-shot kept units by magnitude, scratch is not the source.
    for arm in ARMS:
        for model in ("init" if arm in ("scratch", "oneshot", "oneshot_act") else "pruned", "continued"):
            with open(os.path.join(out, arm, model, "config.json")) as f:
                config = json.load(f)
            assert {k: config[k] for k in TARGET} == TARGET, (arm, model)
    with open(os.path.join(out, "oneshot", "init", "pruning.json")) as f:
        assert json.load(f)["scoring"].startswith("magnitude")
    with open(os.path.join(out, "oneshot_act", "init", "pruning.json")) as f:
        assert json.load(f)["scoring"].startswith("activation")
    # calibration reads 4 prune sequences per domain, forward only, reported apart from the training budget
    assert summary["arms"]["oneshot_act"]["calibration_tokens"] == 4 * len(DOMAINS) * SEQ
    assert all(summary["arms"][a]["calibration_tokens"] == 0 for a in ARMS if a != "oneshot_act")
    assert not os.path.exists(os.path.join(out, "scratch", "init", "pruning.json"))
    start = summary["arms"]
    assert start["scratch"]["start_of_continue_losses"] != start["oneshot"]["start_of_continue_losses"]

    # Resumable and idempotent: a second run skips every arm and rewrites the same numbers.
    mtimes = {arm: os.path.getmtime(os.path.join(out, arm, "result.json")) for arm in ARMS}
    capsys.readouterr()
    again = reproduce(s, ARMS)  # ("all" would add the optional issue-15 arms)
    log = capsys.readouterr().out
    assert log.count("skipped") == len(ARMS)
    assert mtimes == {arm: os.path.getmtime(os.path.join(out, arm, "result.json")) for arm in ARMS}
    assert {a: v["final_losses"] for a, v in again["arms"].items()} == {a: v["final_losses"] for a, v in summary["arms"].items()}

    # Another scale in the same folder is refused before anything runs (its arms would look done).
    with pytest.raises(ConfigError, match="total_steps: 8 there, 16 now"):
        reproduce(dataclasses.replace(s, scale=2.0))

    # An arm interrupted after its pruning stage resumes with continued pretraining only.
    arm = os.path.join(out, "sheared_p50")
    prune_record = os.path.getmtime(os.path.join(arm, "prune.json"))
    for name in ("result.json", "continue.json"):
        os.remove(os.path.join(arm, name))
    resumed = reproduce(s)
    assert os.path.getmtime(os.path.join(arm, "prune.json")) == prune_record
    assert resumed["arms"]["sheared_p50"]["total_tokens"] == STEPS * BATCH * SEQ
    assert [r["batch"] for r in rows(os.path.join(arm, "continue"))] == [2, 4]  # the log was not appended to
    assert resumed["arms"]["sheared_p50"]["final_losses"] == pytest.approx(summary["arms"]["sheared_p50"]["final_losses"], abs=1e-5)


@pytest.mark.timeout(600)
def test_beyond_the_paper_arms_over_seeds(tiny_setup, tmp_path):
    """The issue-15 arms (distillation, activation-initialised masks) through the real trainer, two seeds, and the
    summary over seeds: per arm each seed's final mean eval loss, read back from that seed's own summary."""
    from llmshearing.experiments.reproduce import main

    out = str(tmp_path / "seeds")
    target = "{" + ", ".join(f"{k}: {v}" for k, v in TARGET.items()) + "}"
    arms = ["sheared", "sheared_kd", "sheared_act_kd", "oneshot_act_kd"]
    assert main(["--out", out, "--model", tiny_setup["model"], "--shards", tiny_setup["shards"], "--target", target,
                 "--steps", str(STEPS), "--batch", str(BATCH), "--evals", "2", "--reference-losses",
                 "{prose: 4.0, code: 3.0}", "--seeds", "1", "2", "--arms", *arms]) == 0
    combined = json.load(open(os.path.join(out, "summary.json")))
    assert combined["seeds"] == ["1", "2"] and list(combined["arms"]) == arms and combined["equal_budget"]
    for seed in ("1", "2"):
        own = json.load(open(os.path.join(out, f"seed-{seed}", "summary.json")))
        assert own["settings"]["seed"] == int(seed)
        for arm in arms:
            assert combined["arms"][arm]["final_mean_loss_by_seed"][seed] == own["arms"][arm]["final_mean_loss"]
            assert own["arms"][arm]["final_mean_loss_by_seed"] == {seed: own["arms"][arm]["final_mean_loss"]}
    by_seed = combined["arms"]["sheared"]["final_mean_loss_by_seed"]
    assert by_seed["1"] != by_seed["2"]  # the seed reaches the data order and the mask noise
    assert combined["arms"]["sheared"]["final_mean_loss_range"] == [min(by_seed.values()), max(by_seed.values())]

    run_config = lambda arm, stage: open(os.path.join(out, "seed-1", arm, stage, "run_config.yaml")).read()  # noqa: E731
    assert "distill: null" in run_config("sheared", "prune")  # the paper's arms whatever the demo recipes default to
    assert "distill: null" in run_config("sheared", "continue")
    assert "init: uniform" in run_config("sheared", "prune") and "lagrangian_warmup: 0ba" not in run_config("sheared", "prune")
    assert "teacher: source" in run_config("sheared_kd", "prune")
    assert f"teacher: {tiny_setup['model']}" in run_config("sheared_kd", "continue")
    assert f"teacher: {tiny_setup['model']}" in run_config("oneshot_act_kd", "continue")
    assert "init: activation" in run_config("sheared_act_kd", "prune")
    assert "init: uniform" in run_config("sheared_kd", "prune")
    record = json.load(open(os.path.join(out, "seed-1", "sheared_act_kd", "prune", "mask_init.json")))
    assert combined["arms"]["sheared_act_kd"]["calibration_tokens"] == record["calibration_tokens"] == 4 * 2 * SEQ
    assert combined["arms"]["oneshot_act_kd"]["calibration_tokens"] == 4 * 2 * SEQ
    assert combined["arms"]["sheared_kd"]["calibration_tokens"] == 0
    kd_log = [json.loads(line) for line in open(os.path.join(out, "seed-1", "sheared_kd", "prune", "pruning_log.jsonl"))]
    assert kd_log  # the pruning stage ran and logged
    md = open(os.path.join(out, "summary.md")).read()
    assert all(f"| {arm} | 2 |" in md for arm in arms)
