"""The on-disk layout of per-domain token shards: one home for reading it (writing: data_prep/shards.py).

    <root>/manifest.json                 what was built: tokenizer, seq_len, domains, splits, counts
    <root>/<domain>/<split>/index.json   mosaicml-streaming MDS shards, one column `tokens`
    <root>/<domain>/<split>/shard.*.mds  (ndarray of `seq_len` token ids, uint16 or uint32)

Splits: `eval` and `test` (held out at document level, disjoint from each other), `prune` and `continue` (training
data of the two stages, disjoint from each other and from the held-out splits). `eval` steers: the trainers' evals,
dynamic batch loading, the reference losses. `test` is read only for final numbers (`llmshearing eval`, the demo's and
reproduce's summaries), never by training, dynamic loading, reference losses or calibration (`refuse_test`), so
nothing is tuned on it. Shards are read with streaming's public `LocalDataset`
(random access, no shared memory), so any number of dataloader workers can read them; the same folder copied to
object storage is read through a per-node cache (llmshearing.data.remote).
"""
from __future__ import annotations

import json
import os

import numpy as np

from llmshearing.checks import load_structured
from llmshearing.data.index import MANIFEST, read_index
from llmshearing.data.remote import fetch_index, open_cached_split
from llmshearing.errors import ConfigError

FORMAT = "llmshearing-shards/1"
SPLITS = ("eval", "test", "prune", "continue")
TEST = "test"
REBUILD = "make shards (or python -m llmshearing.data_prep.shards ... --overwrite with the arguments it was built with)"
# Written by data_prep.shards into every folder it builds: the one proof that a folder is the builder's own output
# and may be replaced (a manifest alone is not: a shard cache holds a copy of one, and so may any folder it was
# copied into).
BUILT_MARKER = "llmshearing_shards.json"
# RedPajama-Data-1T's mixture (LLaMA's), the paper's default proportions for pruning and continued pretraining.
REDPAJAMA_PROPORTIONS = {
    "common_crawl": 0.67, "c4": 0.15, "github": 0.045, "book": 0.045,
    "wikipedia": 0.045, "arxiv": 0.025, "stackexchange": 0.02,
}


def split_dir(root: str, domain: str, split: str) -> str:
    return os.path.join(root, domain, split)


def read_manifest(root: str) -> dict:
    """The manifest of a shard folder, with a clear error when the folder is not one."""
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        hint = "run 'make shards' (or python -m llmshearing.data_prep.shards) to build it"
        raise ConfigError(f"no shards at '{root}' ({MANIFEST} missing); {hint}")
    manifest = load_structured(path, "shards")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ConfigError(f"'{path}' is not a {FORMAT} manifest (format={got!r}); rebuild the shards")
    check_manifest(manifest, path)
    return manifest


def built_here(root: str, manifest: dict | None) -> bool:
    """`root` is a shard folder made by data_prep.shards: it carries BUILT_MARKER, or (folders built before the
    marker existed) it holds nothing but its manifest and the domain folders that manifest names."""
    if os.path.isfile(os.path.join(root, BUILT_MARKER)):
        return True
    domains = manifest.get("domains") if isinstance(manifest, dict) else None
    if not isinstance(domains, dict):
        return False
    names = set(os.listdir(root)) - {MANIFEST}
    return names <= set(domains) and all(os.path.isdir(os.path.join(root, n)) for n in names)


def check_manifest(manifest: dict, path: str) -> None:
    """The fields every reader uses are there and of the right kind (a hand-edited or damaged manifest fails
    here, naming the field, instead of as a KeyError in a dataloader)."""
    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"'{path}': '{field}' is missing or not {what}; rebuild the shards")

    seq_len = manifest.get("seq_len")
    need(isinstance(seq_len, int) and seq_len >= 2, "seq_len", "an integer >= 2")
    tok = manifest.get("tokenizer")
    need(isinstance(tok, dict) and isinstance(tok.get("fingerprint"), str) and isinstance(tok.get("vocab_size"), int),
         "tokenizer", "a mapping with 'fingerprint' and 'vocab_size'")
    domains = manifest.get("domains")
    need(isinstance(domains, dict) and len(domains) > 0, "domains", "a non-empty mapping")
    for name, entry in domains.items():
        splits = entry.get("splits") if isinstance(entry, dict) else None
        need(isinstance(splits, dict), f"domains.{name}.splits", "a mapping of splits")
        for split, info in splits.items():
            n = info.get("sequences") if isinstance(info, dict) else None
            need(isinstance(n, int) and n >= 0, f"domains.{name}.splits.{split}.sequences", "an integer >= 0")


