"""`llmshearing <command>`: export a pruning checkpoint (HF, GGUF), convert an HF folder to GGUF, make the tiny
debug setup, run the demo, compute reference losses, evaluate model folders, solve the target shape of a parameter
budget."""
from __future__ import annotations

import argparse
import json
import sys

from llmshearing.checks import writable_output
from llmshearing.data.remote import shards_root
from llmshearing.errors import ConfigError, run_entry
from llmshearing.io import atomic_write_text
from llmshearing.train import plan


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write the dense HF model of a pruning checkpoint")
    p.add_argument("checkpoint", help="Composer checkpoint of a pruning run (e.g. runs/x/latest-rank0.pt)")
    p.add_argument("out_dir")
    p.add_argument("--config", help="run_config.yaml of the run (default: beside the checkpoint)")
    p.add_argument("--model-path", help="the run's source model folder (config.json, tokenizer) if it moved since the "
                                        "run (default: model.path of the run; the weights come from the checkpoint)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: the run's precision: bfloat16 for amp_bf16, float32 for fp32)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: Hugging Face safetensors folder; gguf: the same folder plus model.gguf (llama.cpp)")
    p.add_argument("--gguf-dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="tensor type of model.gguf with --format gguf (norms stay f32; default f16)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file (Hugging Face's default 5GB); bigger models are split into "
                        "model-0000k-of-0000n.safetensors with model.safetensors.index.json")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_export)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write model.gguf (llama.cpp's format) of a Hugging Face model folder")
    p.add_argument("model", help="Hugging Face model folder (an llmshearing export, or any Llama/Mistral/Qwen2 folder "
                                 "with safetensors and a tokenizer.json)")
    p.add_argument("--to", choices=["gguf"], required=True)
    p.add_argument("--gguf-dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    p.add_argument("--out", help="output file (default: <model>/model.gguf)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_convert)


def _add_make_tiny(sub) -> None:
    from llmshearing.experiments.tiny import FAMILY_CONFIGS  # heavy: torch

    p = sub.add_parser("make-tiny", help="write a tiny random model, tokenizer and two text domains")
    p.add_argument("out_dir")
    p.add_argument("--family", default="smollm2-gqa", choices=list(FAMILY_CONFIGS))
    p.set_defaults(handler=_make_tiny)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the embedded default: prune SmolLM2-135M on CPU, export, evaluate")
    p.add_argument("--data", default="data", help="folder made by `make fetch`")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("overrides", nargs="*", help="key=value overrides of yamls/demo_smollm2.yaml")
    p.set_defaults(handler=_demo)


def add_remote_arguments(p) -> None:
    """--remote / --local: shards in object storage (or another folder) read through a cache, as a run's
    data.remote / data.local (llmshearing.data.remote)."""
    p.add_argument("--remote", metavar="URI", help="shards at s3:// / gs:// / oci:// or a folder, instead of --shards; "
                                                   "shard files are fetched into --local on first read")
    p.add_argument("--local", metavar="DIR", help="cache folder for --remote (the one a run's data.local names can "
                                                  "be shared)")


def _add_reference_loss(sub) -> None:
    p = sub.add_parser(
        "reference-loss", help="per-domain reference losses for dynamic batch loading, as a yaml snippet",
        description="Either the source model's eval loss per domain (--model --shards), or a scaling-law "
                    "prediction L(N) = a/N^b + c at the target size (--fit with --target-params or --target), "
                    "or the paper's published values (--paper).")
    p.add_argument("--model", help="source model folder (HF checkpoint or GGUF folder); with --fit and a preset "
                                   "--target, the source whose vocabulary and tying enter the parameter count")
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument("--shards", help="shard folder (manifest.json) whose 'eval' split is evaluated")
    add_remote_arguments(p)
    p.add_argument("--domains", help="comma-separated domains (default: all, in manifest / input order)")
    p.add_argument("--max-sequences", type=int, help="evaluate the first N eval sequences per domain (default: all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--fit", metavar="FILE", help="yaml/json with 'sizes: {model: N}' and 'losses: {domain: {model: loss}}'")
    p.add_argument("--target-params", help="target parameter count for --fit (e.g. 1.3e9 or 1.3B)")
    p.add_argument("--target", help="target preset or HF config path for --fit, counted with llmshearing.pruning.shapes")
    p.add_argument("--paper", metavar="PRESET", help="the Sheared-LLaMA paper's values (LLaMA-2 tokenizer, RedPajama)")
    p.add_argument("--out", help="write the snippet to this file (atomically) instead of printing it")
    p.set_defaults(handler=_reference_loss)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="per-domain perplexity on shards and zero-shot task accuracy of HF model folders",
        description="Evaluate one or more model folders (source, exported pruned, continued): per-domain loss and "
                    "perplexity on the shards' 'test' split (--split eval: the split that steers training) and, "
                    "with the eval extra (lm-evaluation-harness), "
                    "zero-shot accuracy on local multiple-choice tasks. Prints a markdown table with a column "
                    "per model; --out writes everything as JSON.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="HF model folder, or a .gguf file")
    p.add_argument("--gguf-file", help="GGUF file name inside every MODEL folder")
    p.add_argument("--shards", help="shard folder (manifest.json) whose --split is evaluated")
    add_remote_arguments(p)
    p.add_argument("--split", default="test", choices=("test", "eval"),
                   help="test (default): held out for final numbers, never read by training; eval: the split "
                        "that steers training (its evals, dynamic loading, reference losses)")
    p.add_argument("--domains", help="comma-separated domains (default: all, in manifest order)")
    p.add_argument("--max-sequences", type=int, help="evaluate the first N sequences per domain (default: all)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (shards and tasks)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--tasks", help="comma-separated lm-eval task names (shipped: llmshearing_mc)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="folder of your own lm-eval task yamls (repeatable)")
    p.add_argument("--lm-eval-tasks", action="store_true",
                   help="also index lm-eval's own task catalogue (its datasets come from the HF hub)")
    p.add_argument("--num-fewshot", type=int, default=0, help="in-context examples per task item (default 0)")
    p.add_argument("--limit", type=int, help="score only the first N items of each task")
    p.add_argument("--out", help="write the results as JSON to this file (atomically)")
    p.set_defaults(handler=_eval)


def _add_target(sub) -> None:
    p = sub.add_parser(
        "target", help="the uniform target shape for a parameter budget, with its nearest alternatives",
        description="Solve the shape that `pruning.target: {params: N}` (or {params_fraction: F}) resolves to: the "
                    "source's dims scaled by one common factor, rounded to valid GQA shapes (hidden and intermediate "
                    "sizes in multiples of 64, or finer for tiny sources), the one closest to the source's proportions "
                    "within half an intermediate step of the budget. Rule: llmshearing/pruning/budget.py, "
                    "docs/budget.md.")
    p.add_argument("source", help="HF model folder or config.json of the source model")
    p.add_argument("--params", help="parameter budget, all parameters counted (70000000, 7e7, 70M, 1.3B)")
    p.add_argument("--fraction", type=float, help="budget as a fraction of the source's parameters, in (0, 1)")
    p.add_argument("--gguf-file", help="GGUF file name inside the source folder")
    p.add_argument("--alternatives", type=int, default=4, help="how many neighbouring shapes to list (default 4)")
    p.add_argument("--json", action="store_true", help="print {shape, params, budget, alternatives: [{shape, params}]}")
    p.set_defaults(handler=_target)


def _target(args) -> int:
    from llmshearing.model.loading import check_source  # heavy: torch, transformers
    # heavy: transformers
    from llmshearing.pruning.budget import budget_tolerance, parse_cli_budget, size_multiple, solve_budget
    from llmshearing.pruning.shapes import param_count, shape_of  # heavy: transformers

    if args.alternatives < 0:
        raise ConfigError(f"--alternatives must be at least 0, got {args.alternatives}")
    config = check_source(args.source, args.gguf_file, "source")
    solution = solve_budget(config, parse_cli_budget(args.params, args.fraction, config), args.alternatives)
    if args.json:
        print(json.dumps({"shape": solution.shape.as_dict(), "params": solution.params, "budget": solution.budget,
                          "alternatives": [{"shape": s.as_dict(), "params": n} for s, n in solution.alternatives]}))
        return 0
    source, total = shape_of(config), int(param_count(shape_of(config), config))
    row = lambda s, n: (f"{s.num_hidden_layers:>6} {s.hidden_size:>6} {s.num_attention_heads:>5} "  # noqa: E731
                        f"{s.num_key_value_heads:>3} {s.intermediate_size:>12} {n:>15,} {n - solution.budget:>+13,}")
    print(f"source: {'/'.join(map(str, source.as_dict().values()))} (layers/hidden/heads/kv/intermediate), "
          f"{total:,} params")
    print(f"budget: {solution.budget:,} params ({solution.budget / total:.1%} of the source); common factor "
          f"{solution.factor:.4f}; hidden in multiples of {size_multiple(source.hidden_size)}, intermediate of "
          f"{size_multiple(source.intermediate_size)}; tolerance +-{budget_tolerance(solution.shape, config):,.0f}")
    print(f"        {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>3} {'intermediate':>12} {'params':>15} {'gap':>13}")
    print("chosen  " + row(solution.shape, solution.params))
    for shape, n in solution.alternatives:
        print("        " + row(shape, n))
    return 0


def _export(args) -> int:
    from llmshearing.pruning.export import ExportOptions, parse_size  # heavy: torch, transformers
    from llmshearing.train.export_run import export_checkpoint  # heavy: composer, torch, transformers

    parse_size(args.max_shard_size)  # before the checkpoint is read
    options = ExportOptions(max_shard_size=args.max_shard_size,
                            gguf_dtype=args.gguf_dtype if args.format == "gguf" else None)
    kept = export_checkpoint(args.checkpoint, args.out_dir, args.config, args.dtype, args.overwrite, options,
                             args.model_path)
    print(f"wrote {args.out_dir}" + (f": {json.dumps(kept['target_shape'])}" if kept else " (not pruned: as trained)"))
    return 0


def _convert(args) -> int:
    from llmshearing.pruning.gguf_export import convert  # heavy: torch, transformers

    print(f"wrote {convert(args.model, args.gguf_dtype, args.out, args.overwrite)}")
    return 0


def _make_tiny(args) -> None:
    from llmshearing.experiments.tiny import make_tiny  # heavy: torch

    writable_output(args.out_dir, "out_dir")
    print(json.dumps(make_tiny(args.out_dir, args.family), indent=1))


def _demo(args) -> int | None:
    from llmshearing.experiments.demo import run_demo  # heavy: torch

    result = run_demo(args.data, args.out, args.overrides)
    return result if isinstance(result, int) else None  # a stage stopped by a signal: its exit code


def _reference_loss(args) -> None:
    if args.out:
        writable_output(args.out, "--out", folder=False)
    snippet = reference_loss_snippet(args)
    if args.out:
        atomic_write_text(args.out, snippet)
        print(f"wrote {args.out}")
    else:
        print(snippet, end="")


def _eval(args) -> None:
    run_eval(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmshearing")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_export, _add_convert, _add_make_tiny, _add_demo, _add_reference_loss, _add_eval, _add_target, plan.add_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run_entry(args.handler, args)
    return result if isinstance(result, int) else 0


def _names(value: str | None, key: str) -> list[str] | None:
    """A comma-separated list (None when not given); an empty one is refused."""
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{key}: give comma-separated names")
    return names


def run_eval(args) -> dict:
    """`llmshearing eval`: evaluate, print the table, then write the JSON (only after everything worked)."""
    from llmshearing.eval.evaluate import evaluate_models, report_table  # heavy: torch

    if args.out is not None:
        writable_output(args.out, "--out", folder=False)  # before the work, not after
    report = evaluate_models(args.models, args.shards, args.gguf_file, _names(args.domains, "--domains"),
                             args.max_sequences, args.batch_size, args.dtype, args.device,
                             _names(args.tasks, "--tasks") or [], args.include_path, args.lm_eval_tasks,
                             args.num_fewshot, args.limit, progress=sys.stderr.isatty(), remote=args.remote,
                             local=args.local, split=args.split)
    print(report_table(report))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return report


def reference_loss_snippet(args) -> str:
    """The snippet of `llmshearing reference-loss`, after checking that one mode's arguments are given."""
    from llmshearing.experiments import reference_losses as reference  # heavy: transformers

    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    if args.domains is not None and not domains:
        raise ConfigError("--domains: give comma-separated domain names (like common_crawl,github)")
    given = lambda *names: [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]  # noqa: E731
    if args.fit is not None and args.paper is not None:
        raise ConfigError("give one of --model/--shards, --fit or --paper, not --fit and --paper")
    if args.paper is not None:
        extra = given("model", "gguf_file", "shards", "remote", "local", "max_sequences", "target_params", "target")
        if extra:
            raise ConfigError(f"--paper takes no {', '.join(extra)}")
        if args.paper not in reference.PAPER_REFERENCE_LOSSES:
            raise ConfigError(f"--paper: unknown '{args.paper}'; known: {', '.join(reference.PAPER_REFERENCE_LOSSES)}")
        losses = reference.PAPER_REFERENCE_LOSSES[args.paper]
        if domains:
            unknown = [d for d in domains if d not in losses]
            if unknown:
                raise ConfigError(f"--domains: {unknown} have no paper values (known: {', '.join(losses)})")
            losses = {d: losses[d] for d in domains}
        return reference.reference_snippet(losses, f"Sheared-LLaMA paper, {args.paper} (scaling-law predictions "
                                                   f"on the LLaMA2 series; LLaMA-2 tokenizer, RedPajama), as released in "
                                                   f"princeton-nlp/LLM-Shearing llmshearing/scripts/pruning.sh")
    if args.fit is not None:
        extra = given("shards", "remote", "local", "max_sequences")
        if extra:
            raise ConfigError(f"--fit takes no {', '.join(extra)} (those are for a source model's eval loss)")
        targets = given("target_params", "target")
        if len(targets) != 1:
            raise ConfigError("--fit needs the target size: exactly one of --target-params N (like 1.3e9) or "
                              "--target PRESET_OR_CONFIG")
        if args.target_params is not None:
            if args.model is not None:
                raise ConfigError("--model is only used with --fit to count a --target preset's parameters")
            return reference.fit_snippet(args.fit, args.target_params, None, domains)
        n = reference.target_param_count(args.target, args.model, args.gguf_file)
        return reference.fit_snippet(args.fit, n, args.target, domains)
    if args.model is None or (args.shards is None and args.remote is None):
        raise ConfigError("reference-loss needs --model DIR with --shards DIR or --remote URI --local DIR (the "
                          "source model's eval loss), --fit FILE with --target-params N or --target PRESET, or "
                          "--paper PRESET")
    extra = given("target_params", "target")
    if extra:
        raise ConfigError(f"{', '.join(extra)} only go with --fit FILE")
    root = shards_root(args.shards, args.remote, args.local, ("--shards", "--remote", "--local"))
    return reference.source_snippet(args.model, root, args.gguf_file, domains, args.max_sequences,
                                    args.batch_size, progress=sys.stderr.isatty(), remote=args.remote)


if __name__ == "__main__":
    sys.exit(main())
