"""The embedded default (`make demo`): the whole LLM-Shearing path on the real SmolLM2-135M and real
multi-domain text, on CPU:

  shards (`data_prep.shards`) -> reference losses (the source model's per-domain eval loss)
  -> pruning with dynamic batch loading (yamls/demo_smollm2.yaml) -> export as a dense HF model
  -> continued pretraining with dynamic batch loading (yamls/demo_continue.yaml) -> export
  -> per-domain perplexity of source / pruned / continued on the shards' `test` split (never read by training,
     dynamic loading or the reference losses, which use `eval`), reloaded with transformers, and plots
  -> `<out>/continued/model.gguf` for llama.cpp (not run here).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time

from omegaconf import OmegaConf
import torch
import yaml

from llmshearing.data.layout import TEST as FINAL_SPLIT  # the split every final number is reported on
from llmshearing.data_prep.shards import build_default_shards
from llmshearing.errors import ConfigError
from llmshearing.eval.evaluate import domain_losses
from llmshearing.io import atomic_write_text
from llmshearing.checkpoint_files import batch_of, checkpoints
from llmshearing.train.config import batches, identity, load_config, resolve_recipe
from llmshearing.train.restore import load_checkpoint
from llmshearing.train.run import run
from llmshearing.train.run_folder import CONFIG_NAME


def _params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _stage_overrides(overrides: list[str], stage: str) -> list[str]:
    """`key=v` applies to both stages, `prune.key=v` / `continue.key=v` to one."""
    out = []
    for o in overrides:
        head, _, rest = o.partition(".")
        if head in ("prune", "continue"):
            if head == stage:
                out.append(rest)
        else:
            out.append(o)
    return out


def _finished_stage(cfg) -> dict | None:
    """The result of a stage that an earlier demo run finished (its newest checkpoint at max_duration, its export
    written, the same model, target and data), or None: a rerun of the demo reuses it instead of training again."""
    from llmshearing.pruning.export import EXPORT_MARKER  # heavy: transformers

    found, config = checkpoints(cfg.save_folder), os.path.join(cfg.save_folder, CONFIG_NAME)
    if not (found and batch_of(found[-1]) >= batches(cfg.max_duration) and os.path.isfile(config)
            and os.path.isfile(os.path.join(cfg.export_dir, EXPORT_MARKER))):
        return None
    with open(config) as f:
        if identity(yaml.safe_load(f)) != identity(cfg):
            return None  # another run: training refuses it with its own message
    kept = os.path.join(cfg.export_dir, "pruning.json")
    print(f"demo: reusing the finished stage in {cfg.save_folder} and its export {cfg.export_dir} (delete them to "
          f"train it again)", flush=True)
    with open(kept) if os.path.isfile(kept) else contextlib.nullcontext() as f:
        return {"seconds": 0.0, "kept": json.load(f) if f else None, "stopped_after": None}


def run_demo(data_dir: str = "data", out_dir: str = "runs/demo", overrides: list[str] | None = None) -> dict | int:
    """The summary; or, when a stage was stopped by SIGTERM / SIGINT (its checkpoint saved), that stage's exit
    code, after one line saying how to resume."""
    from transformers import AutoModelForCausalLM  # heavy: transformers

    # heavy: transformers
    from llmshearing.experiments.reference_losses import reference_snippet, source_reference_losses
    overrides = list(overrides or [])
    times, t0 = {}, time.time()
    model_dir = os.path.join(data_dir, "models", "smollm2-135m")
    shards = os.path.join(data_dir, "shards")
    build_default_shards(data_dir)
    times["shards"] = time.time() - t0

    t = time.time()
    ref_file = os.path.join(out_dir, "reference_losses.yaml")
    reference = source_reference_losses(model_dir, shards)
    atomic_write_text(ref_file, reference_snippet(reference, f"per-domain eval loss of {model_dir}"))
    times["reference losses (source eval)"] = time.time() - t

    stages = {}
    for stage, yaml_name, model_path in (("prune", "demo_smollm2", model_dir),
                                         ("continue", "demo_continue", os.path.join(out_dir, "pruned"))):
        paths = [f"model.path={model_path}", f"data.shards={shards}", f"data.dynamic.reference_losses={ref_file}",
                 f"save_folder={os.path.join(out_dir, stage)}",
                 f"export_dir={os.path.join(out_dir, 'pruned' if stage == 'prune' else 'continued')}"]
        if stage == "continue":
            paths.append(f"data.proportions={os.path.join(out_dir, 'prune', 'domain_weights.json')}")
            if OmegaConf.load(resolve_recipe(yaml_name)).get("distill") is not None:
                paths.append(f"distill.teacher={model_dir}")  # the source this demo pruned
        # autoresume: a rerun continues a stage a SIGTERM stopped; a stage an earlier run finished is reused
        cfg = load_config(yaml_name, paths + ["autoresume=true"] + _stage_overrides(overrides, stage))
        t = time.time()
        stages[stage] = {"cfg": cfg, **(_finished_stage(cfg) or run(cfg))}
        times[f"{stage} (train + export)"] = time.time() - t
        stopped = stages[stage]["stopped_after"]
        if stopped is not None:  # the stage saved a checkpoint and exported nothing: the next stage has no input
            signum = stages[stage]["signal"]
            print(f"demo: the {stage} stage was stopped by {signal.Signals(signum).name} after batch {stopped}; its "
                  f"checkpoint is in {cfg.save_folder}: run the demo again (same command) to resume from it",
                  file=sys.stderr, flush=True)
            return 128 + signum

    t = time.time()
    cfg = stages["prune"]["cfg"]
    models = {"source": os.path.join(model_dir), "pruned": cfg.export_dir,
              "pruned + continued": stages["continue"]["cfg"].export_dir}
    losses, params = {}, {}
    for name, path in models.items():
        hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        losses[name] = domain_losses(lambda ids: hf(ids).logits, shards, cfg.data.domains, split=FINAL_SPLIT)
        params[name] = _params(hf)
    times["eval (3 models, reloaded with transformers)"] = time.time() - t

    # The masked model of the last pruning checkpoint computes what the export computes.
    _, masked = load_checkpoint(os.path.join(cfg.save_folder, "latest-rank0.pt"))
    pruned = AutoModelForCausalLM.from_pretrained(cfg.export_dir, torch_dtype=torch.float32).eval()
    probe = torch.randint(0, pruned.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with masked.l0.target_masks():  # the export's masks (evals during pruning use the expected size)
            max_diff = float((pruned(probe).logits - masked({"input_ids": probe})).abs().max())

    gguf = demo_gguf(stages["continue"]["cfg"].export_dir)
    times["total"] = time.time() - t0
    weights = {}
    for stage in stages:
        with open(os.path.join(out_dir, stage, "domain_weights.json")) as f:
            weights[stage] = json.load(f)
    summary = {
        "params": params, "kept_shape": stages["prune"]["kept"]["target_shape"],
        "source_shape": stages["prune"]["kept"]["source_shape"],
        "split": FINAL_SPLIT, "loss": losses, "perplexity": {m: {d: float(torch.tensor(v).exp()) for d, v in per.items()} for m, per in losses.items()},
        "reference_losses": reference, "final_domain_weights": weights,
        "max_abs_logit_diff_masked_vs_export": max_diff, "seconds": times, "gguf": gguf,
        "masks_at_cut": _masks_at_cut(cfg.save_folder),
        "budget": {s: {"batches": v["cfg"].max_duration, "batch": v["cfg"].global_train_batch_size}
                   for s, v in stages.items()},
        "plots": sorted(os.path.join(out_dir, s, f) for s in stages for f in os.listdir(os.path.join(out_dir, s))
                        if f.endswith(".png")),
    }
    report = format_report(summary)
    print("\n" + report)
    atomic_write_text(os.path.join(out_dir, "summary.md"), report)
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
    return summary


def _masks_at_cut(folder: str) -> dict | None:
    """Whether the pruning stage's masks had settled on the target at the cut (llmshearing.callbacks.pruning_log.settling)."""
    from llmshearing.callbacks.pruning_log import SETTLE_FILE  # heavy: composer

    path = os.path.join(folder, SETTLE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def demo_gguf(export_dir: str, dtype: str = "f16") -> dict:
    """`<continued export>/model.gguf` for llama.cpp; a refusal (a tokenizer GGUF cannot carry) is reported, not
    fatal: the HF export is the demo's result."""
    from llmshearing.pruning.gguf_export import convert  # heavy: transformers

    try:
        return {"file": convert(export_dir, dtype, overwrite=True), "dtype": dtype}
    except ConfigError as e:
        return {"refused": str(e)}


def format_report(s: dict) -> str:
    domains = list(next(iter(s["perplexity"].values())))
    names = list(s["params"])
    lines = [
        "Parameters: " + " -> ".join(f"{n} {s['params'][n]:,}" for n in names[:2]),
        f"Shape: {s['source_shape']} -> {s['kept_shape']}",
        "", "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains),
    ]
    for name, per in s["perplexity"].items():
        lines.append(f"| {name} | " + " | ".join(f"{per[d]:.2f}" for d in domains) + " |")
    lines += ["", f"Per-domain token perplexity on the shards' held-out {s.get('split', 'eval')} split"
              + (" (never read by training, dynamic loading or the reference losses)." if s.get("split") == "test"
                 else "."),
              "Reference losses (source): " + ", ".join(f"{d} {v:.3f}" for d, v in s["reference_losses"].items())]
    for stage, w in s["final_domain_weights"].items():
        lines.append(f"Domain weights at the end of {stage}: " + ", ".join(f"{d} {v:.3f}" for d, v in w.items()))
    g = s.get("gguf") or {}
    if g.get("file"):
        lines.append(f"GGUF ({g['dtype']}): {g['file']}; run it with llama.cpp: `llama-cli -m {g['file']} -p "
                     f"\"Once upon a time\" -n 64` (not run here; transformers reads it back: "
                     f"`AutoModelForCausalLM.from_pretrained('{os.path.dirname(g['file'])}', gguf_file='model.gguf')`)")
    elif g.get("refused"):
        lines.append(f"GGUF: not written ({g['refused']})")
    if s.get("masks_at_cut"):
        from llmshearing.callbacks.pruning_log import decided_line, settle_line  # heavy: composer

        lines.append("Pruning: " + settle_line(s["masks_at_cut"]))
        undecided = decided_line(s["masks_at_cut"].get("kept_gate_median", {}))  # absent in older runs' files
        if undecided:
            lines.append("Pruning: " + undecided)
    lines += [f"Max |logit difference| masked model vs reloaded export: {s['max_abs_logit_diff_masked_vs_export']:.2e}",
              "", "| phase | seconds |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in s["seconds"].items()],
              "", "Plots: " + ", ".join(s["plots"])]
    return "\n".join(lines)
