"""The GPU check: one command that trains, saves, resumes and exports through the project's own trainer on every
path a GPU run takes, and writes a pass/fail report with tokens/s and the masked / dense step ratio.

    make fetch shards && python -m bench.gpu_check                   # GPU: bf16, flash-attn when installed, NCCL
    python -m bench.gpu_check --device cpu --out runs/gpu-check.json  # the same checks on CPU (fp32, SDPA, gloo)

Sources: a tiny random Llama-2-like MHA model (heads = KV heads, so the masks have `kv_head` and no `head`) and
SmolLM2-135M (GQA; data/models/smollm2-135m with data/shards, on a GPU when both exist, else a tiny GQA model).
Every stage is the demo recipe (demo_smollm2) with overrides, run by `llmshearing.train.run.run` under
`composer -n 1` and `composer -n <visible GPUs>` (2 processes on CPU), FSDP FULL_SHARD with sharded checkpoints:

    launch  ranks  stage       what
    one     1      mha         MHA source: activation init, distillation from the source, clipping, export
    one     1      masked      GQA source, pruning without a teacher: timed   } the masked / dense step ratio
    one     1      dense       the same with pruning=null (and no teacher)    }
    all     N      gqa         GQA source, as mha, every rank; the uninterrupted run of the resume check
    all     N      gqa_stop    the same run, SIGTERM after batch 3: StopOnSignal saves a sharded checkpoint and stops
    resume  N      gqa_resume  the same command (autoresume=true) in new processes: starts at batch 3, must end
                               where gqa ended (bit-identical on CPU; losses within 2% on a GPU)

Exits 1 when a check fails (each check's numbers and error are in the report), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "demo_smollm2"
PROBE = "gpu_check_probe"
SMOLLM2, SHARDS = os.path.join(REPO, "data", "models", "smollm2-135m"), os.path.join(REPO, "data", "shards")
TINY_TARGETS = {  # 4 layers / 64 hidden / heads / KV heads / 96 intermediate -> these (llmshearing.experiments.tiny)
    "llama-mha": {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 2,
                  "intermediate_size": 64},
    "smollm2-gqa": {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "intermediate_size": 64},
}
SAVE_EVERY, STOP_AFTER, RESUME_BATCHES = 2, 3, 4  # checkpoints at 2 and 4; SIGTERM after batch 3; resume 3 -> 4
# Masked model (eval, test-time masks) vs its reloaded export: max |logit difference| <= tol * max(1, max |logit|).
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}
_probes: list = []


# ----------------------------------------------------------------------------------------------------- worker
def worker(plan_path: str) -> None:
    """Run the plan's stages in this process (one rank of `composer -n ...`), rank 0 writing `<stage>.json`."""
    import torch
    from composer.loggers import LoggerDestination
    from composer.utils import dist

    from llmshearing import registry
    from llmshearing.io import atomic_write_text
    from llmshearing.model.decoder import attention_kernel
    from llmshearing.train.config import load_config
    from llmshearing.train.run import run

    cuda = torch.cuda.is_available()

    class Probe(LoggerDestination):
        """Per batch: wall time (synchronised), tokens, the logged losses and gradient norm; the batch a run
        starts at; peak GPU memory. `stop_after`: send this process SIGTERM at the end of that batch."""

        def __init__(self, stop_after: int | None = None):
            self.stop_after = stop_after
            self.data = {"batch_seconds": [], "tokens_per_batch": [], "metrics": {}, "first_batch": None}
            _probes.append(self)

        def fit_start(self, state, logger):
            self.data["first_batch"] = int(state.timestamp.batch)
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def batch_start(self, state, logger):
            if cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()
            self.data["tokens_per_batch"].append(int(state.batch["input_ids"].numel()) * dist.get_world_size())

        def batch_end(self, state, logger):
            if cuda:
                torch.cuda.synchronize()
            self.data["batch_seconds"].append(time.perf_counter() - self._start)
            if self.stop_after == int(state.timestamp.batch):
                os.kill(os.getpid(), signal.SIGTERM)  # a preemption, acted on by StopOnSignal at this batch's end

        def log_metrics(self, metrics, step=None):
            for key, value in metrics.items():
                if key.startswith(("loss/train/", "grad_norm/")):
                    self.data["metrics"].setdefault(key, []).append([step, float(value)])

    registry.loggers.register(PROBE, Probe)
    with open(plan_path) as f:
        stages = json.load(f)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    for stage in stages:
        out = stage["report"]
        start = time.time()
        try:
            cfg = load_config(RECIPE, stage["overrides"])
            result = run(cfg)
        except BaseException:
            if rank0:
                atomic_write_text(out, json.dumps({"error": traceback.format_exc()[-4000:]}))
            raise
        if rank0:
            probe = _probes[-1].data
            probe["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            report = {"world_size": dist.get_world_size(), "precision": cfg.precision,
                      "attention": attention_kernel(cfg.model.attn_impl, "gpu" if cuda else "cpu", cfg.precision),
                      "train_seconds": result["seconds"], "stopped_after": result["stopped_after"],
                      "exported_shape": (result["kept"] or {}).get("target_shape"), **probe}
            atomic_write_text(out, json.dumps(report))
            print(f"gpu_check: stage {os.path.basename(out)} done in {time.time() - start:.1f}s", flush=True)


