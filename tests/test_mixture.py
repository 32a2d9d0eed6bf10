"""Dynamic batch loading: the sampler, the weight schedule, resume, and the update rule."""
import json
import os

import numpy as np
import pytest
import torch

from llmshearing.errors import ConfigError
from llmshearing.data.layout import DomainSequences
from llmshearing.data.mixture import DomainMixture
from llmshearing.data.reweighting import check_weights, update_weights
from llmshearing.data.layout import FORMAT

SEQ = 4


def write_shards(root, sizes: dict[str, int], split="prune"):
    """Shards whose sequence i of domain d is [d, i, i, i]: every sample says where it came from."""
    from streaming import MDSWriter

    domains = {}
    for d, (name, n) in enumerate(sizes.items()):
        for s in (split, "eval"):
            with MDSWriter(out=os.path.join(root, name, s), columns={"tokens": f"ndarray:uint16:{SEQ}"}) as w:
                for i in range(n):
                    w.write({"tokens": np.array([d, i, i, i], dtype=np.uint16)})
        domains[name] = {"proportion": 1 / len(sizes),
                         "splits": {split: {"sequences": n, "tokens": n * SEQ}, "eval": {"sequences": n, "tokens": n * SEQ}}}
    manifest = {"format": FORMAT, "seq_len": SEQ, "dtype": "uint16", "domains": domains,
                "tokenizer": {"path": "none", "vocab_size": 100, "fingerprint": "x"}}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(root)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), {"a": 50, "b": 30, "c": 7})


def take(dataset, n_batches, workers=0, on_batch=None):
    """(domain, item) pairs of the first n batches, as the DataLoader hands them out."""
    out = []
    for i, batch in enumerate(dataset.loader(num_workers=workers, prefetch_factor=2)):
        ids = batch["input_ids"]
        assert torch.equal(batch["domain"], ids[:, 0])
        out.append([(int(r[0]), int(r[1])) for r in ids])
        if on_batch:
            on_batch(i + 1)
        if len(out) == n_batches:
            break
    return out


def mixture(shards, weights=(0.5, 0.3, 0.2), workers=0, batch_size=8, seed=3):
    return DomainMixture(shards, "prune", ["a", "b", "c"], list(weights), batch_size=batch_size, seed=seed,
                         num_workers=workers, prefetch_factor=2)


def test_domain_frequencies_follow_the_weights(shards):
    weights = np.array([0.5, 0.3, 0.2])
    batches = take(mixture(shards, weights, batch_size=16), 150)
    n = 150 * 16
    counts = np.bincount([d for b in batches for d, _ in b], minlength=3)
    sigma = np.sqrt(n * weights * (1 - weights))
    assert np.all(np.abs(counts - n * weights) < 4 * sigma), (counts, n * weights)


def test_same_seed_same_batches_any_worker_count(shards):
    ref = take(mixture(shards), 12)
    assert take(mixture(shards), 12) == ref
    assert take(mixture(shards, workers=2), 12, workers=2) == ref
    assert take(mixture(shards, seed=4), 12) != ref


def test_every_pass_is_a_fresh_permutation(shards):
    items = [i for b in take(mixture(shards, (0, 0, 1), batch_size=7), 6) for _, i in b]
    passes = [items[i:i + 7] for i in range(0, 42, 7)]
    assert all(sorted(p) == list(range(7)) for p in passes)  # domain c has 7 sequences
    assert len({tuple(p) for p in passes}) > 1


@pytest.mark.parametrize("workers", [0, 2])
def test_weight_change_takes_effect_at_the_next_batch(shards, workers):
    ds = mixture(shards, (0.5, 0.5, 0.0), workers=workers)
    change_after = 3
    effects = []

    def on_batch(done):
        if done == change_after:
            effects.append(ds.set_weights([0, 0, 1], after_batch=done))

    batches = take(ds, 12, workers, on_batch)
    assert effects == [change_after]  # batch 3 is the first one not yet consumed, whatever the prefetch
    for b, batch in enumerate(batches):
        domains = {d for d, _ in batch}
        assert domains == {2} if b >= change_after else 2 not in domains, (b, domains)


def test_workers_give_the_main_process_batches_through_weight_changes(shards):
    """With 2 workers (prefetch 2) a change made after batch n is in effect at batch n, and every batch equals
    a 0-worker run's with the same changes, including those the workers had already read."""
    changes = {3: [0.05, 0.05, 0.9], 4: [0.9, 0.05, 0.05], 9: [0.1, 0.8, 0.1]}

    def run(workers):
        ds = mixture(shards, workers=workers, batch_size=16)
        return take(ds, 20, workers, lambda done: done in changes and ds.set_weights(changes[done], after_batch=done))

    ref = run(0)
    assert run(2) == ref
    share = [np.bincount([d for d, _ in b], minlength=3) / 16 for b in ref]
    assert share[3][2] >= 0.6 and share[2][2] < 0.6  # domain c from batch 3 exactly
    assert share[4][0] >= 0.6 and share[3][0] < 0.6
    assert all(s[1] >= 0.5 for s in share[9:12]) and share[8][1] < 0.5
    assert ref != take(mixture(shards, batch_size=16), 20)


