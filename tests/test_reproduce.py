"""`make reproduce-mini` end to end at the smallest scale on the tiny setup: every arm through the real
Composer trainer, equal budgets read from the checkpoints, the table, the plots, the fixed arm, resumption."""
import dataclasses
import gc
import glob
import json
import math
import os

import pytest
import torch
import yaml
from composer.core import State

from llmshearing.train.composer_model import ComposerLM
from llmshearing.errors import ConfigError
from llmshearing.experiments.reproduce import format_report, reproduce, Settings

pytestmark = pytest.mark.slow  # Composer training runs / subprocesses: left out of `make test-fast`

TARGET = {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
          "intermediate_size": 64}
ARMS = ["sheared", "scratch", "oneshot", "oneshot_act", "fixed", "sheared_p50"]
DOMAINS = ["prose", "code"]
STEPS, BATCH, SEQ = 8, 2, 64  # the tiny shards hold 64-token sequences


def checkpoint(folder):
    """The last Composer checkpoint of a stage folder (one per eval are kept here), read here independently of
    llmshearing.experiments.reproduce."""
    paths = glob.glob(os.path.join(folder, "ep0-ba*-rank0.pt"))
    assert paths, folder
    last = max(paths, key=lambda p: int(os.path.basename(p)[len("ep0-ba"):-len("-rank0.pt")]))
    return torch.load(last, map_location="cpu", weights_only=False)["state"]


def losses_of(model_path, shards):
    """Per-domain mean next-token loss of an HF model folder on the test and eval splits, computed here."""
    from streaming import LocalDataset
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    out = {}
    for split in ("test", "eval"):
        out[split] = {}
        for d in DOMAINS:
            ds = LocalDataset(local=os.path.join(shards, d, split))
            ids = torch.tensor([list(ds[i]["tokens"]) for i in range(len(ds))], dtype=torch.long)
            with torch.no_grad():
                out[split][d] = float(hf(input_ids=ids, labels=ids).loss)
    return out


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
                 "source_losses.json", "source_test_losses.json", *(f"{arm}/result.json" for arm in ARMS)):
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

    # The table: every arm x domain, numbers that are the perplexities of the summary's losses, on the test split.
    with open(os.path.join(out, "summary.md")) as f:
        report = f.read()
    assert summary["split"] == "test" and "on the shards' test split after the whole budget" in report
    table = report.split("\n\n")[2].splitlines()
    assert table[0] == "| arm | prose | code | mean |"
    body = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert list(body) == ["source (not pruned)", *ARMS]
    for arm in ARMS:
        cells = [float(c) for c in body[arm].strip("| ").split(" | ")[1:]]
        ppl = summary["arms"][arm]["final_perplexity"]
        assert cells[:2] == pytest.approx([ppl[d] for d in DOMAINS], abs=0.006) and all(c > 1 for c in cells)
        # the final numbers are the reloaded export's test losses; the curves (the trainers' evals, which steer
        # dynamic loading) end at its eval losses: two document-disjoint splits, two different numbers
        final = losses_of(os.path.join(out, arm, "continued"), tiny_setup["shards"])
        last = summary["arms"][arm]["curve"][-1]
        assert last["tokens"] == STEPS * BATCH * SEQ
        assert [summary["arms"][arm]["final_losses"][d] for d in DOMAINS] == pytest.approx(
            [final["test"][d] for d in DOMAINS], abs=1e-5)
        assert [last["losses"][d] for d in DOMAINS] == pytest.approx([final["eval"][d] for d in DOMAINS], abs=1e-4)
        assert final["test"] != pytest.approx(final["eval"], abs=1e-3)
    source = losses_of(tiny_setup["model"], tiny_setup["shards"])
    assert summary["source"]["losses"] == pytest.approx(source["test"], abs=1e-5)
    assert summary["source"]["eval_losses"] == pytest.approx(source["eval"], abs=1e-5)  # dynamic loading's reference

    # What each stage read of its split, from the checkpoints' counts: the tiny continue split holds
    # ceil(16384 * 0.5 / 64) = 128 sequences per domain, so nothing repeats at this budget, and the report says so.
    for arm in ARMS:
        read = summary["arms"][arm]["passes"]["continue"]
        assert sum(k * 128 for k in read.values()) == pytest.approx((STEPS - prune_batches[arm]) * BATCH), arm
        assert max(read.values()) < 1
    assert "No data repeated: no stage read more than its split holds of any domain." in report
    arms = summary["arms"]
    repeated = {**arms, "sheared": {**arms["sheared"], "passes": {"continue": {"prose": 1.5, "code": 0.5}}}}
    assert "Data repeated (passes over a domain's split, each a fresh permutation): sheared continue prose 1.50." \
        in format_report({**summary, "arms": repeated})

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
    # A folder of arms run on other shards (before the test split: no build recorded) is refused too.
    settings = json.load(open(os.path.join(out, "settings.json")))
    with open(os.path.join(out, "settings.json"), "w") as f:
        json.dump({k: v for k, v in settings.items() if k != "shards_build"}, f)
    with pytest.raises(ConfigError, match="shards_build: None there"):
        reproduce(s)
    with open(os.path.join(out, "settings.json"), "w") as f:
        json.dump(settings, f)

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

    # A stage killed mid-way resumes from its checkpoint at the last eval and ends where the whole stage ended: the
    # continue stage cut back to its batch-2 checkpoint (what a kill after that eval leaves: a later log row, no
    # record; this run keeps every checkpoint) and run by the same command.
    folder = os.path.join(arm, "continue")
    assert sorted(glob.glob(os.path.join(folder, "ep0-ba*-rank0.pt"))) == [os.path.join(folder, f"ep0-ba{b}-rank0.pt") for b in (2, 4)]
    for name in ("result.json", "continue.json", os.path.join("continue", "ep0-ba4-rank0.pt")):
        os.remove(os.path.join(arm, name))
    os.remove(os.path.join(folder, "latest-rank0.pt"))
    os.symlink("ep0-ba2-rank0.pt", os.path.join(folder, "latest-rank0.pt"))
    capsys.readouterr()
    again = reproduce(s)["arms"]["sheared_p50"]
    assert "sheared_p50/continue: resuming from ep0-ba2-rank0.pt" in capsys.readouterr().out
    assert again["final_losses"] == resumed["arms"]["sheared_p50"]["final_losses"]  # bit for bit
    assert [r["batch"] for r in rows(folder)] == [2, 4]
    assert again["total_tokens"] == STEPS * BATCH * SEQ


