"""`make reproduce-mini`: the paper's comparisons in miniature, every arm with the same total token budget.

    python -m llmshearing.experiments.reproduce --scale 1 --out runs/reproduce-mini            # the CPU default (~1 h)
    python -m llmshearing.experiments.reproduce --scale 50 --batch 32 --precision amp_bf16 ...  # the same on a GPU

From one source model (SmolLM2-135M by default) to one target shape (`smollm2-135m-half`), on the shards'
domains, each arm trains for the same number of batches of the same size (N = steps x scale batches):

  sheared        L0 pruning with dynamic batch loading for share x N batches, export, then continued
                 pretraining with dynamic batch loading (starting from the weights pruning ended with)
  scratch        a random init of the target config (source tokenizer), continued pretraining for N batches
  oneshot        (only with --arms oneshot / all) magnitude pruning to the target (`llmshearing.pruning.oneshot`, no data, no steps), then N batches
                 of continued pretraining: the whole budget goes to continued pretraining
  oneshot_act    as oneshot, scoring units by their contribution on calibration sequences (the first
                 `calibration` sequences of each domain's prune split, forward passes only, not counted
                 as training tokens) and layers by block influence
  fixed          as sheared, with the fixed mixture in both stages (data.dynamic=null)
  sheared_pXX    as sheared with a pruning share of XX% (the paper's Table 5 question: pruning vs continued
                 pretraining for a fixed budget)

Beyond the paper (issue 15; optional arms, e.g. `--arms sheared sheared_kd sheared_act_kd oneshot_act
oneshot_act_kd --seeds 17 18 19`):

  sheared_act    as sheared, the masks initialised from activation importance (`pruning.init: activation`, on
                 the same calibration sequences as oneshot_act, not counted as training tokens) and no Lagrangian
                 warm-up, no distillation: with sheared_act_kd it separates the init's gain from distillation's
  sheared_kd     as sheared, with logit distillation from the source in both stages (`distill:`, alpha 1, T 1)
  sheared_act_kd as sheared_kd, the masks initialised from activation importance (`pruning.init: activation`, on
                 the same calibration sequences as oneshot_act, not counted as training tokens) and no Lagrangian
                 warm-up (the masks start at the target: a warm-up would first reopen them, docs/fidelity.md)
  oneshot_act_kd as oneshot_act, with distillation from the source during continued pretraining

`--seeds A B C` runs every arm once per seed (`<out>/seed-<n>/`, each a complete run of this script) and writes
`<out>/summary.{json,md}` over the seeds: per arm the final mean test loss of each seed, their mean and range.
`--plot-scales A/summary.json B/summary.json ...` (runs at several --scale) writes `<out>/scales.{png,json}`: final
test perplexity against training tokens per arm, the seeds' range as error bars; nothing is trained.

Final numbers (the tables, `final_losses`, `start_of_continue_losses`, the source row) are on the shards' `test` split,
which nothing in training reads; the curves are the trainers' evals on the `eval` split, which steers dynamic
loading (its reference losses are the source's `eval` losses).

Both stages are the real Composer trainer (`llmshearing.train.run`) on the demo's recipes
(yamls/demo_smollm2.yaml, yamls/demo_continue.yaml) with overrides for paths, steps and batch, and each arm's
mask init and distillation stated (so the demo's defaults, activation init + distillation since issue 15, do not
leak into the paper's arms); the continued-pretraining recipe is otherwise the same for every arm. Per-domain losses come from
`llmshearing.eval.evaluate.domain_losses` on `test` (the final table) and from the trainers' evals on `eval` (the
curves); every
arm's token count is read back from its Composer checkpoints. Each arm writes `<out>/<arm>/result.json`
when done, and an arm (or stage) whose record exists is skipped, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

from omegaconf import OmegaConf
import torch

from llmshearing.checkpoint_files import batch_of, checkpoints
from llmshearing.compat import checkpoint_state
from llmshearing.data.layout import TEST as FINAL_SPLIT  # every final number; `eval` steers
from llmshearing.data.layout import check_domains, read_manifest
from llmshearing.data.tokenizer import load_tokenizer
from llmshearing.devices import resolve_device
from llmshearing.errors import ConfigError
from llmshearing.eval.evaluate import domain_losses, perplexities, markdown_table
from llmshearing.experiments.demo import _stage_overrides
from llmshearing.io import atomic_write_text, read_jsonl, atomic_directory
from llmshearing.train.config import load_config
from llmshearing.train.run import run

PRUNE_YAML, CONTINUE_YAML = "demo_smollm2", "demo_continue"  # shipped recipes (yamls/)
# Scale 1 (the CPU default): 160 batches of 2 x 128 tokens = 40,960 training tokens per arm, 4 evals per arm;
# the default arms take about an hour on 2 CPU cores (docs/runs/reproduce_mini.md).
BASE_STEPS, BASE_BATCH = 160, 2
# Arms run only when asked for (--arms oneshot, or --arms all): weight magnitude chose worse units than random
# draws on SmolLM2-135M (docs/runs/reproduce_mini.md), so oneshot_act is the default one-shot baseline.
OPTIONAL_ARMS = ("oneshot", "sheared_act", "sheared_kd", "sheared_act_kd", "oneshot_act_kd")


@dataclasses.dataclass
class Settings:
    out: str = "runs/reproduce-mini"
    model: str = "data/models/smollm2-135m"
    shards: str = "data/shards"
    target: str = "smollm2-135m-half"  # a preset, an HF config path, or dims as '{num_hidden_layers: 24, ...}'
    scale: float = 1.0                 # multiplies the steps of every arm
    steps: int = BASE_STEPS            # total batches per arm at scale 1
    batch: int = BASE_BATCH            # global batch (sequences)
    microbatch: int | None = None      # per-device microbatch; default: the per-device batch
    prune_share: float = 0.25          # share of the budget the sheared arms spend pruning
    sweep: tuple = (0.1, 0.25, 0.5)    # pruning shares of the sweep (the one equal to prune_share is `sheared`)
    calibration: int = 4               # oneshot_act: calibration sequences per domain (prune split)
    evals: int = 4                     # evals per arm: the eval interval is steps / evals batches in every stage
    precision: str = "fp32"
    device: str | None = None          # None: gpu when available
    seed: int = 17
    reference_losses: str | None = None  # for dynamic loading: a yaml file or '{domain: loss, ...}'; None: the source's
    keep_checkpoints: bool = False     # every stage checkpoint; default: the newest only, deleted once the stage is recorded
    allow_repeat: bool = False         # run a stage that needs more tokens than its split holds (its data repeats)
    overrides: tuple = ()              # key=value for both stages, prune.key=v / continue.key=v for one

    @property
    def total_steps(self) -> int:
        return max(2, round(self.steps * self.scale))

    def prune_steps(self, share: float) -> int:
        return min(self.total_steps - 1, max(1, round(share * self.total_steps)))

    @property
    def eval_interval(self) -> int:
        return max(1, round(self.total_steps / self.evals))


def arm_settings(s: Settings) -> dict[str, dict]:
    """Every arm: how its model starts, batches of pruning and of continued pretraining, dynamic or fixed."""
    n, p = s.total_steps, s.prune_steps(s.prune_share)
    arms = {
        "sheared": {"init": "l0", "prune": p, "dynamic": True, "share": s.prune_share},
        "scratch": {"init": "random", "prune": 0, "dynamic": True, "share": 0.0},
        "oneshot": {"init": "magnitude", "prune": 0, "dynamic": True, "share": 0.0},
        "oneshot_act": {"init": "activation", "prune": 0, "dynamic": True, "share": 0.0},
        "fixed": {"init": "l0", "prune": p, "dynamic": False, "share": s.prune_share},
    }
    for share in s.sweep:
        if s.prune_steps(share) != p:
            arms[f"sheared_p{round(100 * share)}"] = {"init": "l0", "prune": s.prune_steps(share), "dynamic": True,
                                                      "share": share}
    arms["sheared_act"] = {**arms["sheared"], "mask_init": "activation"}
    arms["sheared_kd"] = {**arms["sheared"], "distill": True}
    arms["sheared_act_kd"] = {**arms["sheared"], "distill": True, "mask_init": "activation"}
    arms["oneshot_act_kd"] = {**arms["oneshot_act"], "distill": True}
    for arm in arms.values():
        arm["continue"] = n - arm["prune"]
        arm.setdefault("distill", False)
        arm.setdefault("mask_init", "uniform")
    return arms


def parse_target(spec: str):
    """The target as load_config will read `pruning.target=<spec>` (a name/path string or a mapping)."""
    value = OmegaConf.to_container(OmegaConf.from_dotlist([f"target={spec}"]))["target"]
    return value


def log(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ models


def random_init(model_path: str, target, out_dir: str, seed: int) -> str:
    """A randomly initialized HF model of the target config (transformers' own init) with the source tokenizer."""
    from transformers import AutoModelForCausalLM  # heavy: transformers

    from llmshearing.model.hf import load_hf_config  # heavy: transformers
    from llmshearing.pruning.shapes import target_config  # heavy: transformers
    from llmshearing.pruning.target import resolve_target  # heavy: transformers

    source = load_hf_config(model_path)
    config = target_config(source, resolve_target(target, source))
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(model_path).save_pretrained(tmp)
    return out_dir


def calibration_ids(s: Settings) -> torch.Tensor:
    """The first `s.calibration` sequences of every domain's prune split (B, T): oneshot_act's scoring data."""
    from llmshearing.pruning.oneshot import calibration_ids as first_sequences  # heavy: transformers

    return first_sequences(s.shards, per_domain=s.calibration)


def eval_model(path: str, s: Settings) -> tuple[dict[str, float], int]:
    """Per-domain loss (nats/token) on the test split of the HF model at `path`, reloaded with transformers; its
    parameters."""
    from transformers import AutoModelForCausalLM  # heavy: transformers

    device = resolve_device(s.device)
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).to(device).eval()
    losses = domain_losses(lambda ids: hf(ids.to(device)).logits, s.shards, split=FINAL_SPLIT)
    params = sum(p.numel() for p in {id(p): p for p in hf.parameters()}.values())
    del hf
    return losses, params


