"""Where the masked training step spends its extra time and memory: a torch.profiler table of the masked
step minus the dense step of the same model, by operator (self time, forward + backward + AdamW).

    python -m bench.profile_masked                              # SmolLM2-135M (make fetch), CPU fp32, 2 x 256
    python -m bench.profile_masked --quick                      # tiny random model, seconds
    python -m bench.profile_masked --device cuda --dtype bfloat16

A benchmark, not a test: it records the load average and thread count beside the table, since contention
changes the split. The masks are applied where the model applies them (llmshearing/model/decoder.py).
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench.throughput import QUICK_TARGET, decoder_from_hf, load_source, log, machine_info, sync
from llmshearing.devices import DTYPES
from llmshearing.pruning.shapes import PRESETS


def step(model, opt, batch, device, dtype):
    with torch.autocast(device_type=device, dtype=DTYPES[dtype], enabled=dtype != "float32"):
        out = model(batch)
        loss = model.loss(out, batch)
    (loss["total"] if isinstance(loss, dict) else loss).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)


def op_times(model, opt, batch, device, dtype, steps: int) -> dict:
    """operator -> self time (us) per step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(model, opt, batch, device, dtype)
    table = defaultdict(float)
    for e in prof.key_averages():
        t = e.self_device_time_total if device == "cuda" else e.self_cpu_time_total
        table[e.key] += t / steps
    return dict(table)


def saved_for_backward(model, batch, device, dtype) -> int:
    """Bytes autograd keeps for backward after forward + loss (unique storages, parameters excluded): the
    activation memory of a step, exact and independent of the allocator (unlike peak RSS)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device_type=device, dtype=DTYPES[dtype], enabled=dtype != "float32"):
            out = model(batch)
            loss = model.loss(out, batch)
    del out, loss
    return sum(seen.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="data/models/smollm2-135m")
    p.add_argument("--target", default="smollm2-135m-half")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", help="write the tables as JSON")
    args = p.parse_args(argv)
    args.gguf_file, args.train_repeats, args.warmup = None, 1, 1
    from llmshearing.train.composer_model import ComposerLM
    from llmshearing.pruning.masks import L0Module
    from llmshearing.pruning.shapes import shape_of

    lm = decoder_from_hf(load_source(args)).to(args.device).train()
    target = QUICK_TARGET if args.quick else PRESETS[args.target]
    l0 = L0Module(shape_of(lm.config), target, seed=args.seed).to(args.device).train()
    ids = torch.randint(0, lm.config.vocab_size, (args.train_batch, args.train_seq), device=args.device,
                        generator=torch.Generator(device=args.device).manual_seed(args.seed))
    batch = {"input_ids": ids, "labels": ids}
    tables, saved = {}, {}
    for name, model in (("dense", ComposerLM(lm, None)), ("masked", ComposerLM(lm, l0))):
        saved[name] = saved_for_backward(model, batch, args.device, args.dtype)
        opt = torch.optim.AdamW(model.param_groups(1e-4, 0.0, 1.0, 1.0))
        step(model, opt, batch, args.device, args.dtype)  # warm-up
        tables[name] = op_times(model, opt, batch, args.device, args.dtype, args.steps)
        log(f"{name}: {sum(tables[name].values()) / 1e3:.1f} ms of operator self time per step")
    ops = set(tables["dense"]) | set(tables["masked"])
    diff = sorted(((tables["masked"].get(o, 0.0) - tables["dense"].get(o, 0.0), o) for o in ops), reverse=True)
    total = {k: sum(v.values()) for k, v in tables.items()}
    lines = ["| operator | dense ms | masked ms | extra ms |", "|---|---:|---:|---:|"]
    for extra, op in diff[: args.top]:
        lines.append(f"| `{op}` | {tables['dense'].get(op, 0) / 1e3:.2f} | {tables['masked'].get(op, 0) / 1e3:.2f} | "
                     f"{extra / 1e3:+.2f} |")
    lines.append(f"| **all operators** | {total['dense'] / 1e3:.1f} | {total['masked'] / 1e3:.1f} | "
                 f"{(total['masked'] - total['dense']) / 1e3:+.1f} |")
    lines.append(f"\nsaved for backward: dense {saved['dense'] / 2**20:.1f} MB, masked {saved['masked'] / 2**20:.1f} MB "
                 f"(x{saved['masked'] / saved['dense']:.3f})")
    info = {**machine_info(args.device), "loadavg_start": os.getloadavg(), "threads": torch.get_num_threads()}
    print("\n".join(lines))
    print(json.dumps({k: info[k] for k in ("loadavg_start", "threads")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": info, "settings": vars(args), "tables_us_per_step": tables,
                       "saved_for_backward_bytes": saved}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
