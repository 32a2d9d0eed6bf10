"""`llmshearing <command>`: export a pruning checkpoint, make the tiny debug setup, run the demo."""
from __future__ import annotations

import argparse
import json
import sys

from llmshearing.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmshearing")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write the dense HF model of a pruning checkpoint")
    p.add_argument("checkpoint", help="Composer checkpoint of a pruning run (e.g. runs/x/latest-rank0.pt)")
    p.add_argument("out_dir")
    p.add_argument("--config", help="run_config.yaml of the run (default: beside the checkpoint)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("make-tiny", help="write a tiny random model, tokenizer and two text domains")
    p.add_argument("out_dir")
    p.add_argument("--family", default="smollm2-gqa", choices=["llama-mha", "smollm2-gqa", "mistral", "qwen2"])
    p = sub.add_parser("demo", help="the embedded default: prune SmolLM2-135M on CPU, export, evaluate")
    p.add_argument("--data", default="data", help="folder made by `make fetch`")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("overrides", nargs="*", help="key=value overrides of yamls/demo_smollm2.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            from llmshearing.train import export_checkpoint

            kept = export_checkpoint(args.checkpoint, args.out_dir, args.config, args.dtype, args.overwrite)
            print(f"wrote {args.out_dir}: {json.dumps(kept['target_shape'])}")
        elif args.command == "make-tiny":
            from llmshearing.tiny import make_tiny

            print(json.dumps(make_tiny(args.out_dir, args.family), indent=1))
        elif args.command == "demo":
            from llmshearing.demo import run_demo

            run_demo(args.data, args.out, args.overrides)
    except (ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
