"""The README.md model card of an export: where the model came from and what the run measured, from the run's own
files (config, logs), never typed by hand."""
from __future__ import annotations

import json
import math
import os
import shlex
import sys

from llmshearing.io import read_jsonl
from llmshearing.pruning.shapes import shape_of

CHECKED = "transformers (AutoModelForCausalLM / AutoTokenizer, safetensors; the GGUF file through transformers' GGUF reader)"
NOT_RUN = "llama.cpp, Ollama, vLLM: not run"


def source_license(source_dir: str | None) -> str | None:
    """The `license:` of the source's model card front matter (Hugging Face's convention), when it has one."""
    readme = source_dir and os.path.join(source_dir, "README.md")
    if not readme or not os.path.isfile(readme):
        return None
    with open(readme, encoding="utf-8", errors="replace") as f:
        text = f.read(20000)
    if not text.startswith("---"):
        return None
    for line in text.split("---", 2)[1].splitlines():
        if line.strip().startswith("license:"):
            return line.split(":", 1)[1].strip().strip("'\"") or None
    return None


def earlier_stages(source_dir: str | None) -> list[dict]:
    """The stages of the source when it is itself an llmshearing export (continued pretraining of a pruned model)."""
    marker = source_dir and os.path.join(source_dir, "llmshearing_export.json")
    if not marker or not os.path.isfile(marker):
        return []
    try:
        with open(marker) as f:
            stages = json.load(f).get("stages", [])
    except (OSError, ValueError, AttributeError):  # the card is a summary: a damaged marker drops its history only
        return []
    return list(stages) if isinstance(stages, list) else []


def run_facts(cfg, tokens, run_folder: str | None, checkpoint: str | None = None, batch: int | None = None) -> dict:
    """What the card says about the run that produced the weights: stage, tokens trained, the data mixture, the
    final domain weights and per-domain eval perplexities (DynamicLoading's log, up to the exported batch)."""
    facts = {"stage": "pruning" if cfg.pruning is not None else "continued pretraining",
             "tokens": None if tokens is None else int(tokens), "run_name": cfg.run_name,
             "domains": cfg.data.domains, "initial_proportions": cfg.data.proportions,
             "dynamic_loading": cfg.data.dynamic is not None, "checkpoint": checkpoint,
             "command": shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}
    rows = read_jsonl(os.path.join(run_folder, "domain_weights.jsonl"), last_per="batch") if run_folder else []
    rows = [r for r in rows if batch is None or r["batch"] <= batch]  # a later checkpoint's rows are not this model's
    if rows:
        last = rows[-1]
        facts["final_domain_weights"] = dict(zip(last["domains"], last["weights"]))
        if last.get("losses"):
            facts["eval_perplexity"] = {d: math.exp(v) for d, v in zip(last["domains"], last["losses"])}
            facts["eval_batch"] = last["batch"]
    return facts


def stages(facts: dict, source_dir: str | None) -> list[dict]:
    """Every training stage behind an export, oldest first (kept in the export's marker for the next stage)."""
    if not facts:
        return earlier_stages(source_dir)
    return [*earlier_stages(source_dir), {k: facts.get(k) for k in ("stage", "tokens", "run_name")}]


def model_card(config, params: int, dtype, kept: dict | None, facts: dict, source_dir: str | None,
               gguf: str | None = None) -> str:
    stages_ = stages(facts, source_dir)
    license_ = source_license(source_dir)
    front = ["---", "library_name: transformers", *([f"license: {license_}"] if license_ else []),
             "tags: [llmshearing, pruned]" if kept else "tags: [llmshearing]", "---", ""]
    shape = shape_of(config).as_dict()  # GPT-NeoX's config has no num_key_value_heads
    lines = [f"# {facts.get('run_name') or 'llmshearing export'}", "",
             f"A {config.model_type} model written by llmshearing ({facts.get('stage', 'export')}).", "",
             f"- Source model: `{facts.get('source') or source_dir}`" + (f" (license: {license_})" if license_ else
                                                                         " (license: not stated in the source)"),
             f"- Shape: {json.dumps(shape)}, head_dim {getattr(config, 'head_dim', None)}, vocabulary "
             f"{config.vocab_size}, tied embeddings: {bool(config.tie_word_embeddings)}",
             f"- Parameters: {params:,} ({str(dtype).removeprefix('torch.')})"]
    for s in stages_:
        tokens = "not recorded" if s.get("tokens") is None else f"{s['tokens']:,}"
        lines.append(f"- Tokens {'pruned' if s.get('stage') == 'pruning' else 'continued'} "
                     f"({s.get('run_name') or s.get('stage')}): {tokens}")
    if kept:
        src = kept.get("source_shape", {})
        lines.append(f"- Pruning (pruning.json): {json.dumps(src)} -> {json.dumps(kept.get('target_shape'))}; "
                     f"layers kept {kept['layers']}" + (f"; scoring: {kept['scoring']}" if "scoring" in kept else ""))
    mix = facts.get("initial_proportions")
    if facts.get("domains") or mix is not None or facts.get("final_domain_weights"):
        lines.append(f"- Data: domains {facts.get('domains') or 'all of the shards'}, initial proportions "
                     f"{json.dumps(mix) if mix is not None else 'the shards'}, dynamic batch loading "
                     f"{'on' if facts.get('dynamic_loading') else 'off'}")
    if facts.get("final_domain_weights"):
        lines.append("- Final domain weights: " + ", ".join(f"{d} {w:.3f}" for d, w in
                                                            facts["final_domain_weights"].items()))
    if facts.get("eval_perplexity"):
        lines.append(f"- Eval perplexity per domain (the run's evaluation at batch {facts.get('eval_batch')}, "
                     f"held-out eval split; while pruning, of the masked model): " +
                     ", ".join(f"{d} {p:.2f}" for d, p in facts["eval_perplexity"].items()))
    if facts.get("checkpoint"):
        lines.append(f"- Exported from checkpoint `{facts['checkpoint']}`")
    lines.append(f"- Made by: `{facts.get('command')}`")
    lines += ["", "## Runtimes", "",
              f"- Checked by the project's tests on tiny models: {CHECKED}.",
              f"- {NOT_RUN}." + (f" `model.gguf` ({gguf}) is written for llama.cpp (`llama-cli -m model.gguf`)."
                                 if gguf else ""), ""]
    return "\n".join(front + lines)
