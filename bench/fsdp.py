"""FSDP on CPU with two processes (gloo), SmolLM2-135M: peak host memory per rank (does rank 1 hold a full copy of
the weights?) and the masked / dense training-step ratio under Composer's FSDP. A benchmark, not a test.

    python -m bench.fsdp                       # needs `make shards` (data/shards, data/models/smollm2-135m)
    python -m bench.fsdp --batches 12 --out docs/throughput/fsdp-cpu.json

Each arm is `composer -n 2 bench/fsdp.py --worker ...`: the real trainer of the demo recipe (build_trainer), with
the `fsdp` section set (FULL_SHARD) or not (DDP). Every rank reports its peak RSS (getrusage) after the trainer
is built and at the end, and rank 0 the wall time of every training batch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP = "fsdp={sharding_strategy: FULL_SHARD, activation_checkpointing: false, state_dict_type: sharded}"


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> None:
    from composer.core import Callback

    from llmshearing.train.builders import build_trainer
    from llmshearing.train.config import load_config
    from llmshearing.train.run import malloc_trim

    class Timing(Callback):
        def __init__(self):
            self.start, self.seconds = 0.0, []

        def batch_start(self, state, logger):
            self.start = time.perf_counter()

        def batch_end(self, state, logger):
            self.seconds.append(time.perf_counter() - self.start)

    cfg = load_config("demo_smollm2", args.overrides)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports (torch, Composer) and config
    trainer, _ = build_trainer(cfg)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    malloc_trim()  # hand freed pages back, so the current RSS shows what the rank still holds
    held = current_rss_mb()
    timing = Timing()
    trainer.state.callbacks.append(timing)
    trainer.fit()
    rank = int(os.environ.get("RANK", 0))
    with open(f"{args.report}.rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "peak_rss_mb_before_build": before, "peak_rss_mb_after_build": built,
                   "rss_mb_after_build": held,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "batch_seconds": timing.seconds}, f)
    trainer.close()


def arm(name: str, overrides: list[str], batches: int, tmp: str) -> dict:
    report = os.path.join(tmp, name)
    folder = os.path.join(tmp, f"run-{name}")
    args = [os.path.join(os.path.dirname(sys.executable), "composer"), "-n", "2", "--stdout", f"{report}.rank{{rank}}.out",
            "--stderr", f"{report}.rank{{rank}}.err", os.path.abspath(__file__), "--worker", "--report", report, "--",
            f"save_folder={folder}", "export_dir=null", "save_interval=100000ba", f"max_duration={batches}ba",
            "eval_interval=100000ba", "eval_subset_num_batches=1", "data.num_workers=0", "device=cpu",
            "progress_bar=false", "log_to_console=false", "device_train_microbatch_size=1", "data.dynamic=null",
            *overrides]
    start = time.time()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"arm {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    ranks = [json.load(open(f"{report}.rank{r}.json")) for r in (0, 1)]
    steady = ranks[0]["batch_seconds"][2:]  # the first batches include lazy initialisation
    return {"wall_s": time.time() - start, "median_step_s": statistics.median(steady),
            "steps_timed": len(steady), "ranks": ranks}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    load = os.getloadavg()
    print(f"load average at start {load[0]:.2f} on {os.cpu_count()} cores", flush=True)
    if load[0] > 0.5 * (os.cpu_count() or 1):
        print("WARNING: the machine is busy; step ratios measured now understate overheads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "fsdp_masked": arm("fsdp_masked", [FSDP], args.batches, tmp),
            "fsdp_dense": arm("fsdp_dense", [FSDP, "pruning=null", "data.split=prune"], args.batches, tmp),
            "ddp_masked": arm("ddp_masked", [], args.batches, tmp),
        }
    ratio = results["fsdp_masked"]["median_step_s"] / results["fsdp_dense"]["median_step_s"]
    summary = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_at_start": load,
               "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or "default", "batches": args.batches,
               "batch": "2 sequences x 128 tokens (1 per rank)", "masked_over_dense_step_fsdp": ratio, **results}
    print(f"{'arm':<12} {'median step s':>14}  RSS MB, rank 0 / rank 1: peak growth while building | held after "
          f"building | peak of the run")
    for name, r in results.items():
        a, b = r["ranks"]
        grew = [x["peak_rss_mb_after_build"] - x["peak_rss_mb_before_build"] for x in (a, b)]
        print(f"{name:<12} {r['median_step_s']:>14.3f}  +{grew[0]:.0f} / +{grew[1]:.0f} | "
              f"{a['rss_mb_after_build']:.0f} / {b['rss_mb_after_build']:.0f} | {a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f}")
    print(f"masked / dense step under 2-process FSDP: {ratio:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