# ------------------------------------------------------------------------------------------ stages


def stage_overrides(s: Settings, stage: str, name: str, model_path: str, folder: str, export: str, steps: int,
                    dynamic: bool, ref_file: str, proportions: str | None, arm: dict | None = None) -> list[str]:
    o = [f"run_name=reproduce_{name}_{stage}", f"model.path={model_path}", f"data.shards={s.shards}",
         f"save_folder={folder}", f"export_dir={export}", f"max_duration={steps}ba",
         # a checkpoint at every eval and autoresume: a stage killed mid-way (a scale-10 arm runs for hours) goes on
         # from its last eval; only the newest is kept unless --keep-checkpoints
         f"save_interval={s.eval_interval}ba", "autoresume=true",
         f"save_num_checkpoints_to_keep={-1 if s.keep_checkpoints else 1}",
         f"global_train_batch_size={s.batch}", f"eval_interval={s.eval_interval}ba", f"precision={s.precision}",
         f"seed={s.seed}", "save_overwrite=true", "progress_bar=false", "log_to_console=false",
         f"device_train_microbatch_size={s.microbatch or s.batch // int(os.environ.get('WORLD_SIZE', '1'))}"]
    if s.device:
        o.append(f"device={s.device}")
    o.append(f"data.dynamic.reference_losses={ref_file}" if dynamic else "data.dynamic=null")
    arm = arm or {}
    # Every arm states its distillation and mask init, whatever the demo recipes default to
    if arm.get("distill"):  # the teacher is the source model in both stages (in pruning, `source` is model.path)
        o += ["distill.alpha=1.0", "distill.temperature=1.0", "distill.top_k=null",
              f"distill.teacher={'source' if stage == 'prune' else s.model}"]
    else:
        o.append("distill=null")
    if stage == "prune":
        # the released code's mask and multiplier optimisation (AdamW on both, clamp [ln 0.01, ln 100]) at the lr
        # these arms have always run with, 0.3: the demo recipe's convergence settings (issue 25) do not leak in
        o += [f"pruning.target={s.target}", "pruning.mask_lr=0.3", "pruning.lambda_lr=0.3",
              "pruning.lambda_optimizer=adam", "pruning.mask_eps=null", "pruning.mask_beta1=null",
              f"pruning.log_alpha_clamp=[{math.log(1e-2)!r},{math.log(1e2)!r}]"]
        if arm.get("mask_init") == "activation":
            o += ["pruning.init=activation", f"pruning.init_sequences={s.calibration}", "pruning.lagrangian_warmup=0ba"]
        else:  # the paper's uniform init; the Lagrangian ramps to the target over 40% of pruning (the demo's share
            # before issue 15: 40 of 100 steps)
            o += ["pruning.init=uniform", f"pruning.lagrangian_warmup={max(1, round(0.4 * steps))}ba"]
    else:
        # 3% warm-up as in the paper's continued pretraining; the start mixture: pruning's last, else the shards'
        o += [f"scheduler.t_warmup={max(1, round(0.03 * steps))}ba", f"data.proportions={proportions or 'null'}"]
    return o + _stage_overrides(list(s.overrides), stage)


def read_log(path: str) -> list[dict]:
    """DynamicLoading's rows, the last per batch (as the plots read them)."""
    return read_jsonl(path, last_per="batch")


def checkpoint_counts(folder: str) -> dict:
    """What the stage's last Composer checkpoint says was trained: batches, samples, tokens, samples per domain."""
    paths = checkpoints(folder)
    if not paths:
        raise RuntimeError(f"no Composer checkpoint in '{folder}'")
    state = checkpoint_state(paths[-1])
    ts, data = state["timestamp"].get("Timestamp", state["timestamp"]), state["dataset_state"]["train"]
    return {"checkpoint": os.path.basename(paths[-1]), "batches": int(ts["batch"]), "samples": int(ts["sample"]),
            "tokens": int(ts["token"]), "samples_per_domain": dict(zip(data["domains"], data["counts"]))}