def test_a_weight_change_for_a_batch_already_handed_out_is_refused(shards):
    ds = mixture(shards)
    take(ds, 4)
    with pytest.raises(ValueError, match="already handed out"):
        ds.set_weights([0, 0, 1], after_batch=2)
    assert ds.set_weights([0, 0, 1], after_batch=6) == 6  # a later batch is fine (kept as pending)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_pass_gives_the_uninterrupted_batches(shards, workers):
    # (made after batch, applies from batch, weights); the one made after 6 is still pending at the checkpoint
    changes = {4: (4, [0.2, 0.2, 0.6]), 6: (7, [0.3, 0.3, 0.4]), 9: (9, [0.6, 0.3, 0.1])}

    def run(ds, start, n):
        return take(ds, n, workers, lambda done: start + done in changes and ds.set_weights(
            changes[start + done][1], after_batch=changes[start + done][0]))

    full = run(mixture(shards, workers=workers), 0, 16)
    first = mixture(shards, workers=workers)
    part1 = run(first, 0, 6)
    state = first.state_dict(num_samples=6 * 8, from_beginning=True)
    assert len(json.dumps(state)) < 400  # O(domains), not O(samples)
    resumed = mixture(shards, workers=workers, seed=99)  # the seed comes from the state
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert part1 + run(resumed, 6, 10) == full
    assert state["pending"] and any(d == 2 and i >= 0 for b in full for d, i in b)
    counts = np.bincount([d for b in full for d, _ in b], minlength=3)
    assert counts[2] > 7  # domain c (7 sequences) was passed over more than once


def test_ranks_split_each_global_batch(shards, monkeypatch):
    one = take(mixture(shards, batch_size=8), 5)
    parts = []
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        parts.append(take(mixture(shards, batch_size=4), 5))
    assert [a + b for a, b in zip(*parts)] == one


def test_resume_refuses_a_different_setup(shards):
    state = mixture(shards).state_dict(16)
    other = DomainMixture(shards, "prune", ["a", "b"], [0.5, 0.5], batch_size=8, seed=3)
    with pytest.raises(ConfigError, match="domains"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="global batch"):
        mixture(shards, batch_size=4).load_state_dict(state)


def test_update_rule_against_hand_computed_numbers():
    w, losses, ref = [0.5, 0.3, 0.2], [2.0, 3.0, 1.5], [1.8, 2.5, 1.6]
    # gaps 0.2, 0.5, max(-0.1, 0) = 0 -> 0.5 e^0.2 : 0.3 e^0.5 : 0.2 = 0.61070 : 0.49462 : 0.2 (sum 1.30532)
    new, gap = update_weights(w, losses, ref)
    np.testing.assert_allclose(gap, [0.2, 0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(new, [0.467856, 0.378924, 0.153219], atol=1e-6)
    smoothed, _ = update_weights(w, losses, ref, smoothing=0.1)  # 0.9 w' + 0.1 / 3
    np.testing.assert_allclose(smoothed, [0.454404, 0.374365, 0.171231], atol=1e-6)
    unclamped, gap = update_weights(w, losses, ref, eta=2.0, clamp_min=None)  # w e^(2 gap), gap_c = -0.1
    np.testing.assert_allclose(gap, [0.2, 0.5, -0.1], atol=1e-12)
    np.testing.assert_allclose(unclamped, [0.432377, 0.472705, 0.094917], atol=1e-6)
    same, _ = update_weights(w, [1.0, 1.0, 1.0], ref)  # every domain below its reference: no change
    np.testing.assert_allclose(same, w, atol=1e-12)


@pytest.mark.parametrize("weights, match", [
    ([0.5, 0.6, 0.1], "sum to 1"), ([0.5, 0.5], "3 domains"), ([1.2, -0.1, -0.1], "non-negative"),
    ({"a": 0.5, "b": 0.5}, "missing"), ({"a": 0.5, "b": 0.5, "c": 0.0, "z": 0.0}, "unknown"),
])
def test_bad_weights_are_refused(weights, match):
    with pytest.raises(ConfigError, match=match):
        check_weights(weights, ["a", "b", "c"])


def test_eval_sequences_are_the_split_in_order(shards):
    ds = DomainSequences(shards, "b", "eval", limit=5)
    assert len(ds) == 5 and [int(ds[i]["input_ids"][1]) for i in range(5)] == list(range(5))
