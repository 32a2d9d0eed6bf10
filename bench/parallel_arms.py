"""Two reproduce runs at once with one thread each, or one after the other with all the cores? (issue 25)

    python -m bench.parallel_arms --scale 0.25 --out runs/parallel-arms      # ~18 min on 2 idle cores
    python -m bench.parallel_arms --model data/tiny/model --shards data/tiny/shards --target TINY_TARGET --out /tmp/pa -- --steps 8  # smoke

Runs `python -m llmshearing.experiments.reproduce --arms <arms> --scale S` for seeds A and B twice: first one after
the other with OMP_NUM_THREADS = all cores, then both at once with cores / 2 threads each. It records the wall time
of each way, the CPU's busy and idle jiffies over it (/proc/stat) and the load average before, between and after (the
machine must be otherwise idle for the ratio to mean anything), and checks that both ways gave the same final losses.
The result decides whether `reproduce --parallel 2` is the faster way to run many arms (docs/runs/reproduce_mini.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from llmshearing.io import atomic_write_text


def cpu_jiffies() -> tuple[int, int]:
    """(busy, idle) jiffies of all CPUs since boot: user+nice+system+irq+softirq, idle+iowait."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return v[0] + v[1] + v[2] + v[5] + v[6], v[3] + v[4]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def one_way(name: str, a, threads: int, at_once: bool) -> dict:
    """Both seeds' reproduce runs, at once or one after the other: wall seconds, CPU busy share, final losses."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmds = {seed: [sys.executable, "-m", "llmshearing.experiments.reproduce", "--arms", *a.arms, "--scale", str(a.scale),
                   "--seed", str(seed), "--out", os.path.join(a.out, f"{name}-{seed}"), "--model", a.model,
                   "--shards", a.shards, "--target", a.target, *a.extra] for seed in a.seeds}
    busy0, idle0 = cpu_jiffies()
    start, load_before = time.time(), loadavg()
    procs = []
    for seed, cmd in cmds.items():
        with open(os.path.join(a.out, f"{name}-{seed}.log"), "w") as log:  # the child keeps its own descriptor
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        if not at_once:
            procs[-1].wait()
    rcs = [p.wait() for p in procs]
    seconds = time.time() - start
    busy1, idle1 = cpu_jiffies()
    if any(rcs):
        raise SystemExit(f"{name}: a run failed (exit codes {rcs}); see {a.out}/{name}-*.log")
    losses = {}
    for seed in a.seeds:
        with open(os.path.join(a.out, f"{name}-{seed}", "summary.json")) as f:
            losses[str(seed)] = {arm: r["final_mean_loss"] for arm, r in json.load(f)["arms"].items()}
    return {"threads_per_run": threads, "at_once": at_once, "seconds": seconds, "load_before": load_before,
            "cpu_busy_share": (busy1 - busy0) / max(1, busy1 - busy0 + idle1 - idle0), "final_mean_loss": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", nargs="+", default=["sheared_act", "oneshot_act"])
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--seeds", type=int, nargs=2, default=[17, 18])
    ap.add_argument("--model", default="data/models/smollm2-135m")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--target", default="smollm2-135m-half")
    ap.add_argument("--out", default="runs/parallel-arms")
    ap.add_argument("extra", nargs="*", help="more arguments for every reproduce run (e.g. --steps 8 --batch 2)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=False)  # a fresh folder: reproduce would skip arms found done
    cores = os.cpu_count() or 1
    result = {"cores": cores, "arms": a.arms, "scale": a.scale, "seeds": a.seeds,
              "one_after_the_other": one_way("sequential", a, cores, at_once=False)}
    result["at_once"] = one_way("parallel", a, max(1, cores // 2), at_once=True)
    result["load_after"] = loadavg()
    result["speedup"] = result["one_after_the_other"]["seconds"] / result["at_once"]["seconds"]
    result["same_losses"] = all(
        abs(result["at_once"]["final_mean_loss"][s][arm] - v) <= 1e-4 * abs(v)
        for s, by_arm in result["one_after_the_other"]["final_mean_loss"].items() for arm, v in by_arm.items())
    atomic_write_text(os.path.join(a.out, "result.json"), json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("cores", "speedup", "same_losses", "load_after")}), flush=True)
    for way in ("one_after_the_other", "at_once"):
        r = result[way]
        print(f"{way}: {r['seconds']:.0f} s, {r['threads_per_run']} thread(s) per run, CPU busy "
              f"{100 * r['cpu_busy_share']:.1f}%, load before {r['load_before']}", flush=True)


if __name__ == "__main__":
    main()
