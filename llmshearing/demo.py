"""The embedded default (`make demo`): prune the real SmolLM2-135M on real multi-domain text on CPU,
export it as a dense HF model, reload it with transformers, and report per-domain perplexity."""
from __future__ import annotations

import json
import os
import time

import torch

from llmshearing.io import atomic_write_text

DEMO_YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "yamls", "demo_smollm2.yaml")


def _params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def run_demo(data_dir: str = "data", out_dir: str = "runs/demo", overrides: list[str] | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    from llmshearing.config import load_config
    from llmshearing.data import perplexity
    from llmshearing.train import build_trainer, export_trained

    times, t0 = {}, time.time()
    text = os.path.join(data_dir, "text")
    domains = sorted(f[:-6] for f in os.listdir(text) if f.endswith(".jsonl")) if os.path.isdir(text) else []
    cfg = load_config(DEMO_YAML, [
        f"model.path={os.path.join(data_dir, 'models', 'smollm2-135m')}", f"save_folder={out_dir}",
        *[f"data.domains.{d}={os.path.join(text, d + '.jsonl')}" for d in domains], *(overrides or []),
    ])
    trainer, tokenizer, eval_set = build_trainer(cfg)
    model = trainer.state.model
    times["load model + tokenize"] = time.time() - t0

    def domain_ppl(fn):
        return {d: perplexity(fn, eval_set.of_domain(d), cfg.device_eval_batch_size) for d in eval_set.domains}

    t = time.time()
    model.eval()
    ppl = {"source": domain_ppl(lambda ids: model.model(ids))}
    source_params = _params(model.model)
    times["eval source"] = time.time() - t

    t = time.time()
    trainer.fit()
    times["prune (L0 masks + Lagrangian)"] = time.time() - t

    t = time.time()
    model.eval()
    ppl["pruned (masked, before recovery)"] = domain_ppl(lambda ids: model(({"input_ids": ids})))
    times["eval masked"] = time.time() - t

    t = time.time()
    export_dir = os.path.join(out_dir, "export")
    kept = export_trained(trainer, cfg, tokenizer, export_dir, overwrite=True)
    times["export"] = time.time() - t

    t = time.time()
    hf = AutoModelForCausalLM.from_pretrained(export_dir, torch_dtype=torch.float32).eval()
    ppl["exported (reloaded with transformers)"] = domain_ppl(lambda ids: hf(ids).logits)
    probe = eval_set.windows[:2]
    with torch.no_grad():
        max_diff = float((hf(probe).logits - model({"input_ids": probe})).abs().max())
    times["reload + eval export"] = time.time() - t
    trainer.close()

    times["total"] = time.time() - t0
    summary = {
        "source_params": source_params, "pruned_params": _params(hf),
        "source_shape": kept["source_shape"], "target_shape": kept["target_shape"],
        "perplexity": ppl, "max_abs_logit_diff_masked_vs_export": max_diff,
        "seconds": times, "tokens_per_domain_eval": int(eval_set.windows.shape[1] * len(eval_set.of_domain(eval_set.domains[0]))),
        "plots": [os.path.join(out_dir, p) for p in ("pruning_shape.png", "pruning_lambdas.png")],
    }
    report = format_report(summary)
    print("\n" + report)
    atomic_write_text(os.path.join(out_dir, "summary.md"), report)
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
    return summary


def format_report(s: dict) -> str:
    domains = list(next(iter(s["perplexity"].values())))
    lines = [
        f"Parameters: source {s['source_params']:,} -> pruned {s['pruned_params']:,} "
        f"({s['pruned_params'] / s['source_params']:.1%})",
        f"Shape: {s['source_shape']} -> {s['target_shape']}",
        "",
        "| model | " + " | ".join(domains) + " |",
        "|---|" + "---|" * len(domains),
    ]
    for name, per in s["perplexity"].items():
        lines.append(f"| {name} | " + " | ".join(f"{per[d]:.2f}" for d in domains) + " |")
    lines += [
        "", f"Per-domain token perplexity on {s['tokens_per_domain_eval']} held-out tokens per domain.",
        f"Max |logit difference| masked model vs reloaded export: {s['max_abs_logit_diff_masked_vs_export']:.2e}",
        "", "| phase | seconds |", "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in s["seconds"].items()],
        "", "Plots: " + ", ".join(s["plots"]),
    ]
    return "\n".join(lines)
