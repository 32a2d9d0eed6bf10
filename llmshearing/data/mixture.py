"""Dynamic batch loading: an endless stream of training sequences whose domains follow weights that
can change during training (LLM-Shearing, Xia et al. 2024, Sec. 2.2).

How a sample is chosen. Global batch `b` holds `G = batch_size * world_size` samples; rank `r` takes
samples `[r*B, (r+1)*B)` of it. Sample `j` of batch `b` gets its domain from a uniform draw seeded by
`(seed, b)` against the weights in effect at `b`. The `c`-th sample drawn from domain `d` is item
`perm(seed, d, c // n_d)[c % n_d]`: every pass over a domain is a fresh permutation, and there is
no limit on passes. So the batches depend only on the seed and the weights history, not on the
number of workers or where a run was resumed.

When a weight change takes effect. `set_weights(w, after_batch=n)` (called at an eval after `n`
batches) applies from global batch `n`, the first one not yet consumed, whatever `num_workers` is.
The DataLoader's workers still do the reading, but what they produce is only a prediction: each
worker runs the draws below with the weights it sees in a shared-memory table of changes and
tags every sample with its (batch, domain, position `c`). `MixtureLoader`, the DataLoader to
train from, redraws every batch in the main process as it is consumed, with the weights in effect
then, and reads itself the (few) samples whose (domain, c) the workers got wrong: those of the
`num_workers * prefetch_factor` batches already prefetched when a change came. Each change is
stored with the per-domain counts at its batch, so a worker that drew past it starts again from
there and its later predictions are right. The DataLoader is never restarted, and the batches are
the same for any number of workers.

Resume. Composer calls `state_dict(num_samples, from_beginning)` when it checkpoints and
`load_state_dict` when it resumes. The state is O(number of domains): the batch index, how many
samples each domain has given so far, the weights in effect, and any change not yet in effect
(one set for a later batch than the next).
"""
from __future__ import annotations

import os

import numpy as np
import torch
# At import time, not inside the draws: composer's first import stores a traceback whose frames would keep
# MixtureLoader's iterator (and so the DataLoader's workers) alive after a loop over it ends.
from composer.utils import dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from llmshearing.data.reweighting import check_weights
from llmshearing.errors import ConfigError
from llmshearing.data.layout import open_split, read_manifest, refuse_test

_DRAW_STREAM = 0x6D6978  # separates the domain draws' seeds from the permutations' seeds