def run_stage(s: Settings, stage: str, name: str, model_path: str, dynamic: bool, ref_file: str,
              proportions: str | None, steps: int, arm: dict | None = None) -> dict:
    """One Composer training stage of an arm, skipped when its record exists; its record."""
    arm_dir = os.path.join(s.out, name)
    record_file = os.path.join(arm_dir, f"{stage}.json")
    if os.path.exists(record_file):
        with open(record_file) as f:
            return {**json.load(f), "resumed": True}
    folder = os.path.join(arm_dir, stage)
    export = os.path.join(arm_dir, "pruned" if stage == "prune" else "continued")
    saved = checkpoints(folder)
    if saved and batch_of(saved[-1]) < steps:
        log(f"{name}/{stage}: resuming from {os.path.basename(saved[-1])}")
    else:  # killed before its first checkpoint, or after its last one but before its record: anew
        shutil.rmtree(folder, ignore_errors=True)
    cfg = load_config(PRUNE_YAML if stage == "prune" else CONTINUE_YAML,
                      stage_overrides(s, stage, name, model_path, folder, export, steps, dynamic, ref_file, proportions,
                                      arm))
    start = time.time()
    result = run(cfg)
    seconds = time.time() - start
    if result.get("stopped_after") is not None:  # SIGTERM (StopOnSignal): not a finished stage
        raise SystemExit(f"[reproduce] {name}/{stage} stopped after batch {result['stopped_after']}; "
                         f"(its checkpoint is saved); run the same command again to resume it (finished arms and "
                         f"stages are kept)")
    counts = checkpoint_counts(folder)
    seq_len = _seq_len(s.shards)
    record = {
        "stage": stage, "model_path": model_path, "export": export, "folder": folder, "steps": steps,
        "batch": cfg.global_train_batch_size, "seq_len": seq_len, "dynamic": dynamic,
        "start_weights": dict(zip(cfg.data.domains, cfg.data.proportions)),
        "from_checkpoint": counts, "seconds": seconds, "train_seconds": result["seconds"],
        "evals": read_log(os.path.join(folder, "domain_weights.jsonl")),
    }
    if not s.keep_checkpoints:
        for path in glob.glob(os.path.join(folder, "*.pt")):
            os.remove(path)
    atomic_write_text(record_file, json.dumps(record, indent=1))
    return record


def _calibration_tokens(folder: str | None) -> int:
    """Forward-only tokens an activation scoring read: the one-shot init's pruning.json, or the mask init's
    mask_init.json in a pruning stage's folder; 0 for all other inits."""
    from llmshearing.train.mask_init import REPORT  # heavy: composer

    for name in ("pruning.json", REPORT):
        path = folder and os.path.join(folder, name)
        if path and os.path.exists(path):
            with open(path) as f:
                return int(json.load(f).get("calibration_tokens", 0))
    return 0


def _seq_len(shards: str) -> int:
    return int(read_manifest(shards)["seq_len"])


def recorded_result(s: Settings, name: str) -> dict | None:
    """The result an arm recorded in `<out>/<arm>/result.json` when it finished, None if it has not."""
    path = os.path.join(s.out, name, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_arm(s: Settings, name: str, arm: dict, ref_file: str, index: str) -> dict:
    """Train and evaluate one arm; its result (read back from `<out>/<arm>/result.json` when it exists)."""
    arm_dir = os.path.join(s.out, name)
    result_file = os.path.join(arm_dir, "result.json")
    result = recorded_result(s, name)
    if result is not None:
        log(f"arm {index} {name}: done before ({result['total_tokens']:,} tokens), skipped")
        return result
    how = {"l0": f"L0 pruning {arm['prune']} batches ({'dynamic' if arm['dynamic'] else 'fixed'} mixture"
                 f"{', activation-initialised masks' if arm['mask_init'] == 'activation' else ''})",
           "random": "random init", "magnitude": "magnitude one-shot pruning",
           "activation": "activation-importance one-shot pruning"}[arm["init"]]
    log(f"arm {index} {name}: {how} + continued pretraining {arm['continue']} batches of {s.batch}"
        f"{', distilled from the source' if arm['distill'] else ''} ...")
    start = time.time()
    stages = {}
    if arm["init"] == "l0":
        stages["prune"] = run_stage(s, "prune", name, s.model, arm["dynamic"], ref_file, None, arm["prune"], arm)
        init, proportions = stages["prune"]["export"], os.path.join(stages["prune"]["folder"], "domain_weights.json")
        log(f"arm {index} {name}: pruned in {stages['prune']['seconds']:.0f}s")
    else:
        init, proportions = os.path.join(arm_dir, "init"), None
        if not os.path.exists(init):
            if arm["init"] == "random":
                random_init(s.model, parse_target(s.target), init, s.seed)
            else:
                from llmshearing.pruning.oneshot import oneshot_prune  # heavy: transformers

                oneshot_prune(s.model, parse_target(s.target), init, overwrite=True, method=arm["init"],
                              calibration=calibration_ids(s) if arm["init"] == "activation" else None)
    init_losses, params = eval_model(init, s)
    stages["continue"] = run_stage(s, "continue", name, init, arm["dynamic"], ref_file, proportions, arm["continue"],
                                   arm)
    final_losses, _ = eval_model(stages["continue"]["export"], s)
    with open(os.path.join(init, "config.json")) as f:
        config = json.load(f)
    result = {
        "arm": name, **arm, "params": params,
        "shape": {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                         "num_key_value_heads", "intermediate_size")},
        "split": FINAL_SPLIT, "stages": stages, "total_tokens": sum(st["from_checkpoint"]["tokens"] for st in stages.values()),
        "calibration_tokens": _calibration_tokens(init) + _calibration_tokens(stages["prune"]["folder"]
                                                                             if "prune" in stages else None),
        "start_of_continue_losses": init_losses, "final_losses": final_losses,
        # this run's time plus that of stages an earlier, interrupted run finished
        "seconds": time.time() - start + sum(st["seconds"] for st in stages.values() if st.get("resumed")),
    }
    atomic_write_text(result_file, json.dumps(result, indent=1))
    avg = math.exp(sum(final_losses.values()) / len(final_losses))
    log(f"arm {index} {name}: done in {result['seconds']:.0f}s, {result['total_tokens']:,} tokens, "
        f"mean-loss perplexity {avg:.1f}")
    return result


# ------------------------------------------------------------------------------------------ report


def curve(result: dict) -> list[dict]:
    """Eval points of an arm against training tokens seen: the trainers' per-domain evals, both stages, and
    (arms without a pruning stage) the start model at 0 tokens."""
    points, offset = [], 0
    if "prune" not in result["stages"]:
        points.append({"tokens": 0, "stage": "start", "losses": result["start_of_continue_losses"], "weights": None})
    for name in ("prune", "continue"):
        st = result["stages"].get(name)
        if st is None:
            continue
        per_batch = st["batch"] * st["seq_len"]
        for row in st["evals"]:
            points.append({"tokens": offset + row["batch"] * per_batch, "stage": name,
                           "losses": dict(zip(row["domains"], row["losses"])),
                           "weights": dict(zip(row["domains"], row["weights"]))})
        offset += st["from_checkpoint"]["tokens"]
    return points


def _expected_shape(result: dict) -> dict | None:
    """The masks' expected shape at the last pruning step (PruningLog's log): how far the Lagrangian got
    towards the target before the export cut to it exactly."""
    st = result["stages"].get("prune")
    path = st and os.path.join(st["folder"], "pruning_log.jsonl")
    if not path or not os.path.exists(path):
        return None
    last = read_jsonl(path)[-1]
    return {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("expected/") and k != "expected/params"}