@pytest.mark.timeout(900)
def test_beyond_the_paper_arms_over_seeds(tiny_setup, tmp_path):
    """The issue-15 arms (distillation, activation-initialised masks) and sheared_act (activation init without
    distillation) through the real trainer, two seeds, and the summary over seeds: per arm each seed's final mean
    test loss, read back from that seed's own summary; then a run at scale 2 and the plot of final test perplexity
    against training tokens."""
    from llmshearing.experiments.reproduce import main, plot_scales

    out = str(tmp_path / "seeds")
    target = "{" + ", ".join(f"{k}: {v}" for k, v in TARGET.items()) + "}"
    arms = ["sheared", "sheared_act", "sheared_kd", "sheared_act_kd", "oneshot_act_kd"]
    assert main(["--out", out, "--model", tiny_setup["model"], "--shards", tiny_setup["shards"], "--target", target,
                 "--steps", str(STEPS), "--batch", str(BATCH), "--evals", "2", "--reference-losses",
                 "{prose: 4.0, code: 3.0}", "--seeds", "1", "2", "--arms", *arms]) == 0
    combined = json.load(open(os.path.join(out, "summary.json")))
    assert combined["seeds"] == ["1", "2"] and list(combined["arms"]) == arms and combined["equal_budget"]
    assert combined["split"] == "test"
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
    # the released code's multiplier optimisation in every arm, whatever the demo recipe defaults to (issue 25)
    for arm in ("sheared", "sheared_act"):
        pruning = yaml.safe_load(run_config(arm, "prune"))["pruning"]
        assert (pruning["lambda_optimizer"], pruning["lambda_lr"], pruning["mask_lr"], pruning["mask_eps"]) == (
            "adam", 0.3, 0.3, None)
        assert pruning["log_alpha_clamp"] == pytest.approx([math.log(0.01), math.log(100)])
    assert "teacher: source" in run_config("sheared_kd", "prune")
    assert f"teacher: {tiny_setup['model']}" in run_config("sheared_kd", "continue")
    assert f"teacher: {tiny_setup['model']}" in run_config("oneshot_act_kd", "continue")
    assert "init: activation" in run_config("sheared_act_kd", "prune")
    # sheared_act: what it says, activation-initialised masks with no warm-up, and no distillation in either stage
    assert "init: activation" in run_config("sheared_act", "prune") and "lagrangian_warmup: 0ba" in run_config("sheared_act", "prune")
    assert "distill: null" in run_config("sheared_act", "prune") and "distill: null" in run_config("sheared_act", "continue")
    assert combined["arms"]["sheared_act"]["mask_init"] == "activation" and not combined["arms"]["sheared_act"]["distill"]
    assert combined["arms"]["sheared_act"]["calibration_tokens"] == 4 * 2 * SEQ
    assert "init: uniform" in run_config("sheared_kd", "prune")
    record = json.load(open(os.path.join(out, "seed-1", "sheared_act_kd", "prune", "mask_init.json")))
    assert combined["arms"]["sheared_act_kd"]["calibration_tokens"] == record["calibration_tokens"] == 4 * 2 * SEQ
    assert combined["arms"]["oneshot_act_kd"]["calibration_tokens"] == 4 * 2 * SEQ
    assert combined["arms"]["sheared_kd"]["calibration_tokens"] == 0
    kd_log = [json.loads(line) for line in open(os.path.join(out, "seed-1", "sheared_kd", "prune", "pruning_log.jsonl"))]
    assert kd_log  # the pruning stage ran and logged
    md = open(os.path.join(out, "summary.md")).read()
    assert all(f"| {arm} | 2 |" in md for arm in arms)
    # the over-seeds summary keeps each seed's passes and says whether any data repeated
    assert combined["arms"]["sheared_kd"]["passes_by_seed"]["2"] == own["arms"]["sheared_kd"]["passes"]
    assert md.rstrip().endswith("No data repeated: no stage read more than its split holds of any domain.")

    # --scale 2 for one arm, one seed, then the budget plot over both runs (nothing trained by the plot)
    out2 = str(tmp_path / "scale2")
    assert main(["--out", out2, "--model", tiny_setup["model"], "--shards", tiny_setup["shards"], "--target", target,
                 "--steps", str(STEPS), "--batch", str(BATCH), "--evals", "2", "--reference-losses",
                 "{prose: 4.0, code: 3.0}", "--seed", "1", "--scale", "2", "--arms", "sheared_act"]) == 0
    plots = str(tmp_path / "plots")
    assert main(["--out", plots, "--plot-scales", os.path.join(out, "summary.json"),
                 os.path.join(out2, "summary.json")]) == 0
    scales = json.load(open(os.path.join(plots, "scales.json")))
    assert scales["split"] == "test" and os.path.getsize(os.path.join(plots, "scales.png")) > 0
    pts = scales["arms"]["sheared_act"]
    assert [p["tokens"] for p in pts] == [STEPS * BATCH * SEQ, 2 * STEPS * BATCH * SEQ]
    by_seed = combined["arms"]["sheared_act"]["final_mean_loss_by_seed"]
    assert pts[0]["perplexity"] == pytest.approx(math.exp(sum(by_seed.values()) / 2))
    assert pts[0]["perplexity_range"] == pytest.approx([math.exp(min(by_seed.values())), math.exp(max(by_seed.values()))])
    scale2 = json.load(open(os.path.join(out2, "summary.json")))["arms"]["sheared_act"]
    assert pts[1]["seeds"] == ["1"] and pts[1]["perplexity"] == pytest.approx(math.exp(scale2["final_mean_loss"]))
    assert [p["tokens"] for p in scales["arms"]["sheared"]] == [STEPS * BATCH * SEQ]  # only at scale 1
    # --parallel 2: the same arms of seed 1 as two one-thread processes at once give what the serial run gave
    outp = str(tmp_path / "parallel")
    common = ["--model", tiny_setup["model"], "--shards", tiny_setup["shards"], "--target", target, "--steps", str(STEPS),
              "--batch", str(BATCH), "--evals", "2", "--reference-losses", "{prose: 4.0, code: 3.0}", "--seeds", "1",
              "--parallel", "2", "--arms", "sheared", "sheared_act"]
    assert main(["--out", outp, *common]) == 0
    par = json.load(open(os.path.join(outp, "summary.json")))
    assert par["seeds"] == ["1"] and list(par["arms"]) == ["sheared", "sheared_act"]
    for arm in ("sheared", "sheared_act"):
        assert par["arms"][arm]["final_mean_loss_by_seed"]["1"] == pytest.approx(
            combined["arms"][arm]["final_mean_loss_by_seed"]["1"], rel=1e-4)
        assert par["arms"][arm]["total_tokens"] == combined["arms"][arm]["total_tokens"]
        assert "done in" in open(os.path.join(outp, "seed-1", "logs", f"{arm}.log")).read()
    # a failing job: the error names the arm, its log and the log's last line (the job's own one-line error); an
    # override written after --arms is an override, not an arm
    with pytest.raises(RuntimeError, match=r"seed 1 sheared_kd \(exit 2; .*sheared_kd.log\): error: .*no_such_key"):
        main(["--out", str(tmp_path / "failing"), *common[:-2], "sheared_kd", "prune.no_such_key=1"])
    assert main(["--out", outp, *common[:-5], "--parallel", "0", "--arms", "sheared"]) == 2

    old = json.load(open(os.path.join(out2, "summary.json")))
    old["split"] = "eval"  # a summary written before the test split
    with open(tmp_path / "old.json", "w") as f:
        json.dump(old, f)
    for paths, match in (([os.path.join(out, "summary.json"), str(tmp_path / "old.json")], "different splits"),
                         ([os.path.join(out2, "summary.json")] * 2, "in two summaries")):
        with pytest.raises(ConfigError, match=match):
            plot_scales(paths, plots)


