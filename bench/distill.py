"""Training step time with distillation vs without: the same student, batch and optimizer, plus a frozen teacher
(a copy of the source, as `distill.teacher: source`) whose forward runs under no_grad, and the KD loss over the
whole vocabulary or the teacher's top-k. Both stages: the masked source (pruning) and the dense model (continued
pretraining, here the source itself).

    python -m bench.distill                    # SmolLM2-135M, CPU fp32, 2 x 256 tokens
    python -m bench.distill --quick            # tiny random model, seconds

A benchmark, not a test: numbers depend on the machine and on what else runs on it; variants run round-robin so
that load from other processes hits all alike, and ratios are also given per round.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time

import torch

from bench.throughput import (QUICK_TARGET, PeakMemory, cpu_busy, decoder_from_hf, load_source, log, machine_info,
                              sync)
from llmshearing.io import atomic_write_text
from llmshearing.pruning.shapes import PRESETS, shape_of


def variants(lm, target, top_k: int, seed: int) -> dict:
    """name -> ComposerLM: {prune, continue} x {plain, kd, kd_top<k>}; all share the student's weights."""
    from llmshearing.train.composer_model import ComposerLM
    from llmshearing.model.distill import Teacher
    from llmshearing.pruning.masks import L0Module

    teacher = copy.deepcopy(lm)
    l0 = L0Module(shape_of(lm.config), target, seed=seed).train()
    out = {}
    for stage, masks in (("prune", l0), ("continue", None)):
        out[f"{stage}/plain"] = ComposerLM(lm, masks)
        out[f"{stage}/kd"] = ComposerLM(lm, masks, Teacher(teacher, alpha=0.5))
        out[f"{stage}/kd_top{top_k}"] = ComposerLM(lm, masks, Teacher(teacher, alpha=0.5, top_k=top_k))
    return out


def step_times(models: dict, args) -> dict:
    """Seconds per fwd + bwd + AdamW step of every variant (median of `repeats` after `warmup`), round-robin."""
    vocab = next(iter(models.values())).model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    batch = {"input_ids": ids, "labels": ids}
    opts = {name: torch.optim.AdamW(m.param_groups(lr=1e-5, weight_decay=0.0, mask_lr=1.0, lambda_lr=1.0))
            for name, m in models.items()}
    times = {name: [] for name in models}
    peaks = {name: None for name in models}
    for it in range(args.warmup + args.repeats):
        for name, model in models.items():
            model.train()
            if model.l0 is not None:
                model.l0.step = it
            with PeakMemory("cpu") as mem:
                start = time.perf_counter()
                loss = model.loss(model(batch), batch)
                (loss["total"] if isinstance(loss, dict) else loss).backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                sync("cpu")
                elapsed = time.perf_counter() - start
            if it >= args.warmup:
                times[name].append(elapsed)
                if mem.bytes is not None:
                    peaks[name] = max(peaks[name] or 0, mem.bytes)
            log(f"{name:22s} {'rep' if it >= args.warmup else 'warmup'} {it + 1}: {elapsed:.3f} s")
    return {name: {"step_s": t, "step_s_median": statistics.median(t), "peak_extra_bytes": peaks[name]}
            for name, t in times.items()}


def ratios(result: dict) -> dict:
    """step time with distillation / without, per stage: of the medians and per round (median, min, max)."""
    out = {}
    for name, r in result.items():
        stage, kind = name.split("/")
        if kind == "plain":
            continue
        base = result[f"{stage}/plain"]
        rounds = [a / b for a, b in zip(r["step_s"], base["step_s"])]
        out[name] = {"of_medians": r["step_s_median"] / base["step_s_median"], "per_round_median": statistics.median(rounds),
                     "per_round_min": min(rounds), "per_round_max": max(rounds)}
    return out


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"Training step (fwd + bwd + AdamW), {s['batch']} x {s['seq']} tokens, fp32, median of {s['repeats']} "
             f"after {s['warmup']} warm-up; teacher = a copy of the source, alpha 0.5, T 1:", "",
             "| stage | variant | step s (median) | x plain (of medians) | x plain per round: median (range) | peak extra MB |",
             "|---|---|---|---|---|---|"]
    for name, r in res["steps"].items():
        stage, kind = name.split("/")
        q = res["ratios"].get(name)
        rel = "1" if q is None else f"{q['of_medians']:.2f}"
        per = "-" if q is None else f"{q['per_round_median']:.2f} ({q['per_round_min']:.2f}-{q['per_round_max']:.2f})"
        mb = "n/a" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:,.0f}"
        lines.append(f"| {stage} | {kind} | {r['step_s_median']:.3f} | {rel} | {per} | {mb} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny random model, few iterations (seconds)")
    p.add_argument("--model", default="data/models/smollm2-135m", help="HF source model directory")
    p.add_argument("--target", default="smollm2-135m-half", choices=sorted(PRESETS), help="the masks' target")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=None, help="default 256 (32 with --quick)")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 5, 2 with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output (default: runs/bench/distill[-quick].json)")
    args = p.parse_args(argv)
    args.seq = args.seq or (32 if args.quick else 256)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.dtype = "float32"
    if args.threads is None and args.quick:
        args.threads = 1  # as bench.throughput: a 64-wide model's ops are too small to split over 2 threads
    if args.threads:
        torch.set_num_threads(args.threads)
    out_path = args.out or os.path.join("runs", "bench", "distill-quick.json" if args.quick else "distill.json")
    started, load_before, busy_before = time.time(), os.getloadavg(), cpu_busy()
    if busy_before is not None and busy_before > 0.10:
        log(f"WARNING: the machine is busy ({busy_before:.0%} of its {os.cpu_count()} cores in use before the start, "
            f"load average {load_before[0]:.2f}): absolute times are inflated; the ratios less so (round-robin)")
    torch.manual_seed(args.seed)
    lm = decoder_from_hf(load_source(args)).train()
    target = QUICK_TARGET if args.quick else PRESETS[args.target]
    steps = step_times(variants(lm, target, args.top_k, args.seed), args)
    result = {
        "command": "python -m bench.distill " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info("cpu"), "loadavg_1m_before": load_before[0], "loadavg_1m_after": os.getloadavg()[0],
                    "cpu_busy_before": busy_before},
        "torch": torch.__version__,
        "settings": {k: getattr(args, k) for k in ("quick", "model", "target", "batch", "seq", "top_k", "warmup",
                                                   "repeats", "seed")},
        "steps": steps, "ratios": ratios(steps), "wall_s": None,
    }
    result["wall_s"] = time.time() - started
    print(markdown(result), flush=True)
    atomic_write_text(out_path, json.dumps(result, indent=1) + "\n")
    log(f"wrote {out_path} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