def summarize(s: Settings, results: dict[str, dict], source_losses: dict[str, float], seconds: float,
              source_eval_losses: dict[str, float] | None = None) -> dict:
    """`source_losses`: the source's test losses (the final table's row); `source_eval_losses`: its eval losses
    (dynamic loading's reference, the curves' dotted line)."""
    domains = list(source_losses)
    mean = lambda losses: sum(losses[d] for d in domains) / len(domains)  # noqa: E731
    manifest = read_manifest(s.shards)
    seq = int(manifest["seq_len"])
    budgets = {name: r["total_tokens"] for name, r in results.items()}
    return {
        "settings": {**dataclasses.asdict(s), "total_steps": s.total_steps, "eval_interval": s.eval_interval,
                     "seq_len": seq, "tokens_per_arm": s.total_steps * s.batch * seq},
        "domains": domains, "split": FINAL_SPLIT,
        "source": {"losses": source_losses, "perplexity": perplexities(source_losses),
                   "mean_loss": mean(source_losses), "eval_losses": source_eval_losses},
        "arms": {name: {
            "init": r["init"], "dynamic": r["dynamic"], "prune_share": r["share"], "params": r["params"],
            "distill": r.get("distill", False), "mask_init": r.get("mask_init", "uniform"),
            "shape": r["shape"], "prune_batches": r["prune"], "continue_batches": r["continue"],
            "tokens": {st: rec["from_checkpoint"]["tokens"] for st, rec in r["stages"].items()},
            "total_tokens": r["total_tokens"], "calibration_tokens": r.get("calibration_tokens", 0),
            "samples_per_domain": {st: rec["from_checkpoint"]["samples_per_domain"] for st, rec in r["stages"].items()},
            "passes": {st: passes(rec["from_checkpoint"]["samples_per_domain"], manifest, st)
                       for st, rec in r["stages"].items()},
            "final_losses": r["final_losses"], "final_perplexity": perplexities(r["final_losses"]),
            "final_mean_loss": mean(r["final_losses"]),
            "final_mean_loss_by_seed": {str(s.seed): mean(r["final_losses"])},
            "start_of_continue_losses": r["start_of_continue_losses"],
            "start_of_continue_perplexity": perplexities(r["start_of_continue_losses"]),
            "final_weights": (dict(zip(domains, r["stages"]["continue"]["evals"][-1]["weights"]))
                              if r["stages"]["continue"]["evals"] else None),
            "start_weights": r["stages"]["prune" if "prune" in r["stages"] else "continue"]["start_weights"],
            "pruning_end_expected_shape": _expected_shape(r),
            "seconds": r["seconds"], "curve": curve(r),
        } for name, r in results.items()},
        "equal_budget": len(set(budgets.values())) == 1,
        "seconds": seconds,  # wall time of this invocation (arms done before are skipped)
        "arm_seconds_total": sum(r["seconds"] for r in results.values()),  # incl. arms/stages done before
    }


def passes(samples_per_domain: dict[str, int], manifest: dict, split: str) -> dict[str, float]:
    """How many times a stage went through each domain's split (samples read / sequences held; above 1 its data
    repeated, each pass a fresh permutation: llmshearing.data.mixture)."""
    held = {d: manifest["domains"][d]["splits"][split]["sequences"] for d in samples_per_domain}
    return {d: n / held[d] if held[d] else (math.inf if n else 0.0) for d, n in samples_per_domain.items()}


def check_data_fits(s: Settings, names: list[str], arm_table: dict, manifest: dict) -> None:
    """Refuse, before anything trains, a stage that needs more tokens than its split holds in all: its data would
    repeat, and an arm that repeats data is not the same experiment at a larger budget (--allow-repeat runs it
    anyway; the summary then reports the passes). Under dynamic loading one domain can repeat even when the total
    fits: the summary's passes say so after the fact."""
    seq, stages = int(manifest["seq_len"]), ("prune", "continue")
    held = {st: sum(d["splits"][st]["tokens"] for d in manifest["domains"].values()) for st in stages}
    needs = [(f"{name}/{st}", st, arm_table[name][st] * s.batch * seq) for name in names for st in stages]
    over = [(k, st, need) for k, st, need in needs if need > held[st]]
    if not over:
        return
    what = "; ".join(f"{k} trains {need:,} tokens, the {st} split holds {held[st]:,}"
                     + (f" ({need / held[st]:.2f} passes)" if held[st] else " (it is empty)") for k, st, need in over)
    if s.allow_repeat:
        log(f"the data will repeat (--allow-repeat): {what}")
        return
    most = {}  # the largest need per short split
    for _, st, need in over:
        most[st] = max(most.get(st, 0), need)
    flags = " ".join(f"--{st}-tokens {2 * most[st]}" for st in stages if st in most)
    hint = (f"the arguments they were built with and {flags} (twice the need: dynamic loading can draw one domain "
            f"more; " + ("a larger prune split also moves documents between eval and test" if "prune" in flags else
                         "the eval, test and prune splits stay as they are")
            + f"), e.g. for `make shards`: python -m llmshearing.data_prep.shards --out {s.shards.rstrip('/')}-big {flags}")
    raise ConfigError(f"the data would repeat at scale {s.scale:g}: {what}. Build larger splits from the same text "
                      f"({hint}) and pass --shards with them, or pass --allow-repeat to run with repeated data")


def repetition_lines(passes_by_arm: dict[str, dict]) -> list[str]:
    """The report's line on repeated data from {arm: {stage: {domain: passes}}}; none for summaries written before
    the passes were recorded (they cannot say)."""
    if not passes_by_arm:
        return []
    repeated = [f"{n} {st} {d} {k:.2f}" for n, per_stage in passes_by_arm.items() for st, per in per_stage.items()
                for d, k in per.items() if k > 1]
    return ["", "Data repeated (passes over a domain's split, each a fresh permutation): " + ", ".join(repeated) + "."
            if repeated else "No data repeated: no stage read more than its split holds of any domain."]


def _sweep(arms: dict) -> list[tuple[float, str]]:
    """(pruning share, arm) of the plain sheared arms (dynamic loading, uniform masks, no distillation)."""
    return sorted((a["prune_share"], n) for n, a in arms.items() if a["init"] == "l0" and a["dynamic"]
                  and not a.get("distill") and a.get("mask_init", "uniform") == "uniform")


