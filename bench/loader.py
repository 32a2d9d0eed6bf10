"""Loader throughput: DomainMixture (dynamic batch loading) vs a plain StreamingDataset over the same
shards, and vs what a training step consumes. A benchmark, not a test: numbers depend on the machine.

    python bench/loader.py                       # data/shards from `make shards`, 0 and 2 workers
    python bench/loader.py --shards DIR --batches 500 --batch-size 16 --model data/models/smollm2-135m
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from llmshearing.data.mixture import DomainMixture  # noqa: E402
from llmshearing.data.layout import read_manifest, split_dir  # noqa: E402


def tokens_per_s(loader, batches: int, warmup: int = 5) -> float:
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += next(it)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def mixture_loader(args, domains, weights, workers):
    ds = DomainMixture(args.shards, args.split, domains, weights, batch_size=args.batch_size, seed=0)
    return ds.loader(num_workers=workers, prefetch_factor=2)


def streaming_loader(args, domains, weights, workers, cache):
    from streaming import Stream, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    streams = [Stream(local=split_dir(args.shards, d, args.split), proportion=w) for d, w in zip(domains, weights)]
    ds = StreamingDataset(streams=streams, batch_size=args.batch_size, shuffle=True, shuffle_seed=0,
                          epoch_size=args.batch_size * (args.batches + 50), predownload=None)

    def collate(samples):
        return {"input_ids": torch.stack([torch.from_numpy(s["tokens"].astype("int64")) for s in samples])}

    return DataLoader(ds, batch_size=args.batch_size, num_workers=workers, collate_fn=collate,
                      **({"prefetch_factor": 2} if workers else {}))


def train_step_tokens_per_s(model_dir: str, batch: int, seq_len: int, steps: int = 3) -> float:
    from llmshearing.model.loading import from_pretrained

    lm = from_pretrained(model_dir, attn_impl="sdpa").train()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5)
    ids = torch.randint(0, lm.config.vocab_size, (batch, seq_len))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        logits = lm(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return batch * seq_len / (sum(times[1:]) / steps)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--split", default="prune")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--model", default=None, help="HF model dir: also time a training step (fwd+bwd+AdamW)")
    args = p.parse_args()
    manifest = read_manifest(args.shards)
    domains = list(manifest["domains"])
    weights = [1 / len(domains)] * len(domains)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}; shards {args.shards} "
          f"(seq_len {manifest['seq_len']}, {len(domains)} domains); batch {args.batch_size}, {args.batches} batches")
    rows = []
    cache = tempfile.mkdtemp()
    try:
        for workers in args.workers:
            ours = tokens_per_s(mixture_loader(args, domains, weights, workers), args.batches)
            plain = tokens_per_s(streaming_loader(args, domains, weights, workers, cache), args.batches)
            rows.append((workers, ours, plain))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print("| workers | DomainMixture tok/s | StreamingDataset tok/s | ratio |")
    print("|---|---|---|---|")
    for workers, ours, plain in rows:
        print(f"| {workers} | {ours:,.0f} | {plain:,.0f} | {ours / plain:.2f} |")
    if args.model:
        step = train_step_tokens_per_s(args.model, args.batch_size, manifest["seq_len"])
        print(f"training step (fwd+bwd+AdamW, fp32, {args.batch_size} x {manifest['seq_len']}): {step:,.0f} tok/s; "
              f"the slowest loader above is {min(min(r[1:]) for r in rows) / step:,.0f}x faster than training")


if __name__ == "__main__":
    main()
