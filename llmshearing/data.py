"""A simple per-domain text loader: raw text -> tokens -> fixed-length windows, eval held out per domain.

Documents are tokenized, joined with EOS into one stream per domain and cut into `seq_len` windows.
The last `eval_tokens` of each stream are held out for evaluation (so train and eval never share a
window). Used by the pruning stage and the demo; per-domain MDS shards come with dynamic loading.
"""
from __future__ import annotations

import json
import os

import torch
from torch.utils.data import Dataset

from llmshearing.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".md", ".rst", ".py", ".csv")


def read_documents(path: str):
    """Yield documents from a text file (one document), a jsonl file (`text` field per line), or a
    directory of such files (sorted, recursive)."""
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                if name.endswith(TEXT_SUFFIXES):
                    yield from read_documents(os.path.join(root, name))
        return
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError) as e:
                        raise ConfigError(f"{path}:{i + 1}: not a json object with a 'text' field ({e})") from None
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        yield f.read()


def tokenize_domain(path: str, tokenizer, max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` tokens of the domain's EOS-joined document stream."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token_id; documents cannot be separated")
    ids: list[int] = []
    for doc in read_documents(path):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


class TokenWindows(Dataset):
    """Fixed-length windows with the domain each came from; labels are the inputs (shifted in the loss)."""

    def __init__(self, windows: torch.Tensor, domain_ids: torch.Tensor, domains: list[str]):
        self.windows, self.domain_ids, self.domains = windows, domain_ids, domains

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}

    def of_domain(self, name: str) -> torch.Tensor:
        return self.windows[self.domain_ids == self.domains.index(name)]


def build_datasets(domains: dict[str, str], tokenizer, seq_len: int, eval_tokens: int,
                   max_train_tokens: int | None, vocab_size: int | None = None) -> tuple[TokenWindows, TokenWindows]:
    """(train, eval) windows over all domains."""
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has only {vocab_size} rows: "
            f"wrong tokenizer for this model (set model.tokenizer)"
        )
    eval_windows = max(1, eval_tokens // seq_len)
    budget = (max_train_tokens or 10**12) + eval_windows * seq_len
    train, evals = ([], []), ([], [])
    names = list(domains)
    for d, name in enumerate(names):
        stream = tokenize_domain(str(domains[name]), tokenizer, budget)
        n = len(stream) // seq_len
        if n < eval_windows + 1:
            raise ConfigError(
                f"data.domains.{name}: only {len(stream)} tokens, fewer than one training window plus "
                f"{eval_windows} eval windows of {seq_len}; add text or lower data.eval_tokens_per_domain"
            )
        windows = stream[: n * seq_len].view(n, seq_len)
        for (win, dom), part in ((train, windows[: n - eval_windows]), (evals, windows[n - eval_windows:])):
            win.append(part)
            dom.append(torch.full((len(part),), d))
    make = lambda pair: TokenWindows(torch.cat(pair[0]), torch.cat(pair[1]), names)  # noqa: E731
    return make(train), make(evals)


@torch.no_grad()
def perplexity(logits_fn, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Token perplexity of next-token prediction over `windows` (N, T); `logits_fn(ids) -> logits`."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i: i + batch_size]
        logits = logits_fn(ids)[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total, count = total + float(nll), count + ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))
