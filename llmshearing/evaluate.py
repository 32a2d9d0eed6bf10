"""Per-domain language-model loss on the shards' held-out split: the one place outside training that computes it.

`domain_losses` reads each domain's `eval` split (see `llmshearing.shards`) and returns the mean next-token
cross-entropy in nats per predicted token. The reference losses, the demo and any evaluation report use it,
so every number of the project about "loss on domain d" means the same thing.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from llmshearing.errors import ConfigError
from llmshearing.shards import check_domains, open_split, read_manifest, tokens_of


def _positive_int(value, key: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return int(value)


@torch.no_grad()
def domain_losses(logits_fn: Callable[[torch.Tensor], torch.Tensor], root: str, domains: list[str] | None = None,
                  split: str = "eval", max_sequences: int | None = None, batch_size: int = 4,
                  progress: bool = False) -> dict[str, float]:
    """Mean next-token cross-entropy (nats/token) per domain on `split` of the shards at `root`.

    `logits_fn(input_ids)` maps a LongTensor (B, T) to logits (B, T, V) (on any device). Every sequence
    contributes its T-1 predicted positions; the mean is over all of them (a token-weighted mean).
    `domains` defaults to all domains of the manifest, in its order; `max_sequences` takes the first N
    sequences of each domain (all when None).
    """
    manifest = read_manifest(root)
    domains = list(manifest["domains"]) if domains is None else list(domains)
    if not domains:
        raise ConfigError(f"domains: no domain to evaluate in '{root}'")
    check_domains(manifest, root, domains, split, key="domains")
    max_sequences = _positive_int(max_sequences, "max_sequences", allow_none=True)
    batch_size = _positive_int(batch_size, "batch_size")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(min(len(open_split(root, d, split)), max_sequences or 10**18) for d in domains)
        bar = tqdm(total=total, desc=f"loss on '{split}'", unit="seq")
    losses = {}
    try:
        for name in domains:
            dataset = open_split(root, name, split)
            n = len(dataset) if max_sequences is None else min(len(dataset), max_sequences)
            total, count = 0.0, 0
            for start in range(0, n, batch_size):
                ids = torch.from_numpy(np.stack([tokens_of(dataset[i]) for i in range(start, min(n, start + batch_size))]))
                if ids.shape[1] < 2:
                    raise ConfigError(f"shards of '{name}/{split}' in '{root}' hold sequences of {ids.shape[1]} "
                                      f"token(s); next-token loss needs at least 2")
                logits = logits_fn(ids)
                vocab = logits.shape[-1]
                if int(ids.max()) >= vocab:
                    raise ConfigError(f"domain '{name}' has token id {int(ids.max())} but the model predicts only "
                                      f"{vocab} tokens: the shards were built with another tokenizer; rebuild them "
                                      f"with the model's tokenizer")
                targets = ids[:, 1:].to(logits.device)
                nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), targets.reshape(-1), reduction="sum")
                total += float(nll.double())
                count += targets.numel()
                if bar is not None:
                    bar.update(len(ids))
            losses[name] = total / count
    finally:
        if bar is not None:
            bar.close()
    return losses


def perplexities(losses: Mapping[str, float]) -> dict[str, float]:
    """Token perplexity exp(loss) per domain (losses in nats/token)."""
    return {d: math.exp(v) for d, v in losses.items()}


def markdown_table(rows: Mapping[str, Mapping[str, float]], columns: list[str] | None = None, fmt: str = "{:.2f}",
                   label: str = "model", missing: str = "-") -> str:
    """A markdown table with one row per model (`rows` = model name -> {domain: value}).

    `columns` defaults to the domains in order of first appearance; a model without a value for a column
    shows `missing`. `fmt` formats every value.
    """
    if columns is None:
        columns = list(dict.fromkeys(d for per in rows.values() for d in per))
    lines = [f"| {label} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, per in rows.items():
        cells = [fmt.format(per[c]) if c in per and per[c] is not None else missing for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
