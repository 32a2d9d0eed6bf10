"""Dynamic batch loading: an endless stream of training sequences whose domains follow weights that
can change during training (LLM-Shearing, Xia et al. 2024, Sec. 2.2).

How a sample is chosen. Global batch `b` holds `G = batch_size * world_size` samples; rank `r` takes
samples `[r*B, (r+1)*B)` of it. Sample `j` of batch `b` gets its domain from a uniform draw seeded by
`(seed, b)` against the weights in effect at `b`. The `c`-th sample drawn from domain `d` is item
`perm(seed, d, c // n_d)[c % n_d]`: every pass over a domain is a fresh permutation, and there is
no limit on passes. So the batches depend only on the seed and the weights history, not on the
number of workers or where a run was resumed.

When a weight change takes effect. `set_weights(w, after_batch=n)` (called at an eval after `n`
batches) applies from global batch `n + num_workers * prefetch_factor`: the DataLoader may already
have handed out work up to that point, so that is the first batch every worker can still honour.
With `num_workers=0` it is batch `n`, the very next one. Weight changes reach the workers through a
shared-memory table, so the DataLoader is never restarted.

Resume. Composer calls `state_dict(num_samples, from_beginning)` when it checkpoints and
`load_state_dict` when it resumes. The state is O(number of domains): the batch index, how many
samples each domain has given so far, the weights in effect, and any change not yet in effect.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from llmshearing.data.mixing import check_weights
from llmshearing.errors import ConfigError
from llmshearing.data.layout import open_split, read_manifest

_DRAW_STREAM = 0x6D6978  # separates the domain draws' seeds from the permutations' seeds


class DomainMixture(IterableDataset):
    """Endless per-rank stream of {'input_ids', 'labels', 'domain', 'batch_index'} drawn from per-domain shards.
    `batch_index` (the global batch the sample belongs to) is the pruning step the model reads."""

    def __init__(self, root: str, split: str, domains: list[str], weights, *, batch_size: int, seed: int,
                 num_workers: int = 0, prefetch_factor: int = 2, max_updates: int = 65536):
        manifest = read_manifest(root)
        self.root, self.split, self.domains = root, split, list(domains)
        self.sizes = [int(manifest["domains"][d]["splits"][split]["sequences"]) for d in self.domains]
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.delay = int(num_workers) * int(prefetch_factor) if num_workers else 0
        k = len(self.domains)
        # Where this iteration starts: batch index, samples taken from each domain so far, weights.
        self._start = (0, np.zeros(k, dtype=np.int64), check_weights(weights, self.domains))
        # Shared-memory table of weight changes [effect_batch, w_1..w_k], read by the workers.
        self._changes = torch.zeros(max_updates, 1 + k, dtype=torch.float64).share_memory_()
        self._num_changes = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._replay = None  # (batch, counts) cursor for state_dict, advanced monotonically
        self._readers = None

    # -- the schedule ---------------------------------------------------------------------------
    def set_weights(self, weights, after_batch: int) -> int:
        """Use `weights` from batch `after_batch + delay` on; returns that batch index."""
        w = check_weights(weights, self.domains)
        n = int(self._num_changes[0])
        effect = int(after_batch) + self.delay
        if n and effect < self._changes[n - 1, 0]:
            raise ValueError(f"weight changes must come in batch order ({effect} < {int(self._changes[n - 1, 0])})")
        if n == len(self._changes):
            raise RuntimeError(f"more than {n} weight changes; raise max_updates")
        self._changes[n, 0], self._changes[n, 1:] = effect, torch.from_numpy(w)
        self._num_changes[0] = n + 1
        return effect

    def weights_at(self, batch: int) -> np.ndarray:
        n = int(self._num_changes[0])
        effects = self._changes[:n, 0].numpy()
        i = int(np.searchsorted(effects, batch, side="right")) - 1
        return self._changes[i, 1:].numpy().copy() if i >= 0 else self._start[2]

    @property
    def current_weights(self) -> np.ndarray:
        n = int(self._num_changes[0])
        return self._changes[n - 1, 1:].numpy().copy() if n else self._start[2].copy()

    # -- the draws ----------------------------------------------------------------------------------
    def _global_batch(self) -> int:
        from composer.utils import dist

        return self.batch_size * dist.get_world_size()

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

    def __iter__(self):
        from composer.utils import dist

        rank, G = dist.get_global_rank(), self._global_batch()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self._readers is None:
            self._readers = [open_split(self.root, d, self.split) for d in self.domains]
        batch, counts, _ = self._start
        counts, perms, k = counts.copy(), {}, 0
        lo, hi = rank * self.batch_size, (rank + 1) * self.batch_size
        while True:
            dom, position = self._advance(batch, counts, G)
            if k % workers == worker:  # the DataLoader takes batches from its workers in turn
                for d, c in zip(dom[lo:hi], position[lo:hi]):
                    ids = torch.from_numpy(np.asarray(self._readers[d][self._item(d, c, perms)]["tokens"], dtype=np.int64))
                    yield {"input_ids": ids, "labels": ids, "domain": torch.tensor(int(d)), "batch_index": torch.tensor(batch)}
            batch, k = batch + 1, k + 1

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
        n = int(self._num_changes[0])
        pending = [[int(r[0]), r[1:].tolist()] for r in self._changes[:n].numpy() if r[0] > batch]
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
        self._replay = None
        for effect, w in state["pending"]:
            n = int(self._num_changes[0])
            self._changes[n, 0], self._changes[n, 1:] = effect, torch.tensor(w, dtype=torch.float64)
            self._num_changes[0] = n + 1