# ------------------------------------------------------------------------------------------------ orchestrator
def tiny_sources(root: str, work: str) -> dict:
    """The `make tiny` folder at `root` (made when missing) for the GQA source, and an MHA model of the same
    vocabulary in `work`, so both read the same shards."""
    from llmshearing.data.tokenizer import load_tokenizer
    from llmshearing.experiments.tiny import make_tiny, random_model

    paths = ({"model": os.path.join(root, "model"), "shards": os.path.join(root, "shards")}
             if os.path.isdir(os.path.join(root, "shards")) else make_tiny(root, "smollm2-gqa"))
    mha = os.path.join(work, "mha-model")
    tokenizer = load_tokenizer(paths["model"])
    random_model("llama-mha", len(tokenizer)).save_pretrained(mha)
    tokenizer.save_pretrained(mha)
    return {"mha": {"model": mha, "shards": paths["shards"], "target": TINY_TARGETS["llama-mha"], "kind": "tiny MHA"},
            "gqa": {"model": paths["model"], "shards": paths["shards"], "target": TINY_TARGETS["smollm2-gqa"],
                    "kind": "tiny GQA"}}


def flow(mapping: dict) -> str:
    return "{" + ", ".join(f"{k}: {json.dumps(v) if isinstance(v, str) else v}" for k, v in mapping.items()) + "}"


def overrides(src: dict, folder: str, ranks: int, args, *, batches: int, export: bool, stop_after=None,
              pruning=True, distill=True, every: int = SAVE_EVERY) -> list[str]:
    """The demo recipe pointed at `src`, with every feature under check set explicitly (so a recipe change
    cannot switch one off unseen); a sharded checkpoint and an eval every `every` batches."""
    from llmshearing.data.layout import read_manifest

    gpu = args.device == "gpu"
    domains = list(read_manifest(src["shards"])["domains"])
    target = src["target"] if isinstance(src["target"], str) else flow(src["target"])
    o = [f"model.path={src['model']}", f"data.shards={src['shards']}", "data.num_workers=0",
         f"data.dynamic={{reference_losses: {[3.0] * len(domains)}, eta: 0.3}}",
         f"max_duration={batches}ba", f"save_interval={every}ba", f"eval_interval={every}ba",
         "eval_subset_num_batches=1", f"save_folder={folder}", "save_overwrite=false", "autoresume=true",
         f"export_dir={os.path.join(folder, 'export') if export else 'null'}", f"device={args.device}",
         f"precision={'amp_bf16' if gpu else 'fp32'}", f"model.attn_impl={'auto' if gpu else 'sdpa'}",
         f"global_train_batch_size={args.batch * ranks}", f"device_train_microbatch_size={args.batch}",
         "fsdp={sharding_strategy: FULL_SHARD, activation_checkpointing: true, state_dict_type: sharded}",
         "optimizer.clip_grad_norm=1.0", "dist_timeout=120", "progress_bar=false", "log_to_console=false",
         f"loggers={{{PROBE}: {{stop_after: {'null' if stop_after is None else stop_after}}}}}"]
    o += ([f"pruning.target={target}", "pruning.init=activation", "pruning.lagrangian_warmup=0ba"] if pruning
          else ["pruning=null"])
    return o + (["distill={teacher: source, alpha: 1.0, temperature: 1.0}"] if distill else ["distill=null"])