class DomainMixture(IterableDataset):
    """Endless per-rank stream of {'input_ids', 'labels', 'domain', 'batch_index'} drawn from per-domain shards.
    `batch_index` (the global batch the sample belongs to) is the pruning step the model reads. Iterate it
    through `MixtureLoader` (`self.loader(...)`): that is what makes weight changes exact with workers.
    `num_workers` and `prefetch_factor` are accepted for compatibility; they no longer change anything."""

    def __init__(self, root: str, split: str, domains: list[str], weights, *, batch_size: int, seed: int,
                 num_workers: int = 0, prefetch_factor: int = 2, max_updates: int = 65536, remote: str | None = None):
        refuse_test(split, "training data")
        manifest = read_manifest(root)  # with a `remote`, root is its cache (llmshearing.data.remote)
        self.root, self.split, self.domains, self.remote = root, split, list(domains), remote
        self.sizes = [int(manifest["domains"][d]["splits"][split]["sequences"]) for d in self.domains]
        self.batch_size, self.seed = int(batch_size), int(seed)
        k = len(self.domains)
        # Where this iteration starts: batch index, samples taken from each domain so far, weights.
        self._start = (0, np.zeros(k, dtype=np.int64), check_weights(weights, self.domains))
        # Shared-memory table of weight changes [effect_batch, w_1..w_k, counts_1..counts_k] (the counts:
        # samples taken from each domain before the effect batch), read by the workers.
        self._changes = torch.zeros(max_updates, 1 + 2 * k, dtype=torch.float64).share_memory_()
        self._num_changes = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._replay = None  # (batch, counts) cursor for state_dict and set_weights, advanced monotonically
        self._consumed = None  # the next batch MixtureLoader hands out (main process), None before it starts
        self._readers, self._readers_pid = None, None

    def __getstate__(self) -> dict:  # readers are per process
        return {**self.__dict__, "_readers": None, "_readers_pid": None}

    # -- the schedule ---------------------------------------------------------------------------
    def set_weights(self, weights, after_batch: int) -> int:
        """Use `weights` from batch `after_batch` on (the first batch not yet consumed after `after_batch`
        batches); returns that batch index."""
        w = check_weights(weights, self.domains)
        n = int(self._num_changes[0])
        effect = int(after_batch)
        k = len(self.domains)
        if n and effect < self._changes[n - 1, 0]:
            raise ValueError(f"weight changes must come in batch order ({effect} < {int(self._changes[n - 1, 0])})")
        if effect < self._start[0] or (self._consumed is not None and effect < self._consumed):
            raise ValueError(f"batch {effect} was already handed out; a weight change can apply from batch "
                             f"{max(self._start[0], self._consumed or 0)} on")
        if n == len(self._changes):
            raise RuntimeError(f"more than {n} weight changes; raise max_updates")
        if self._replay is not None and self._replay[0] > effect:
            self._replay = None
        counts = self._counts_at(effect)
        self._changes[n, 0], self._changes[n, 1:1 + k] = effect, torch.from_numpy(w)
        self._changes[n, 1 + k:] = torch.from_numpy(counts.astype(np.float64))
        self._num_changes[0] = n + 1  # last: a worker that sees the new count sees the whole row
        return effect

    def weights_at(self, batch: int) -> np.ndarray:
        n, k = int(self._num_changes[0]), len(self.domains)
        effects = self._changes[:n, 0].numpy()
        i = int(np.searchsorted(effects, batch, side="right")) - 1
        return self._changes[i, 1:1 + k].numpy().copy() if i >= 0 else self._start[2]

    @property
    def current_weights(self) -> np.ndarray:
        n, k = int(self._num_changes[0]), len(self.domains)
        return self._changes[n - 1, 1:1 + k].numpy().copy() if n else self._start[2].copy()

    # -- the draws ----------------------------------------------------------------------------------
    def _global_batch(self) -> int:
        return self.batch_size * dist.get_world_size()

    def _rank_slice(self) -> slice:
        rank = dist.get_global_rank()
        return slice(rank * self.batch_size, (rank + 1) * self.batch_size)

    def domains_of_batch(self, batch: int, global_batch: int) -> np.ndarray:
        """Domain index of every sample of global batch `batch`."""
        u = np.random.default_rng([self.seed, _DRAW_STREAM, batch]).random(global_batch)
        cdf = np.cumsum(self.weights_at(batch))
        return np.minimum(np.searchsorted(cdf / cdf[-1], u, side="right"), len(self.domains) - 1)

    def _advance(self, batch: int, counts: np.ndarray, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain, index within the domain's sample sequence) of each sample of `batch`; updates counts."""
        dom = self.domains_of_batch(batch, global_batch)
        position = np.empty(global_batch, dtype=np.int64)
        for d in np.unique(dom):
            at = np.flatnonzero(dom == d)
            position[at] = counts[d] + np.arange(len(at))
            counts[d] += len(at)
        return dom, position

    def _item(self, d: int, c: int, perms: dict) -> int:
        n = self.sizes[d]
        p = c // n
        if perms.get(d, (None,))[0] != p:
            perms[d] = (p, np.random.default_rng([self.seed, d, p]).permutation(n))
        return int(perms[d][1][c % n])

    def _tokens(self, d: int, c: int, perms: dict) -> torch.Tensor:
        if self._readers is None or self._readers_pid != os.getpid():  # each process opens its own
            self._readers = [open_split(self.root, name, self.split, self.remote) for name in self.domains]
            self._readers_pid = os.getpid()
        item = self._readers[d][self._item(d, c, perms)]["tokens"]
        return torch.from_numpy(np.asarray(item, dtype=np.int64))

    def _resync(self, batch: int, counts: np.ndarray, first: int, n: int, global_batch: int) -> np.ndarray:
        """Counts before `batch` once changes `first..n-1` have appeared: if the earliest of them applies from a
        batch already drawn, start again from the counts stored with it."""
        k = len(self.domains)
        row = self._changes[first].numpy()  # changes come in batch order: the earliest
        effect = int(row[0])
        if effect >= batch:
            return counts
        counts = row[1 + k:].astype(np.int64)
        for b in range(effect, batch):
            self._advance(b, counts, global_batch)
        return counts

    def __iter__(self):
        G, mine = self._global_batch(), self._rank_slice()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batch, counts, _ = self._start
        counts, perms, k = counts.copy(), {}, 0
        seen = int(self._num_changes[0])
        while True:
            n = int(self._num_changes[0])
            if n != seen:
                counts, seen = self._resync(batch, counts, seen, n, G), n
            dom, position = self._advance(batch, counts, G)
            if k % workers == worker:  # the DataLoader takes batches from its workers in turn
                for d, c in zip(dom[mine], position[mine]):
                    ids = self._tokens(int(d), int(c), perms)
                    yield {"input_ids": ids, "labels": ids, "domain": torch.tensor(int(d)),
                           "batch_index": torch.tensor(batch), "position": torch.tensor(int(c))}
            batch, k = batch + 1, k + 1

    def _consume(self, batches):
        """The batches as they are consumed (main process): redraw each with the weights in effect now and read
        the samples the workers predicted wrongly."""
        G, mine = self._global_batch(), self._rank_slice()
        batch, counts, _ = self._start
        counts, perms = counts.copy(), {}
        self._consumed = batch
        for got in batches:
            dom, position = self._advance(batch, counts, G)
            dom, position = dom[mine], position[mine]
            predicted = got.pop("position")
            if not bool((got["batch_index"] == batch).all()):
                raise RuntimeError(f"the DataLoader handed out batch {got['batch_index'].tolist()} for batch {batch}")
            for j in np.flatnonzero((got["domain"].numpy() != dom) | (predicted.numpy() != position)):
                ids = self._tokens(int(dom[j]), int(position[j]), perms)
                got["input_ids"][j], got["labels"][j], got["domain"][j] = ids, ids, int(dom[j])
            batch += 1
            self._consumed = batch
            yield got

    def loader(self, num_workers: int = 0, prefetch_factor: int | None = 2, **kwargs) -> "MixtureLoader":
        """The DataLoader to train from (one batch of `batch_size` per step)."""
        return MixtureLoader(self, num_workers=num_workers,
                             prefetch_factor=prefetch_factor if num_workers else None, **kwargs)

    # -- Composer's dataset resumption hooks ------------------------------------------------------------
    def _counts_at(self, batch: int) -> np.ndarray:
        G = self._global_batch()
        if self._replay is None or self._replay[0] > batch:
            self._replay = (self._start[0], self._start[1].copy())
        b, counts = self._replay
        while b < batch:
            self._advance(b, counts, G)
            b += 1
        self._replay = (b, counts)
        return counts.copy()

    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict:
        G = self._global_batch()
        if num_samples % G:
            raise ValueError(f"{num_samples} samples is not a whole number of global batches of {G}")
        batch = num_samples // G
        n, k = int(self._num_changes[0]), len(self.domains)
        pending = [[int(r[0]), r[1:1 + k].tolist()] for r in self._changes[:n].numpy() if r[0] > batch]
        return {"domains": self.domains, "seed": self.seed, "global_batch": G, "batch": batch,
                "counts": self._counts_at(batch).tolist(), "weights": self.weights_at(batch).tolist(),
                "pending": pending}

    def load_state_dict(self, state: dict) -> None:
        if state["domains"] != self.domains:
            raise ConfigError(f"the checkpoint's data domains {state['domains']} differ from this run's {self.domains}")
        if state["global_batch"] != self._global_batch():
            raise ConfigError(f"the checkpoint was written with a global batch of {state['global_batch']} "
                              f"samples, this run has {self._global_batch()}; resume with the same batch size")
        self.seed = int(state["seed"])
        self._start = (int(state["batch"]), np.asarray(state["counts"], dtype=np.int64),
                       np.asarray(state["weights"], dtype=np.float64))
        self._num_changes[0] = 0
        self._replay, self._consumed = None, None
        for effect, w in state["pending"]:
            self.set_weights(w, after_batch=effect)


class MixtureLoader(DataLoader):
    """A DataLoader over a `DomainMixture` (its `dataset`, as Composer and DynamicLoading expect) whose
    batches follow the weights in effect when each batch is consumed, whatever `num_workers` is."""

    def __init__(self, dataset: DomainMixture, **kwargs):
        if not isinstance(dataset, DomainMixture):
            raise TypeError("MixtureLoader reads a DomainMixture")
        super().__init__(dataset, batch_size=dataset.batch_size, **kwargs)

    def __iter__(self):
        return self.dataset._consume(super().__iter__())
