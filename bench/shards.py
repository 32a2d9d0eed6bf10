"""Shard-building throughput against `--workers`: the same build (the fetched text of `make fetch`, a budget that
reads most of it) with 1 worker pinned to one thread, 1 worker with `tokenizers`' own threads, and 2..N worker
processes; each run's output is compared byte for byte with the first.

    python -m bench.shards --out docs/throughput/shards-cpu.json       # after `make fetch`

A benchmark, not a test: it records the CPU use before it starts and warns when the machine is busy.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from bench.throughput import cpu_busy, log

DOMAINS = ("news", "books", "code", "docs")


def copies(text: str, folder: str, n: int) -> dict[str, list[str]]:
    """`n` copies of each domain's text file (distinct files: a file given twice is refused), for a build long
    enough that start-up (loading the tokenizer, starting workers: a few seconds) does not dominate."""
    inputs = {}
    for d in DOMAINS:
        inputs[d] = []
        for i in range(n):
            path = os.path.join(folder, f"{d}-{i}.jsonl")
            with open(os.path.join(text, d + ".jsonl"), "rb") as src, open(path, "wb") as dst:
                dst.write(src.read())
            inputs[d].append(path)
    return inputs


def build(out: str, workers: int, pin: bool, args, inputs) -> tuple[float, int, float]:
    """Wall seconds of one `python -m llmshearing.data_prep.shards` build, the tokens it wrote and the CPU seconds of its main
    process (reading what cannot be split, routing, writing: what bounds the use of more workers)."""
    env = {**os.environ, **({"RAYON_NUM_THREADS": "1"} if pin else {})}
    cmd = [sys.executable, "-m", "llmshearing.data_prep.shards", "--tokenizer", args.tokenizer, "--out", out,
           "--seq-len", "128", "--eval-sequences", "16", "--prune-tokens", str(args.prune_tokens),
           "--continue-tokens", str(args.continue_tokens), "--workers", str(workers), "--no-progress",
           *[a for d in DOMAINS for path in inputs[d] for a in ("--domain", f"{d}={path}")]]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    main_cpu = float(re.search(r"main process ([0-9.]+) s CPU", proc.stdout).group(1))
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    tokens = sum(s["tokens"] for d in manifest["domains"].values() for s in d["splits"].values())
    return seconds, tokens, main_cpu


def same_tree(a: str, b: str) -> bool:
    cmp = filecmp.dircmp(a, b)
    stack = [cmp]
    while stack:
        c = stack.pop()
        if c.left_only or c.right_only or filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)[1:] != ([], []):
            return False
        stack += c.subdirs.values()
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="data/models/smollm2-135m")
    p.add_argument("--text", default="data/text")
    p.add_argument("--copies", type=int, default=8, help="copies of each domain's text")
    p.add_argument("--prune-tokens", type=int, default=6_000_000)
    p.add_argument("--continue-tokens", type=int, default=14_000_000)
    p.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args(argv)
    busy = cpu_busy()
    if busy is not None and busy > 0.10:
        log(f"WARNING: the machine is busy ({busy:.0%} of the CPU in use before the start): ratios do not count")
    settings = [("1 worker, 1 thread", 1, True), ("1 worker, tokenizers' threads", 1, False)]
    settings += [(f"{n} workers", n, True) for n in range(2, args.max_workers + 1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = copies(args.text, tmp, args.copies)
        first = None
        for r in range(args.repeats):  # rounds alternate the settings, so drifting load hits all alike
            for label, workers, pin in settings:
                out = os.path.join(tmp, f"{r}-{workers}-{pin}")
                seconds, tokens, main_cpu = build(out, workers, pin, args, inputs)
                first = first or out
                identical = same_tree(first, out)
                rows.append({"setting": label, "workers": workers, "pinned": pin, "round": r, "seconds": seconds,
                             "tokens": tokens, "tokens_per_s": tokens / seconds, "main_cpu_s": main_cpu,
                             "identical_to_first": identical})
                log(f"{label}: {seconds:.1f} s, {tokens / seconds / 1e6:.2f}M tokens/s, main process {main_cpu:.1f} s "
                    f"CPU, identical output: {identical}")
    result = {"command": "python -m bench.shards " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu_busy_before": busy, "loadavg_before": os.getloadavg(), "cpus": os.cpu_count(), "rows": rows,
              "projection": projection(rows)}
    log(json.dumps(result["projection"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if all(r["identical_to_first"] for r in rows) else 1


# The 1.3B recipe's splits (paper: 0.4B pruning tokens, 50B continued-pretraining tokens; 7 domains x 500 eval
# sequences of 4096), tokenized once.
RECIPE_TOKENS = 0.4e9 + 50e9 + 7 * 500 * 4096


def projection(rows: list[dict], cores: int = 64) -> dict:
    """Wall time of the 1.3B recipe's shards on `cores` cores, from this machine's numbers: one pinned worker
    process's rate (tokenizing on one core) times cores - 1 workers, capped by the main process's ceiling (tokens
    per CPU second of the main process with 2 workers). Assumes the same per-core speed and text as measured."""
    def best(setting):
        got = [r for r in rows if r["setting"] == setting]
        return max(got, key=lambda r: r["tokens_per_s"]) if got else None

    one, two = best("1 worker, 1 thread"), best("2 workers")
    if not one or not two:
        return {}
    per_worker = one["tokens_per_s"]
    ceiling = two["tokens"] / two["main_cpu_s"]
    rate = min((cores - 1) * per_worker, ceiling)
    return {"cores": cores, "per_worker_tokens_per_s": per_worker, "main_ceiling_tokens_per_s": ceiling,
            "projected_tokens_per_s": rate, "bound_by": "main process" if ceiling < (cores - 1) * per_worker else
            "workers", "recipe_tokens": RECIPE_TOKENS, "projected_hours": RECIPE_TOKENS / rate / 3600}


if __name__ == "__main__":
    raise SystemExit(main())