def launch(name: str, ranks: int, stages: list[tuple[str, list[str]]], work: str, budget: float) -> dict:
    """`composer -n ranks bench/gpu_check.py --worker` over `stages`; returns each stage's report (or error)."""
    plan = os.path.join(work, f"{name}.plan.json")
    reports = {stage: os.path.join(work, f"{stage}.json") for stage, _ in stages}
    with open(plan, "w") as f:
        json.dump([{"report": reports[s], "overrides": o} for s, o in stages], f)
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    cmd = [shutil.which("composer", path=os.path.dirname(sys.executable)) or "composer", "-n", str(ranks),
           "--stdout", os.path.join(logs, f"{name}.rank{{rank}}.out"),
           "--stderr", os.path.join(logs, f"{name}.rank{{rank}}.err"), os.path.abspath(__file__), "--worker", plan]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])])}
    start = time.time()
    print(f"[{time.time() - T0:6.1f}s] launch {name}: composer -n {ranks}, stages {', '.join(reports)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    timeout = max(budget - (time.time() - T0) - 30, 30)  # 30 s kept for the export and resume checks
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\ntimed out after {timeout:.0f}s"
    with open(os.path.join(logs, f"{name}.out"), "w") as f:
        f.write(out)
    results = {}
    for stage, path in reports.items():
        if os.path.exists(path):
            results[stage] = read_json(path)
        else:
            results[stage] = {"error": f"launch {name} exited {proc.returncode} before this stage ended"}
        if "error" in results[stage]:
            results[stage]["log_tail"] = out[-2000:] + "".join(
                _tail(os.path.join(logs, f"{name}.rank{r}.err")) for r in range(ranks))
    print(f"[{time.time() - T0:6.1f}s] launch {name} exited {proc.returncode} after {time.time() - start:.0f}s",
          flush=True)
    return results


def _tail(path: str, n: int = 2000) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return f"\n--- {os.path.basename(path)}\n" + f.read()[-n:]


def finite(values) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def timing(r: dict) -> dict:
    """Median step (the first batches, with lazy initialisation and compilation, left out) and tokens/s."""
    seconds = r.get("batch_seconds") or []
    steady = seconds[min(3, len(seconds) // 2):]
    if not steady:
        return {}
    median = statistics.median(steady)
    return {"median_step_s": median, "tokens_per_s": r["tokens_per_batch"][-1] / median, "steps_timed": len(steady)}


def check_training(r: dict, folder: str, ranks: int, batches: int, shapes: dict | None = None, distill=True,
                   every: int = SAVE_EVERY) -> dict:
    """The stage ran to the end on `ranks` ranks with the features it was given, every logged number finite; with
    pruning (`shapes`: source and target), the activation init took the masks' expected shape at least 3/4 of the
    way from the source to the target."""
    from llmshearing.compat import is_sharded_checkpoint

    if "error" in r:
        return {"ok": False, **r}
    metrics = r["metrics"]
    res = {"world_size": r["world_size"], "precision": r["precision"], "attention": r["attention"],
           "batches": len(r["batch_seconds"]), "peak_gpu_gib": r["peak_gpu_gib"], **timing(r)}
    wanted = ["loss/train/total"] + (["loss/train/kd"] if distill else []) + ["grad_norm/before_clipping"]
    logged = {k: [v for _, v in metrics.get(k, [])] for k in wanted}
    res["final_loss"] = logged["loss/train/total"][-1] if logged["loss/train/total"] else None
    res["grad_norms"] = logged["grad_norm/before_clipping"]
    problems = [f"{k} logged {len(v)} of {batches} batches or not finite" for k, v in logged.items()
                if len(v) != batches or not finite(v)]
    if r["world_size"] != ranks:
        problems.append(f"ran on {r['world_size']} ranks, not {ranks}")
    if r["stopped_after"] is not None:
        problems.append(f"stopped after batch {r['stopped_after']}")
    if not is_sharded_checkpoint(os.path.join(folder, f"ep0-ba{every}")):
        problems.append(f"no sharded checkpoint ep0-ba{every}/ with .metadata in {folder}")
    if shapes is not None:
        init = os.path.join(folder, "mask_init.json")
        record = read_json(init) if os.path.exists(init) else {}
        expected = res["mask_init_expected_shape"] = record.get("expected_shape_step0") or {}
        if record.get("init") != "activation" or not record.get("calibration_sequences"):
            problems.append("pruning.init=activation wrote no mask_init.json with calibration sequences")
        elif not all(abs(expected[k] - t) <= 0.25 * abs(s - t) + 1e-6 * s for k, (s, t) in shapes.items()):
            problems.append(f"expected shape after the activation init {expected} is not 3/4 of the way from the "
                            f"source to the target (source, target: {shapes})")
    return {"ok": not problems, "problems": problems, **res}


def check_export(folder: str, target: dict, device: str) -> dict:
    """The export reloads with transformers as the target shape and computes the masked model's logits (eval,
    the export's test-time masks) in fp32, and on a GPU also under bf16 autocast."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmshearing.train.restore import load_checkpoint

    export = os.path.join(folder, "export")
    try:
        _, masked = load_checkpoint(os.path.join(folder, "latest-rank0.pt"))
        hf = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()
    except Exception:  # noqa: BLE001 - a failed check, reported with its cause
        return {"ok": False, "error": traceback.format_exc()[-3000:]}
    dev = "cuda" if device == "gpu" else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 comparison in true fp32
    torch.backends.cudnn.allow_tf32 = False
    masked, hf = masked.to(dev), hf.to(dev)
    shape = {k: hf.config.to_dict()[k] for k in target}
    ids = torch.randint(0, hf.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(dev)
    res = {"shape": shape, "problems": [] if shape == target else [f"export shape {shape} is not the target"]}
    for dtype in ("fp32", "bf16") if device == "gpu" else ("fp32",):
        with torch.no_grad(), masked.l0.target_masks(), torch.autocast(dev, torch.bfloat16, enabled=dtype == "bf16"):
            want = masked({"input_ids": ids}).float()
            got = hf(ids).logits.float()
        diff, scale = float((got - want).abs().max()), float(want.abs().max())
        res[f"max_abs_logit_diff_{dtype}"], res[f"max_abs_logit_{dtype}"] = diff, scale
        if not diff <= TOLERANCE[dtype] * max(1.0, scale):
            res["problems"].append(f"{dtype}: max |logit diff| {diff:.3g} > {TOLERANCE[dtype]} x max(1, {scale:.3g})")
    return {"ok": not res["problems"], **res}


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def check_resume(stop: dict, resumed: dict, base: str, folder: str, device: str) -> dict:
    """SIGTERM after batch STOP_AFTER saved a sharded checkpoint and stopped; the relaunch with autoresume started
    at that batch, its logs continue without a gap or repeat, and it ends where the uninterrupted run ended:
    exactly on CPU; on a GPU (non-deterministic kernels) LM losses within 2%, the weights' difference reported."""
    from llmshearing.compat import checkpoint_state, is_sharded_checkpoint
    from llmshearing.io import read_jsonl

    for name, r in (("stop", stop), ("resume", resumed)):
        if "error" in r:
            return {"ok": False, "failed": name, **r}
    problems = []
    if stop["stopped_after"] != STOP_AFTER:
        problems.append(f"the stopped run ended after batch {stop['stopped_after']}, not {STOP_AFTER}")
    saved = os.path.join(folder, f"ep0-ba{STOP_AFTER}")
    if not is_sharded_checkpoint(saved):
        problems.append(f"no sharded checkpoint {saved}")
    if resumed["first_batch"] != STOP_AFTER or len(resumed["batch_seconds"]) != RESUME_BATCHES - STOP_AFTER:
        problems.append(f"the resumed run started at batch {resumed['first_batch']} and trained "
                        f"{len(resumed['batch_seconds'])} batches (want {STOP_AFTER} and {RESUME_BATCHES - STOP_AFTER})")
    res = {"stopped_after": stop["stopped_after"], "resumed_at": resumed["first_batch"]}
    try:
        a, b = read_jsonl(os.path.join(base, "pruning_log.jsonl")), read_jsonl(os.path.join(folder, "pruning_log.jsonl"))
        if [row["step"] for row in b] != list(range(RESUME_BATCHES)):
            problems.append(f"the resumed folder's pruning log has steps {[row['step'] for row in b]}")
        lm = "loss/train/lm"  # the cross-entropy: far from 0, unlike the KD term or the Lagrangian in the total
        rel = max(abs(x[lm] - y[lm]) / abs(x[lm]) for x, y in zip(a, b, strict=True))
        res["logs_equal"] = a == b
        wa, wb = (read_jsonl(os.path.join(f, "domain_weights.jsonl")) for f in (base, folder))
        sa = checkpoint_state(os.path.join(base, f"ep0-ba{RESUME_BATCHES}"))["model"]
        sb = checkpoint_state(os.path.join(folder, f"ep0-ba{RESUME_BATCHES}"))["model"]
    except Exception:  # noqa: BLE001
        return {"ok": False, "problems": problems, "error": traceback.format_exc()[-3000:], **res}
    weights = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa) if sa.keys() == sb.keys() else math.inf
    res.update({"max_rel_loss_diff": rel, "max_abs_weight_diff": weights,
                "domain_weights_equal": [w["weights"] for w in wa] == [w["weights"] for w in wb]})
    if device == "cpu":
        if weights or not (res["logs_equal"] and res["domain_weights_equal"]):
            problems.append("the resumed run does not end bit-identical to the uninterrupted one")
    elif not rel <= 0.02 or not math.isfinite(weights):
        problems.append(f"the resumed run's LM losses differ from the uninterrupted run's by {rel:.3g} (relative)")
    return {"ok": not problems, "problems": problems, **res}


def main(argv=None) -> int:
    global T0
    T0 = time.time()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", metavar="PLAN", help=argparse.SUPPRESS)
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--out", help="the JSON report (default: docs/throughput/gpu-check.json on a GPU, "
                                 "runs/gpu-check-cpu.json on CPU)")
    p.add_argument("--batches", type=int, help="batches of the timed masked and dense stages (default 30 GPU, 4 CPU)")
    p.add_argument("--batch", type=int, help="sequences per rank per batch (default 16 GPU, 2 CPU)")
    p.add_argument("--tiny", help="a `make tiny` folder to reuse (made there when missing; default: in --work)")
    p.add_argument("--tiny-only", action="store_true", help="the tiny GQA model even where SmolLM2-135M is present")
    p.add_argument("--work", help="folder for the runs (default: a temporary folder, removed at the end)")
    p.add_argument("--budget", type=float, default=540,
                   help="seconds for the whole check; a launch still running when its share is spent is killed")
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    import torch

    gpu = args.device == "gpu"
    if gpu and not torch.cuda.is_available():
        print("error: --device gpu needs a CUDA GPU and this machine has none; --device cpu runs the same checks "
              "on CPU (tiny models, fp32, gloo)", file=sys.stderr)
        return 2
    args.batches = args.batches or (30 if gpu else 4)
    args.batch = args.batch or (16 if gpu else 2)
    out = args.out or (os.path.join(REPO, "docs", "throughput", "gpu-check.json") if gpu
                       else os.path.join(REPO, "runs", "gpu-check-cpu.json"))
    if args.work and os.path.isdir(args.work) and os.listdir(args.work):
        print(f"error: --work '{args.work}' is not empty; give a new folder (the runs resume what they find)",
              file=sys.stderr)
        return 2
    work = args.work or tempfile.mkdtemp(prefix="gpu-check-")
    os.makedirs(work, exist_ok=True)
    try:
        return _check(args, work, out)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def _check(args, work: str, out: str) -> int:
    import torch

    from llmshearing.io import atomic_write_text
    from llmshearing.model.hf import load_hf_config
    from llmshearing.pruning.shapes import shape_of
    from llmshearing.pruning.target import resolve_target

    gpu = args.device == "gpu"
    ranks = torch.cuda.device_count() if gpu else 2
    sources = tiny_sources(args.tiny or os.path.join(work, "tiny"), work)
    if gpu and not args.tiny_only and os.path.exists(os.path.join(SMOLLM2, "config.json")) \
            and os.path.exists(os.path.join(SHARDS, "manifest.json")):
        sources["gqa"] = {"model": SMOLLM2, "shards": SHARDS, "target": "smollm2-135m-half", "kind": "SmolLM2-135M"}
    folder = {s: os.path.join(work, s) for s in ("mha", "masked", "dense", "gqa", "gqa_stop")}
    B = RESUME_BATCHES
    one = [("mha", overrides(sources["mha"], folder["mha"], 1, args, batches=B, export=True)),
           ("masked", overrides(sources["gqa"], folder["masked"], 1, args, batches=args.batches, export=False,
                                distill=False, every=args.batches)),
           ("dense", overrides(sources["gqa"], folder["dense"], 1, args, batches=args.batches, export=False,
                               pruning=False, distill=False, every=args.batches))]
    stop = overrides(sources["gqa"], folder["gqa_stop"], ranks, args, batches=B, export=False, stop_after=STOP_AFTER)
    resume = overrides(sources["gqa"], folder["gqa_stop"], ranks, args, batches=B, export=False)
    stages = {**launch("one", 1, one, work, args.budget),
              **launch("all", ranks, [("gqa", overrides(sources["gqa"], folder["gqa"], ranks, args, batches=B,
                                                        export=True)), ("gqa_stop", stop)], work, args.budget)}
    stages.update(launch("resume", ranks, [("gqa_resume", resume)], work, args.budget)
                  if "error" not in stages["gqa_stop"] else {"gqa_resume": {"error": "gqa_stop failed"}})
    target, shapes = {}, {}
    for name, src in sources.items():
        source = load_hf_config(src["model"])
        target[name] = resolve_target(src["target"], source).as_dict()
        shapes[name] = {k: (v, target[name][k]) for k, v in shape_of(source).as_dict().items()}
    checks = {
        "train_mha_1_rank": check_training(stages["mha"], folder["mha"], 1, B, shapes["mha"]),
        f"train_gqa_{ranks}_ranks": check_training(stages["gqa"], folder["gqa"], ranks, B, shapes["gqa"]),
        "train_masked_1_rank": check_training(stages["masked"], folder["masked"], 1, args.batches, shapes["gqa"],
                                              distill=False, every=args.batches),
        "train_dense_1_rank": check_training(stages["dense"], folder["dense"], 1, args.batches, distill=False,
                                             every=args.batches),
        "export_mha": check_export(folder["mha"], target["mha"], args.device)
        if "error" not in stages["mha"] else {"ok": False, "error": "stage mha failed"},
        "export_gqa": check_export(folder["gqa"], target["gqa"], args.device)
        if "error" not in stages["gqa"] else {"ok": False, "error": "stage gqa failed"},
        "sigterm_then_autoresume_gqa": check_resume(stages["gqa_stop"], stages["gqa_resume"], folder["gqa"],
                                                    folder["gqa_stop"], args.device),
    }
    masked, dense = checks["train_masked_1_rank"], checks["train_dense_1_rank"]
    ratio = masked.get("median_step_s", math.nan) / dense.get("median_step_s", math.nan)
    checks["throughput"] = {"ok": finite([masked.get("tokens_per_s"), dense.get("tokens_per_s"), ratio]),
                            "masked_tokens_per_s": masked.get("tokens_per_s"),
                            "dense_tokens_per_s": dense.get("tokens_per_s"), "masked_over_dense_step": ratio}
    if gpu:
        checks["throughput"]["flash_attn_used"] = masked.get("attention", "").startswith("flash-attn")
    report = {
        "ok": all(c["ok"] for c in checks.values()), "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if gpu else None, "machine": platform.processor() or platform.machine(),
        "world_sizes": [1, ranks], "torch": torch.__version__, "seconds": time.time() - T0,
        "settings": {"timed_batches": args.batches, "sequences_per_rank": args.batch, "resume_batches": B,
                     "save_every": SAVE_EVERY, "stop_after": STOP_AFTER, "recipe": RECIPE},
        "sources": {k: {"model": v["model"], "kind": v["kind"], "target": target[k]} for k, v in sources.items()},
        "checks": checks,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=1, default=str) + "\n")
    for name, c in checks.items():
        why = "; ".join(c.get("problems") or []) or "".join((c.get("error") or "").strip().splitlines()[-1:])
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {name}" + (f": {why}" if not c["ok"] else ""))
    print(f"masked {checks['throughput']['masked_tokens_per_s'] or 0:.0f} tokens/s, dense "
          f"{checks['throughput']['dense_tokens_per_s'] or 0:.0f} tokens/s, masked / dense step {ratio:.3f}")
    print(f"{'all checks passed' if report['ok'] else 'FAILED'} in {report['seconds']:.0f}s; report: {out}")
    return 0 if report["ok"] else 1


T0 = time.time()

if __name__ == "__main__":
    sys.exit(main())