def format_report(summary: dict) -> str:
    domains, arms, st = summary["domains"], summary["arms"], summary["settings"]
    final = {"source (not pruned)": {**summary["source"]["perplexity"], "mean": math.exp(summary["source"]["mean_loss"])}}
    start = {}
    for name, a in arms.items():
        final[name] = {**a["final_perplexity"], "mean": math.exp(a["final_mean_loss"])}
        start[name] = {**a["start_of_continue_perplexity"],
                       "mean": math.exp(sum(a["start_of_continue_losses"].values()) / len(domains))}
    cols = domains + ["mean"]
    tokens = "\n".join(
        ["| arm | init | mixture | pruning tokens | continued tokens | total tokens | calibration tokens (forward only) "
         "| seconds |", "|---|---|---|---:|---:|---:|---:|---:|"]
        + [f"| {n} | {a['init']} | {'dynamic' if a['dynamic'] else 'fixed'} | {a['tokens'].get('prune', 0):,} | "
           f"{a['tokens']['continue']:,} | {a['total_tokens']:,} | {a['calibration_tokens']:,} | {a['seconds']:.0f} |"
           for n, a in arms.items()])
    sweep = _sweep(arms)
    sweep_rows = {f"{share:.0%} pruning ({n})": {**arms[n]["final_perplexity"], "mean": math.exp(arms[n]["final_mean_loss"])}
                  for share, n in sweep}
    lines = [
        f"Scale {st['scale']:g}: {st['total_steps']} batches of {st['batch']} x {st['seq_len']} tokens = "
        f"{st['tokens_per_arm']:,} training tokens per arm; evals every {st['eval_interval']} batches. "
        f"Equal budgets (from the checkpoints): {summary['equal_budget']}. This command ran "
        f"{summary['seconds']:.0f}s (arms recorded before are not rerun); the arms' own times add up to "
        f"{summary['arm_seconds_total']:.0f}s.",
        "", f"Token perplexity per domain on the shards' {summary.get('split', 'eval')} split after the whole budget "
        "(`llmshearing.eval.evaluate.domain_losses`, models reloaded with transformers; mean = exp of the mean loss):", "",
        markdown_table(final, cols, label="arm"),
        "", "At the start of continued pretraining (after pruning, one-shot pruning, or random init):", "",
        markdown_table(start, cols, label="arm"),
    ]
    if sweep_rows:
        lines += ["", "Pruning share of the budget (dynamic loading in both stages):", "",
                  markdown_table(sweep_rows, cols, label="share")]
    lines += ["", "Budgets, read back from each stage's last Composer checkpoint:", "", tokens]
    lines += repetition_lines({n: a["passes"] for n, a in arms.items() if "passes" in a})
    expected = {n: a["pruning_end_expected_shape"] for n, a in arms.items() if a.get("pruning_end_expected_shape")}
    if expected:
        target = next(a["shape"] for a in arms.values())
        keys = list(target)
        lines += ["", "The masks' expected shape at the last pruning step (the export then keeps exactly the target's "
                  "top-scoring units):", "",
                  "| arm | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys),
                  "| target | " + " | ".join(str(target[k]) for k in keys) + " |"]
        lines += [f"| {n} | " + " | ".join(f"{e[k]:.1f}" for k in keys) + " |" for n, e in expected.items()]
    return "\n".join(lines) + "\n"


def _savefig(fig, path: str) -> str:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def plot_summary(summary: dict, out_dir: str) -> list[str]:
    """loss_curves.png (eval loss per domain and mean vs tokens, one line per arm), domain_weights.png
    (the dynamic arms' mixtures vs tokens) and prune_share.png (final mean loss vs pruning share)."""
    import matplotlib  # heavy: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    domains, arms = summary["domains"], summary["arms"]
    out = []
    panels = domains + ["mean"]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for i, name in enumerate(arms):
        pts = arms[name]["curve"]
        for ax, panel in zip(axes.flat, panels):
            val = lambda p: (sum(p["losses"].values()) / len(domains) if panel == "mean" else p["losses"][panel])  # noqa: E731
            for stage, style in (("prune", "--"), ("continue", "-")):
                sel = [p for p in pts if p["stage"] == stage or (stage == "continue" and p["stage"] == "start")]
                if stage == "continue":  # join the continued curve to the end of pruning
                    sel = [p for p in pts if p["stage"] == "prune"][-1:] + sel
                if sel:
                    ax.plot([p["tokens"] for p in sel], [val(p) for p in sel], style, color=f"C{i}", marker="o", ms=2.5,
                            label=name if stage == "continue" else None)
    source = summary["source"].get("eval_losses") or summary["source"]["losses"]  # the curves are on `eval`
    for ax, panel in zip(axes.flat, panels):
        ref = sum(source.values()) / len(domains) if panel == "mean" else source[panel]
        ax.axhline(ref, color="k", lw=0.8, ls=":")
        ax.set(title=f"{panel} (dotted: source; dashed: pruning stage)", xlabel="training tokens seen",
               ylabel="eval loss (nats/token)")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    out.append(_savefig(fig, os.path.join(out_dir, "loss_curves.png")))
    plt.close(fig)

    dynamic = [n for n, a in arms.items() if a["dynamic"]]
    if dynamic:
        cols = min(3, len(dynamic))
        rows = math.ceil(len(dynamic) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False, sharey=True)
        for ax in list(axes.flat)[len(dynamic):]:
            ax.axis("off")
        for ax, name in zip(axes.flat, dynamic):
            a = arms[name]
            # the weights in use: the start mixture from 0 tokens, then the value set after each eval, up to the
            # end of training (the value set by the last eval, when training ended, was never used)
            pts = [p for p in a["curve"] if p["weights"] is not None]
            xs = [0] + [p["tokens"] for p in pts]
            for j, d in enumerate(domains):
                ys = [a["start_weights"][d]] + [p["weights"][d] for p in pts[:-1]]
                ax.step(xs, ys + ys[-1:], where="post", color=f"C{j}", label=d)
            ax.set(title=name, xlabel="training tokens seen")
        for row in axes:
            row[0].set_ylabel("domain weight")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        out.append(_savefig(fig, os.path.join(out_dir, "domain_weights.png")))
        plt.close(fig)

    sweep = _sweep(arms)
    if len(sweep) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        shares = [100 * sh for sh, _ in sweep]
        for j, d in enumerate(domains):
            ax.plot(shares, [arms[n]["final_losses"][d] for _, n in sweep], marker="o", color=f"C{j}", label=d)
        ax.plot(shares, [arms[n]["final_mean_loss"] for _, n in sweep], marker="s", color="k", label="mean")
        ax.set(xlabel="pruning share of the budget (%)", ylabel="final eval loss (nats/token)",
               title="Fixed budget: pruning vs continued pretraining")
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(_savefig(fig, os.path.join(out_dir, "prune_share.png")))
        plt.close(fig)
    return out


def arm_label(arm: str, summary: dict, overrides: list[str]) -> str:
    """An arm's name in plots, with the run's overrides that reached it (`prune.` ones only reach arms with a
    pruning stage), so that an arm run with another recipe is not drawn as the same line: 'sheared_act
    (pruning.lambda_lr=10 ...)'."""
    prunes = summary.get("init") == "l0"
    reached = [o.removeprefix("prune.") for o in overrides if prunes or not o.startswith("prune.")]
    return f"{arm} ({' '.join(reached)})" if reached else arm


