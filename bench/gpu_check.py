"""The GPU check of sharded pruning, prepared as one script for a machine with a CUDA GPU (not run on CPU):
a short world-size-1 FSDP pruning run of SmolLM2-135M in bf16 (flash-attn when it imports), and the same model
dense, printing tokens/s, peak GPU memory and the masked / dense step ratio.

    make shards && python -m bench.gpu_check --batches 30 --batch 16 --out docs/throughput/gpu-check.json

Both arms are `composer -n 1 bench/gpu_check.py --worker ...` running the demo recipe through the project's
trainer (build_trainer) with `fsdp: FULL_SHARD`, `precision: amp_bf16`, `model.attn_impl: auto`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP = "fsdp={sharding_strategy: FULL_SHARD, activation_checkpointing: true, state_dict_type: sharded}"


def worker(args) -> None:
    import torch
    from composer.core import Callback

    from llmshearing.model.decoder import attention_kernel
    from llmshearing.train.builders import build_trainer
    from llmshearing.train.config import load_config

    class Timing(Callback):
        def __init__(self):
            self.start, self.seconds = 0.0, []

        def batch_start(self, state, logger):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def batch_end(self, state, logger):
            torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.start)

    cfg = load_config("demo_smollm2", args.overrides)
    trainer, _ = build_trainer(cfg)
    timing = Timing()
    trainer.state.callbacks.append(timing)
    torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    with open(args.report, "w") as f:
        json.dump({"batch_seconds": timing.seconds, "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "attention": attention_kernel(cfg.model.attn_impl, "gpu", cfg.precision),
                   "tokens_per_batch": cfg.global_train_batch_size * 128}, f)
    trainer.close()


def arm(name: str, overrides: list[str], args, tmp: str) -> dict:
    report = os.path.join(tmp, f"{name}.json")
    cmd = [os.path.join(os.path.dirname(sys.executable), "composer"), "-n", "1", os.path.abspath(__file__), "--worker",
           "--report", report, "--", f"save_folder={os.path.join(tmp, name)}", "export_dir=null",
           "save_interval=100000ba", f"max_duration={args.batches}ba", "eval_interval=100000ba",
           "eval_subset_num_batches=1", "data.dynamic=null", "device=gpu", "precision=amp_bf16", "model.attn_impl=auto",
           f"global_train_batch_size={args.batch}", f"device_train_microbatch_size={args.batch}",
           "progress_bar=false", "log_to_console=false", FSDP, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"arm {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    r = json.load(open(report))
    steady = r["batch_seconds"][3:]
    r["median_step_s"] = statistics.median(steady)
    r["tokens_per_s"] = r["tokens_per_batch"] / r["median_step_s"]
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--batch", type=int, default=16, help="sequences of 128 tokens per batch")
    p.add_argument("--out")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench.gpu_check needs a CUDA GPU (this machine has none); the CPU figures come from bench.fsdp")
    with tempfile.TemporaryDirectory() as tmp:
        res = {"masked": arm("masked", [], args, tmp), "dense": arm("dense", ["pruning=null"], args, tmp)}
    res["masked_over_dense_step"] = res["masked"]["median_step_s"] / res["dense"]["median_step_s"]
    res["gpu"] = torch.cuda.get_device_name(0)
    for name in ("masked", "dense"):
        r = res[name]
        print(f"{name:<7} {r['tokens_per_s']:>10.0f} tokens/s  peak {r['peak_gpu_gib']:.2f} GiB  ({r['attention']})")
    print(f"masked / dense step: {res['masked_over_dense_step']:.3f} on {res['gpu']}")
    from bench.profile_masked import main as profile  # where the masked step's extra GPU time goes, by operator

    profile(["--device", "cuda", "--dtype", "bfloat16", "--train-batch", "8", "--train-seq", "512"]
            + (["--out", args.out.removesuffix(".json") + "-profile.json"] if args.out else []))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