def refuse_test(split: str, who: str) -> None:
    """The `test` split holds the final numbers: `who` (training, dynamic loading, reference losses, calibration)
    must not read it, or those numbers would be tuned on their own test set."""
    if split == TEST:
        raise ConfigError(f"{who}: the '{TEST}' split is reserved for final numbers (llmshearing eval, the demo's and "
                          f"reproduce's summaries) and is never read by training, dynamic loading, reference losses or "
                          f"calibration; use 'eval' (held out, steers) or a training split (prune, continue)")


def check_domains(manifest: dict, root: str, domains: list[str], split: str, key: str = "data.domains",
                  remote: str | None = None) -> None:
    """Every named domain has a non-empty `split` in the shards. With a `remote` (root is then its cache) the
    split's index.json is fetched and the shard files are left for their first read (where their size and hash are
    checked)."""
    have = list(manifest["domains"])
    for name in domains:
        if name not in manifest["domains"]:
            raise ConfigError(f"{key}: domain '{name}' has no shards in '{root}' (it has: {', '.join(have)})")
        if split == TEST and TEST not in manifest["domains"][name]["splits"]:
            raise ConfigError(f"the shards in '{remote or root}' have no '{TEST}' split (built before it existed); "
                              f"rebuild them: {REBUILD}")
        n = manifest["domains"][name]["splits"].get(split, {}).get("sequences", 0)
        if n == 0:
            raise ConfigError(f"{key}: domain '{name}' has no '{split}' sequences in '{remote or root}'; rebuild with "
                              f"a larger budget")
        if remote:
            fetch_index(remote, root, name, split)
            if "://" not in remote:  # a plain path (NFS): its files can be checked now, like local shards
                check_shard_files(split_dir(remote, name, split))
        else:
            check_shard_files(split_dir(root, name, split))


def check_shard_files(path: str) -> None:
    """Every shard file the split's index.json names exists with the size it records (a stat each): a
    deleted or truncated shard stops a run at start, not hours in, inside a dataloader worker."""
    index = os.path.join(path, "index.json")
    for shard in read_index(path)["shards"]:
        data = shard.get("zip_data") or shard["raw_data"]
        file = os.path.join(path, data["basename"])
        if not os.path.exists(file) and shard.get("zip_data"):  # decompressed copies also do
            data, file = shard["raw_data"], os.path.join(path, shard["raw_data"]["basename"])
        if not os.path.exists(file):
            raise ConfigError(f"shard file '{file}' is missing (listed in {index}); restore it or rebuild the shards")
        if os.path.getsize(file) != data["bytes"]:
            raise ConfigError(f"shard file '{file}' is {os.path.getsize(file)} bytes but {index} says {data['bytes']}: "
                              f"truncated or overwritten; restore it or rebuild the shards")


def open_split(root: str, domain: str, split: str, remote: str | None = None):
    """Random-access dataset of one domain's split; item i is {'tokens': ndarray (seq_len,)}. With a `remote`,
    `root` is its cache and shard files are fetched on first use (llmshearing.data.remote)."""
    from streaming import LocalDataset  # heavy: streaming

    path = split_dir(root, domain, split)
    if not read_index(path)["shards"]:  # LocalDataset fails with an IndexError on an empty split
        raise ConfigError(f"'{path}' holds no sequences (a zero budget or proportion); rebuild the shards "
                          f"with a budget for it")
    if remote:
        return open_cached_split(remote, root, domain, split)
    return LocalDataset(local=path)


def tokens_of(sample: dict) -> np.ndarray:
    return np.asarray(sample["tokens"], dtype=np.int64)


class DomainSequences:
    """The first `limit` sequences of one domain's split, in order (the per-domain eval sets). A map-style dataset
    (len + getitem, all a DataLoader needs); torch is imported on first read, so the shard builder's worker
    processes, which import this module for its constants, start without it."""

    def __init__(self, root: str, domain: str, split: str = "eval", limit: int | None = None,
                 remote: str | None = None):
        self.root, self.domain, self.split, self.remote = root, domain, split, remote
        n = int(read_manifest(root)["domains"][domain]["splits"][split]["sequences"])
        self.length = n if limit is None else min(n, int(limit))
        self._reader = None

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if self._reader is None:
            self._reader = open_split(self.root, self.domain, self.split, self.remote)
        import torch  # heavy: torch

        ids = torch.from_numpy(np.asarray(self._reader[i]["tokens"], dtype=np.int64))
        return {"input_ids": ids, "labels": ids}


def check_positions(shards_root: str, config, model: str) -> None:
    """The shards' sequences fit the model's positions (longer ones would run it on positions it never had)."""
    seq_len, limit = int(read_manifest(shards_root).get("seq_len", 0)), getattr(config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise ConfigError(f"the shards in '{shards_root}' hold sequences of seq_len {seq_len} but the model '{model}' "
                          f"has max_position_embeddings {limit}; rebuild the shards with --seq-len {limit} or less")