def plot_scales(paths: list[str], out_dir: str) -> dict:
    """`<out_dir>/scales.{json,png}`: per arm, final test perplexity (exp of the mean over seeds of the mean loss,
    the seeds' range as error bars) against training tokens, from summaries of runs at several --scale (one seed's
    summary.json or the combined one of --seeds). Summaries of different splits, or of the same arm at the same
    token count twice, are refused rather than mixed. An arm run with overrides is its own line (`arm_label`)."""
    if not paths:
        raise ConfigError("--plot-scales needs the summary.json of at least one run")
    points: dict[str, list[dict]] = {}
    splits = set()
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"--plot-scales: '{path}' does not exist (give the summary.json of a reproduce run)")
        with open(path) as f:
            summary = json.load(f)
        if not isinstance(summary, dict) or not isinstance(summary.get("arms"), dict):
            raise ConfigError(f"--plot-scales: '{path}' is not a reproduce summary.json (no 'arms')")
        splits.add(summary.get("split", "eval"))  # summaries written before the test split: eval
        overrides = summary["settings"].get("overrides") or []
        for arm, a in summary["arms"].items():
            name = arm_label(arm, a, overrides)
            # summaries from before `final_mean_loss_by_seed` (issue 15) hold one seed's final_mean_loss
            by_seed = a.get("final_mean_loss_by_seed") or {str(summary["settings"].get("seed")): a["final_mean_loss"]}
            if any(p["tokens"] == a["total_tokens"] for p in points.get(name, [])):
                raise ConfigError(f"--plot-scales: arm '{name}' at {a['total_tokens']:,} tokens is in two summaries; "
                                  f"give each scale once")
            points.setdefault(name, []).append({
                "tokens": a["total_tokens"], "seeds": list(by_seed), "summary": path,
                "perplexity": math.exp(sum(by_seed.values()) / len(by_seed)),
                "perplexity_range": [math.exp(min(by_seed.values())), math.exp(max(by_seed.values()))]})
    if len(splits) > 1:
        raise ConfigError(f"--plot-scales: the summaries are on different splits ({', '.join(sorted(splits))}); "
                          f"rerun the older ones on the test split")
    for pts in points.values():
        pts.sort(key=lambda p: p["tokens"])
    result = {"split": splits.pop(), "arms": points}
    import matplotlib  # heavy: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    fig, ax = plt.subplots(figsize=(7, 4 + 0.3 * len(points)))
    # Arms at one budget are spread a little along x (at most 14% either way) so their bars do not cover each other;
    # each arm gets its own colour (tab20 past ten arms) and marker.
    at_budget: dict[int, list[str]] = {}
    for name, pts in points.items():
        for p in pts:
            at_budget.setdefault(p["tokens"], []).append(name)
    colors = plt.get_cmap("tab10" if len(points) <= 10 else "tab20").colors
    for i, (name, pts) in enumerate(points.items()):
        xs = [p["tokens"] * 1.3 ** (at_budget[p["tokens"]].index(name) / max(1, len(at_budget[p["tokens"]]) - 1) - 0.5)
              for p in pts]
        ys = [p["perplexity"] for p in pts]
        err = [[y - p["perplexity_range"][0] for y, p in zip(ys, pts)], [p["perplexity_range"][1] - y for y, p in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=err, marker="osD^vP*Xph"[i % 10], ms=4, capsize=3, color=colors[i % len(colors)],
                    label=textwrap.fill(name, 90))
    ax.set(xscale="log", yscale="log", xlabel="training tokens per arm (arms at one budget spread apart)",
           ylabel=f"final {result['split']} perplexity\n(mean loss over domains)",
           title="Budget: final perplexity vs training tokens (bars: range over seeds)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))  # below: labels name their overrides
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    result["plot"] = _savefig(fig, os.path.join(out_dir, "scales.png"))
    plt.close(fig)
    atomic_write_text(os.path.join(out_dir, "scales.json"), json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------------------------------ driver


# What an arm's numbers depend on: a folder holds the arms of one setting, so a skipped arm is comparable.
SETTINGS_THAT_MATTER = ("model", "shards", "target", "batch", "prune_share", "evals", "precision", "seed",
                        "reference_losses", "overrides")  # calibration only changes oneshot_act: not checked


def check_out_dir(s: Settings) -> None:
    """Write `<out>/settings.json` on the first run; refuse a later run of other settings in the same folder
    (its arms would be skipped as done although they were run at another scale or recipe)."""
    # the shards' build: a rebuild moves documents between splits (the test split did not exist before builder 3)
    mine = {**{k: getattr(s, k) for k in SETTINGS_THAT_MATTER}, "total_steps": s.total_steps,
            "eval_interval": s.eval_interval, "shards_build": read_manifest(s.shards).get("build_fingerprint")}
    mine = json.loads(json.dumps(mine))  # tuples as lists, as read back
    path = os.path.join(s.out, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise ConfigError(f"'{s.out}' holds arms run with other settings ({', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in diff.items())}); "
                              f"pass another --out or delete it")
    else:
        os.makedirs(s.out, exist_ok=True)
        atomic_write_text(path, json.dumps(mine, indent=1))


# what `prepare` measures of the source in each run folder: eval losses, them as dynamic loading's references, test losses
SOURCE_LOSSES, SOURCE_REFERENCE, SOURCE_TEST_LOSSES = ("source_losses.json", "reference_losses.yaml",
                                                       f"source_{FINAL_SPLIT}_losses.json")
SOURCE_FILES = (SOURCE_LOSSES, SOURCE_REFERENCE, SOURCE_TEST_LOSSES)
SOURCE_DEPENDS_ON = ("model", "shards", "shards_build", "precision")  # not the seed: the source is evaluated, not trained


def reuse_source_losses(s: Settings) -> None:
    """Under --seeds every seed has its folder (`<out>/seed-N`); the source's losses depend on none of the seed's
    settings, so a seed folder missing them copies them from a sibling that measured them with the same model,
    shards and precision (a few minutes of evaluation per seed saved)."""
    if not re.fullmatch(r"seed-\d+", os.path.basename(os.path.normpath(s.out))):
        return
    with open(os.path.join(s.out, "settings.json")) as f:
        mine = json.load(f)
    for sibling in sorted(glob.glob(os.path.join(os.path.dirname(os.path.normpath(s.out)), "seed-*"))):
        paths = [os.path.join(sibling, name) for name in SOURCE_FILES]
        if os.path.samefile(sibling, s.out) or not all(map(os.path.exists, paths + [os.path.join(sibling, "settings.json")])):
            continue
        with open(os.path.join(sibling, "settings.json")) as f:
            theirs = json.load(f)
        if all(theirs.get(k) == mine.get(k) for k in SOURCE_DEPENDS_ON):
            for name, path in zip(SOURCE_FILES, paths):
                if not os.path.exists(os.path.join(s.out, name)):
                    with open(path) as f:
                        atomic_write_text(os.path.join(s.out, name), f.read())
            return


def prepare(s: Settings, arms: list[str] | None = None) -> tuple[list[str], dict, dict]:
    """Check the arms, shards and folder, and measure the source once per folder (or take it from a sibling seed
    folder: `reuse_source_losses`); its eval losses are dynamic loading's default references, its test losses the
    table's source row. The arms to run and both losses."""
    # heavy: transformers
    from llmshearing.experiments.reference_losses import reference_snippet, source_reference_losses

    arm_table = arm_settings(s)
    if not arms:
        names = [n for n in arm_table if n not in OPTIONAL_ARMS]
    elif list(arms) == ["all"]:
        names = list(arm_table)
    else:
        names = list(arms)
    unknown = [n for n in names if n not in arm_table]
    if unknown:
        raise ConfigError(f"unknown arm(s) {unknown}; the arms are {list(arm_table)}")
    manifest = read_manifest(s.shards)  # before any training: shards built before the test split are refused here
    check_domains(manifest, s.shards, list(manifest["domains"]), FINAL_SPLIT)
    check_data_fits(s, names, arm_table, manifest)
    check_out_dir(s)
    reuse_source_losses(s)
    source_file = os.path.join(s.out, SOURCE_LOSSES)
    if not os.path.exists(source_file):
        source = source_reference_losses(s.model, s.shards)
        atomic_write_text(os.path.join(s.out, SOURCE_REFERENCE),
                          reference_snippet(source, f"per-domain eval loss of {s.model}"))
        atomic_write_text(source_file, json.dumps(source, indent=1))
    with open(source_file) as f:
        source = json.load(f)
    test_file = os.path.join(s.out, SOURCE_TEST_LOSSES)
    if not os.path.exists(test_file):
        atomic_write_text(test_file, json.dumps(eval_model(s.model, s)[0], indent=1))
    with open(test_file) as f:
        source_test = json.load(f)
    return names, source, source_test


def reference_file(s: Settings) -> str:
    """Dynamic loading moves the mixture towards the domains furthest above these (default: the source's own)."""
    return s.reference_losses or os.path.join(s.out, SOURCE_REFERENCE)


def reproduce(s: Settings, arms: list[str] | None = None, prepared: tuple | None = None) -> dict:
    """Run (or resume) the arms, then write `<out>/summary.{json,md}` and the plots; the summary. `prepared`:
    what `prepare` returned for this run already (`run_parallel`), so its checks and messages come once."""
    t0 = time.time()
    names, source, source_test = prepared or prepare(s, arms)
    n, seq = s.total_steps, _seq_len(s.shards)
    log(f"scale {s.scale:g}: {n} batches of {s.batch} x {seq} = {n * s.batch * seq:,} tokens per arm; "
        f"arms {', '.join(names)}; out {s.out}")
    log("source losses (eval; test): " + ", ".join(f"{d} {v:.3f}; {source_test[d]:.3f}" for d, v in source.items()))
    arm_table, ref_file = arm_settings(s), reference_file(s)

    results = {}
    for i, name in enumerate(names):
        results[name] = run_arm(s, name, arm_table[name], ref_file, f"{i + 1}/{len(names)}")
    # The summary covers every arm recorded in this folder (one setting), e.g. an optional arm run later.
    results = {name: results[name] if name in results else recorded_result(s, name) for name in arm_table}
    results = {name: r for name, r in results.items() if r is not None}
    summary = summarize(s, results, source_test, time.time() - t0, source)
    summary["plots"] = plot_summary(summary, s.out)
    atomic_write_text(os.path.join(s.out, "summary.json"), json.dumps(summary, indent=1))
    report = format_report(summary)
    atomic_write_text(os.path.join(s.out, "summary.md"), report)
    print("\n" + report, flush=True)
    if not summary["equal_budget"]:
        raise RuntimeError("the arms' token budgets differ: " + ", ".join(
            f"{n} {a['total_tokens']:,}" for n, a in summary["arms"].items()))
    return summary


def run_parallel(runs: list[Settings], arms: list[str] | None, parallel: int) -> dict[int, tuple]:
    """Run the arms of every run (one per seed) in `parallel` processes at once, each with an equal share of the
    cores as torch threads: on 2 CPU cores two one-thread arms finish sooner than two two-thread arms one after
    the other (docs/runs/reproduce_mini.md). Each job is one arm of one run, `python -m ...reproduce --job`,
    logging to `<out>/logs/<arm>.log`; arms recorded before are skipped. After a failed job no new job starts,
    the running ones finish (their arms are kept) and the error names the log. The summaries are the caller's:
    `prepare`'s result per seed is returned for them."""
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: give 1 or more processes")
    jobs, prepared = [], {}
    for s in runs:  # checks and the source's losses once per run, before any job: the jobs only read them
        prepared[s.seed] = prepare(s, arms)
        jobs += [(s, name) for name in prepared[s.seed][0] if recorded_result(s, name) is None]
    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log(f"{len(jobs)} arm(s) to run, {parallel} at once with {threads} thread(s) each")
    pending, running, failed, done = list(jobs), [], [], 0
    try:
        while running or (pending and not failed):  # after a failure: only wait for the running jobs
            while pending and not failed and len(running) < parallel:
                s, name = pending.pop(0)
                path = os.path.join(s.out, "logs", f"{name}.log")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                job = json.dumps({"settings": dataclasses.asdict(s), "arm": name})
                with open(path, "w") as f:
                    proc = subprocess.Popen([sys.executable, "-m", "llmshearing.experiments.reproduce", "--job", job],
                                            stdout=f, stderr=subprocess.STDOUT, env=env)
                running.append((proc, s, name, path, time.time()))
                log(f"started seed {s.seed} {name} (log: {path})")
            time.sleep(1)
            for item in [r for r in running if r[0].poll() is not None]:
                proc, s, name, path, start = item
                running.remove(item)
                done += 1
                if proc.returncode == 0:
                    log(f"[{done}/{len(jobs)}] seed {s.seed} {name}: done in {time.time() - start:.0f}s")
                else:
                    with open(path) as f:
                        last = [line.rstrip() for line in f if line.strip()][-1:] or ["(empty log)"]
                    failed.append(f"seed {s.seed} {name} (exit {proc.returncode}; {path}): {last[0]}")
                    log(f"[{done}/{len(jobs)}] FAILED " + failed[-1])
    except KeyboardInterrupt:  # the jobs got the same Ctrl-C: wait for them so that no arm is left half-written
        for proc, *_ in running:
            proc.wait()
        raise
    if failed:
        raise RuntimeError("arm(s) failed, the others are kept (run the same command again to resume):\n  "
                           + "\n  ".join(failed))
    return prepared


def run_job(spec: str) -> None:
    """One arm of one run, as `run_parallel` starts it (`--job '{"settings": {...}, "arm": name}'`)."""
    job = json.loads(spec)
    s = Settings(**{**job["settings"], "sweep": tuple(job["settings"]["sweep"]),
                    "overrides": tuple(job["settings"]["overrides"])})
    run_arm(s, job["arm"], arm_settings(s)[job["arm"]], reference_file(s), f"seed {s.seed}")


def combine_seeds(out: str, summaries: dict[int, dict]) -> dict:
    """`<out>/summary.{json,md}` over the seeds' runs: per arm the final mean test loss of each seed (with its
    perplexity), their mean and range, the start-of-recovery perplexity and the masks' expected shape at the cut.
    An arm missing in some seed (an interrupted run) is reported with the seeds it has."""
    first = next(iter(summaries.values()))
    names = list(dict.fromkeys(n for sm in summaries.values() for n in sm["arms"]))
    arms = {}
    for name in names:
        runs = {str(seed): sm["arms"][name] for seed, sm in summaries.items() if name in sm["arms"]}
        losses = {seed: a["final_mean_loss"] for seed, a in runs.items()}
        start = {seed: sum(a["start_of_continue_losses"].values()) / len(a["start_of_continue_losses"])
                 for seed, a in runs.items()}
        any_run = next(iter(runs.values()))
        arms[name] = {
            "init": any_run["init"], "dynamic": any_run["dynamic"], "distill": any_run.get("distill", False),
            "mask_init": any_run.get("mask_init", "uniform"), "total_tokens": any_run["total_tokens"],
            "calibration_tokens": any_run["calibration_tokens"], "seeds": list(runs),
            "final_mean_loss_by_seed": losses,
            "final_mean_loss": sum(losses.values()) / len(losses),
            "final_mean_loss_range": [min(losses.values()), max(losses.values())],
            "final_perplexity_by_seed": {seed: math.exp(v) for seed, v in losses.items()},
            "start_of_continue_mean_loss_by_seed": start,
            "pruning_end_expected_shape_by_seed": {seed: a["pruning_end_expected_shape"] for seed, a in runs.items()
                                                   if a.get("pruning_end_expected_shape")},
            "seconds_by_seed": {seed: a["seconds"] for seed, a in runs.items()},
            "passes_by_seed": {seed: a["passes"] for seed, a in runs.items() if "passes" in a},
        }
    combined = {"seeds": [str(x) for x in summaries], "runs": {str(x): os.path.join(out, f"seed-{x}") for x in summaries},
                "settings": {k: v for k, v in first["settings"].items() if k not in ("seed", "out")},
                "domains": first["domains"], "split": first.get("split", "eval"), "source": first["source"], "arms": arms,
                "equal_budget": len({a["total_tokens"] for a in arms.values()}) == 1}
    lines = [f"Seeds {', '.join(combined['seeds'])}; {first['settings']['tokens_per_arm']:,} training tokens per arm "
             f"(equal budgets: {combined['equal_budget']}). Mean {combined['split']} perplexity = exp(mean over domains of "
             f"the {combined['split']} loss); per arm the mean over seeds of that loss, and the range over seeds.", "",
             "| arm | seeds | final perplexity, mean (range) | per seed | start of recovery, mean | "
             "calibration tokens |", "|---|---:|---:|---|---:|---:|"]
    for name, a in arms.items():
        lo, hi = a["final_mean_loss_range"]
        per_seed = ", ".join(f"{seed}: {math.exp(v):.1f}" for seed, v in a["final_mean_loss_by_seed"].items())
        start = sum(a["start_of_continue_mean_loss_by_seed"].values()) / len(a["seeds"])
        lines.append(f"| {name} | {len(a['seeds'])} | {math.exp(a['final_mean_loss']):.1f} ({math.exp(lo):.1f}-"
                     f"{math.exp(hi):.1f}) | {per_seed} | {math.exp(start):.1f} | {a['calibration_tokens']:,} |")
    shapes = {n: a["pruning_end_expected_shape_by_seed"] for n, a in arms.items() if a["pruning_end_expected_shape_by_seed"]}
    if shapes:
        keys = list(next(iter(next(iter(shapes.values())).values())))
        lines += ["", "The masks' expected shape at the cut (mean over seeds):", "",
                  "| arm | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for n, by_seed in shapes.items():
            lines.append(f"| {n} | " + " | ".join(f"{sum(e[k] for e in by_seed.values()) / len(by_seed):.1f}"
                                                   for k in keys) + " |")
    lines += repetition_lines({f"{n} (seed {seed})": p for n, a in arms.items() for seed, p in a["passes_by_seed"].items()})
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(combined, indent=1))
    atomic_write_text(os.path.join(out, "summary.md"), "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines), flush=True)
    return combined


def main(argv: list[str] | None = None) -> int:
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m llmshearing.experiments.reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=d.scale, help="multiplies every arm's batches (default 1: CPU)")
    p.add_argument("--out", default=d.out)
    p.add_argument("--arms", nargs="+", help="run only these arms, or 'all' (default: all but %s; see the module doc)"
                   % ", ".join(OPTIONAL_ARMS))
    p.add_argument("--model", default=d.model)
    p.add_argument("--shards", default=d.shards)
    p.add_argument("--target", default=d.target)
    p.add_argument("--steps", type=int, default=d.steps, help="batches per arm at scale 1")
    p.add_argument("--batch", type=int, default=d.batch, help="global batch in sequences")
    p.add_argument("--microbatch", type=int, default=None)
    p.add_argument("--prune-share", type=float, default=d.prune_share)
    p.add_argument("--sweep", type=float, nargs="*", default=list(d.sweep), help="pruning shares of the sweep")
    p.add_argument("--calibration", type=int, default=d.calibration,
                   help="oneshot_act: calibration sequences per domain from the prune split")
    p.add_argument("--evals", type=int, default=d.evals, help="evals per arm")
    p.add_argument("--precision", default=d.precision, choices=("fp32", "amp_bf16", "amp_fp16"))
    p.add_argument("--device", default=None, choices=("cpu", "gpu"), help="default: gpu when available")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--seeds", type=int, nargs="+", help="run every arm once per seed, in <out>/seed-<n>/, and "
                                                        "summarize over the seeds in <out>/summary.{json,md}")
    p.add_argument("--reference-losses", default=None,
                   help="dynamic loading's reference losses (a yaml file); default: the source model's own")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every stage checkpoint (one per eval); default: only the newest while a stage runs "
                        "(a killed stage resumes from it), none once the stage is recorded")
    p.add_argument("--allow-repeat", action="store_true",
                   help="run stages that need more tokens than their split holds (refused by default: the data "
                        "would repeat); the summary reports the passes over each domain")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="run N arms at once (over arms and seeds), each in its own process with cores/N threads "
                        "(on 2 CPU cores, 2 is faster: docs/runs/reproduce_mini.md); logs in <out>/logs/")
    p.add_argument("--job", help=argparse.SUPPRESS)  # one arm of one run, as --parallel starts it
    p.add_argument("--plot-scales", nargs="+", metavar="SUMMARY",
                   help="only plot: final test perplexity vs training tokens from these runs' summary.json (one per "
                        "--scale) into <out>/scales.{png,json}")
    p.add_argument("overrides", nargs="*", help="key=value for both stages; prune.key=v / continue.key=v for one")
    a = p.parse_args(argv)
    if a.arms:  # `--arms x y key=value`: argparse gives the overrides to --arms; no arm name holds '='
        a.overrides += [x for x in a.arms if "=" in x]
        a.arms = [x for x in a.arms if "=" not in x] or None
    s = Settings(out=a.out, model=a.model, shards=a.shards, target=a.target, scale=a.scale, steps=a.steps,
                 batch=a.batch, microbatch=a.microbatch, prune_share=a.prune_share, sweep=tuple(a.sweep),
                 evals=a.evals, calibration=a.calibration, precision=a.precision, device=a.device, seed=a.seed, reference_losses=a.reference_losses,
                 keep_checkpoints=a.keep_checkpoints, allow_repeat=a.allow_repeat, overrides=tuple(a.overrides))
    try:
        if a.job:
            run_job(a.job)
        elif a.plot_scales:
            plot_scales(a.plot_scales, a.out)
        else:
            runs = ([dataclasses.replace(s, seed=seed, out=os.path.join(a.out, f"seed-{seed}")) for seed in a.seeds]
                    if a.seeds else [s])
            # the arms in parallel processes; then the summaries below skip them as done
            prepared = run_parallel(runs, a.arms, a.parallel) if a.parallel != 1 else {}
            summaries = {}
            for run_s in runs:  # seed-major: an interrupted run has whole seeds first
                summaries[run_s.seed] = reproduce(run_s, a.arms, prepared.get(run_s.seed))
                if a.seeds:
                    combine_seeds(a.out, summaries)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