def test_shards_without_a_test_split_are_refused_before_any_arm_runs(tiny_setup, tmp_path, capsys):
    """Shards built before the test split: one line naming the rebuild, exit 2, nothing written (no arm trains for
    an hour and then fails at its final evaluation)."""
    from conftest import shards_before_the_test_split
    from llmshearing.experiments.reproduce import main

    old = shards_before_the_test_split(tiny_setup["shards"], tmp_path / "shards")
    out = tmp_path / "out"
    assert main(["--out", str(out), "--model", tiny_setup["model"], "--shards", old, "--steps", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no 'test' split" in err and "make shards" in err
    assert not out.exists()


def test_seed_folders_share_the_source_losses(tiny_setup, tmp_path):
    """Under --seeds each seed folder needs the source's eval and test losses; a seed folder missing them copies them
    from a sibling with the same model, shards and precision (the seed does not reach an evaluation of the source)
    instead of evaluating the source again; another model, or a folder that is not a seed's, measures its own."""
    from llmshearing.experiments.reproduce import SOURCE_FILES, check_out_dir, reuse_source_losses

    first = Settings(out=str(tmp_path / "seed-1"), model=tiny_setup["model"], shards=tiny_setup["shards"], seed=1)
    check_out_dir(first)
    for name in SOURCE_FILES:  # marked contents: a fresh measurement could not produce them
        (tmp_path / "seed-1" / name).write_text(f"measured by seed 1: {name}")
    for seed, model, shared in ((2, first.model, True), (3, str(tmp_path / "another-model"), False)):
        s = dataclasses.replace(first, out=str(tmp_path / f"seed-{seed}"), seed=seed, model=model)
        check_out_dir(s)
        reuse_source_losses(s)
        copied = [(tmp_path / f"seed-{seed}" / name).exists() for name in SOURCE_FILES]
        assert copied == [shared] * len(SOURCE_FILES), seed
    assert (tmp_path / "seed-2" / SOURCE_FILES[0]).read_text() == f"measured by seed 1: {SOURCE_FILES[0]}"
    alone = dataclasses.replace(first, out=str(tmp_path / "one-run"))
    check_out_dir(alone)
    reuse_source_losses(alone)
    assert sorted(os.listdir(alone.out)) == ["settings.json"]


def test_a_budget_that_would_repeat_data_is_refused_before_any_arm_runs(tiny_setup, tmp_path, capsys):
    """Scale 40 on the tiny shards needs 40,960 continued tokens per arm; the continue split holds 16,384 (128
    sequences of 64 tokens per domain): refused in one line that names the larger build, exit 2, nothing written.
    --allow-repeat lets it through with the passes logged."""
    from llmshearing.data.layout import read_manifest
    from llmshearing.experiments.reproduce import arm_settings, check_data_fits, main

    out = tmp_path / "out"
    args = ["--out", str(out), "--model", tiny_setup["model"], "--shards", tiny_setup["shards"], "--steps", "8",
            "--scale", "40", "--arms", "scratch"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the data would repeat at scale 40: scratch/continue trains 40,960 tokens, the "
                          "continue split holds 16,384 (2.50 passes)") and err.count("\n") == 1
    assert "--continue-tokens 81920" in err and "--allow-repeat" in err
    assert not out.exists()
    s = Settings(out=str(out), shards=tiny_setup["shards"], steps=8, scale=40, allow_repeat=True)
    check_data_fits(s, ["scratch", "sheared"], arm_settings(s), read_manifest(tiny_setup["shards"]))
    log = capsys.readouterr().out
    assert "the data will repeat (--allow-repeat): scratch/continue trains 40,960 tokens" in log
    assert "sheared/continue trains 30,720 tokens" in log and "sheared/prune" not in log  # 80 of 320 batches: fits
    # both splits short (the 50% sweep arm prunes 160 batches): the hint names both flags and what the prune one moves
    with pytest.raises(ConfigError, match="--prune-tokens 40960 --continue-tokens 40960 .*moves documents"):
        check_data_fits(dataclasses.replace(s, allow_repeat=False), ["sheared_p50"], arm_settings(s),
                        read_manifest(tiny_setup["shards"]))
    # through the CLI with --parallel: the arm runs on repeated data and the line is logged once, not once per check
    # (run_parallel's, then the summary's)
    target = "{" + ", ".join(f"{k}: {v}" for k, v in TARGET.items()) + "}"
    assert main(args[:-5] + ["5", "--target", target, "--batch", "64", "--seeds", "1", "--parallel", "2", "--allow-repeat",
                             "--arms", "scratch"]) == 0
    assert capsys.readouterr().out.count("the data will repeat (--allow-repeat): scratch/continue") == 1
