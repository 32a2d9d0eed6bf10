"""Shards read from a remote (here a local folder, the same code path as s3:// through streaming's downloader)
through a per-node cache: the same samples as local shards, each file fetched on first use and once per node
under concurrent processes, damaged copies refused, bad remotes clear errors at start, and training from a remote
equal to training from local shards, across SIGKILL + autoresume and with two ranks."""
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import BIN, REPO, TINY_YAML, jsonl, paths, run, weights_log
from test_reliability import assert_same_weights, popen, wait_for_lines

from llmshearing.data_prep.shards import build_shards
from llmshearing.data.layout import check_domains, open_split, read_manifest
from llmshearing.data.remote import DOWNLOADS, prepare_cache
from llmshearing.errors import ConfigError
from llmshearing.train.config import load_config

SPLITS = ("eval", "test", "prune", "continue")


@pytest.fixture(scope="module")
def remote(tiny_setup, tmp_path_factory):
    """The tiny shards built with 2 KB shard files (about 16 per split), so that a split spans many files."""
    out = str(tmp_path_factory.mktemp("remote") / "shards")
    build_shards(out, tiny_setup["model"], {d: [tiny_setup[d]] for d in ("prose", "code")},
                 seq_len=64, eval_sequences=4, prune_tokens=16384, continue_tokens=16384, shard_size=2048,
                 progress=False)
    return out


def downloads(cache):
    path = os.path.join(cache, DOWNLOADS)
    return [r["file"] for r in jsonl(path)] if os.path.exists(path) else []


def shard_files(cache, domain, split):
    return sorted(n for n in os.listdir(os.path.join(cache, domain, split)) if n.endswith(".mds"))


def test_reads_equal_local_shards_and_fetch_each_file_on_first_use(remote, tmp_path):
    cache = str(tmp_path / "cache")
    prepare_cache(remote, cache)
    manifest = read_manifest(cache)
    for split in SPLITS:
        check_domains(manifest, cache, ["prose", "code"], split, remote=remote)
    assert downloads(cache) == ["manifest.json"] + [os.path.join(d, s, "index.json") for s in SPLITS
                                                    for d in ("prose", "code")]
    assert shard_files(cache, "prose", "prune") == []  # nothing but the indexes before the first read

    cached, local = open_split(cache, "prose", "prune", remote), open_split(remote, "prose", "prune")
    assert len(local.shards) >= 8
    last = len(local) - 1
    np.testing.assert_array_equal(cached[last]["tokens"], local[last]["tokens"])
    assert shard_files(cache, "prose", "prune") == [local.shards[-1].file_pairs[0][0].basename]
    for i in range(len(local)):
        np.testing.assert_array_equal(cached[i]["tokens"], local[i]["tokens"])
    assert shard_files(cache, "prose", "prune") == sorted(n for n in os.listdir(os.path.join(remote, "prose", "prune"))
                                                          if n.endswith(".mds"))
    files = downloads(cache)
    assert len(files) == len(set(files))  # every file fetched once


READER = """
import os, random, sys, time
from llmshearing.data.layout import open_split
remote, cache, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
jobs = [(d, s, i) for d in ("prose", "code") for s in ("eval", "test", "prune", "continue")
        for i in range(len(open_split(remote, d, s)))]
random.Random(seed).shuffle(jobs)
open(f"{cache}.ready{seed}", "w").close()
while not os.path.exists(f"{cache}.go"):  # start together, imports done
    time.sleep(0.01)
readers, out = {}, []
for d, s, i in jobs:
    r = readers.get((d, s)) or readers.setdefault((d, s), open_split(cache, d, s, remote))
    out.append(f"{d}/{s}/{i}:{r[i]['tokens'].tobytes().hex()}")
print("\\n".join(sorted(out)))
"""


def test_a_cache_another_rank_is_setting_up_is_not_called_foreign(remote, tmp_path):
    """Every rank prepares the cache at once: while the first holds the lock and fetches, the folder holds .locks and
    streaming's manifest.json.tmp; a rank arriving then waits for the lock (and finds the cache made) rather than
    calling the folder foreign. A folder with the same file but no .locks is foreign."""
    import threading

    from llmshearing.data.remote import MARKER, _locked

    cache = str(tmp_path / "cache")
    errors = []
    with _locked(cache, MARKER):  # the first rank, mid-fetch
        with open(os.path.join(cache, "manifest.json.tmp"), "w") as f:
            f.write("{")
        other = threading.Thread(target=lambda: errors.append(_try(prepare_cache, remote, cache)))
        other.start()
        other.join(timeout=1.0)
        assert other.is_alive() and not errors  # waiting for the lock, not refused
        os.remove(os.path.join(cache, "manifest.json.tmp"))
        shutil.copy(os.path.join(remote, "manifest.json"), os.path.join(cache, "manifest.json"))
        with open(os.path.join(cache, MARKER), "w") as f:
            json.dump({"remote": remote}, f)
    other.join(timeout=60)
    assert errors == [None]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json.tmp").write_text("{")
    with pytest.raises(ConfigError, match="not a shard cache"):
        prepare_cache(remote, str(foreign))


def _try(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the test reports what the thread raised
        return e
    return None


def test_concurrent_processes_fetch_each_file_once_and_read_the_same(remote, tmp_path):
    """Four processes (like 2 ranks x 2 dataloader workers of a node) read every sample in different orders
    into one cold cache: each shard file is downloaded once and every process reads what local shards hold."""
    cache = str(tmp_path / "cache")
    prepare_cache(remote, cache)
    for d in ("prose", "code"):
        for s in SPLITS:
            check_domains(read_manifest(cache), cache, [d], s, remote=remote)
    procs = [subprocess.Popen([sys.executable, "-c", READER, remote, cache, str(seed)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for seed in range(4)]
    deadline = time.time() + 240
    while not all(os.path.exists(f"{cache}.ready{i}") for i in range(4)) and time.time() < deadline:
        time.sleep(0.05)
    open(f"{cache}.go", "w").close()
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    local = subprocess.run([sys.executable, "-c", READER.replace("open_split(cache, d, s, remote)",
                                                                 "open_split(remote, d, s)"), remote, cache, "0"],
                           cwd=REPO, text=True, capture_output=True, timeout=240)
    assert all(out == local.stdout for out, _ in outs)
    shards = [f for f in downloads(cache) if f.endswith(".mds")]
    expected = [os.path.join(d, s, n) for d in ("prose", "code") for s in SPLITS for n in shard_files(remote, d, s)]
    assert sorted(shards) == sorted(expected)  # every shard file exactly once
    assert len({r["pid"] for r in jsonl(os.path.join(cache, DOWNLOADS)) if r["file"].endswith(".mds")}) > 1


def test_damaged_copies_are_fetched_again_or_refused(remote, tmp_path):
    cache = str(tmp_path / "cache")
    prepare_cache(remote, cache)
    check_domains(read_manifest(cache), cache, ["code"], "eval", remote=remote)
    reader = open_split(cache, "code", "eval", remote)
    want = reader[0]["tokens"].copy()
    name = shard_files(cache, "code", "eval")[0]
    with open(os.path.join(cache, "code", "eval", name), "r+b") as f:
        f.truncate(10)  # a torn copy (say the node died mid-copy): fetched again by the next reader
    np.testing.assert_array_equal(open_split(cache, "code", "eval", remote)[0]["tokens"], want)

    damaged = str(tmp_path / "damaged")
    shutil.copytree(remote, damaged)
    shard = os.path.join(damaged, "prose", "prune", "shard.00001.mds")
    data = bytearray(open(shard, "rb").read())
    data[-1] ^= 0xFF  # same size, different bytes: only the index's xxh64 can tell
    open(shard, "wb").write(bytes(data))
    os.remove(os.path.join(damaged, "prose", "prune", "shard.00002.mds"))
    cold = str(tmp_path / "cold")
    prepare_cache(damaged, cold)
    with pytest.raises(ConfigError, match="shard.00002.mds' is missing"):  # a folder remote is checked at start
        check_domains(read_manifest(cold), cold, ["prose"], "prune", remote=damaged)
    reader = open_split(cold, "prose", "prune", damaged)
    first_of = np.cumsum([0] + [s.samples for s in reader.shards])
    with pytest.raises(ConfigError, match="shard.00001.mds' failed its hash check"):
        reader[int(first_of[1])]
    assert "shard.00001.mds" not in shard_files(cold, "prose", "prune")  # the bad copy is not kept
    with pytest.raises(ConfigError, match="cannot fetch shard .*shard.00002.mds"):  # an s3:// one on first read
        reader[int(first_of[2])]


def remote_args(tiny_setup, folder, remote, cache):
    return [a for a in paths(tiny_setup, folder) if not a.startswith("data.shards=")] + [
        "data.shards=null", f"data.remote={remote}", f"data.local={cache}"]


def test_bad_remotes_are_clear_errors_at_start(tiny_setup, remote, tmp_path):
    def load(*extra):
        return load_config(TINY_YAML, [*paths(tiny_setup, str(tmp_path / "run")), *extra])

    cache = str(tmp_path / "cache")
    cases = [
        (["data.shards=null", f"data.remote={tmp_path}/nowhere", f"data.local={cache}"], "is not a folder"),
        (["data.shards=null", "data.remote=foo://bucket/shards", f"data.local={cache}"], "cannot fetch 'foo://"),
        ([f"data.remote={remote}", f"data.local={cache}"], "not both"),
        (["data.shards=null", f"data.remote={remote}"], "needs data.local"),
        ([f"data.local={cache}"], "data.remote, which is not set"),
        (["data.shards=null", f"data.remote={remote}", f"data.local={remote}"], "data.local is data.remote"),
        (["data.shards=null", f"data.remote={tmp_path}", f"data.local={cache}"], "cannot fetch .*manifest.json"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load(*overrides)
        assert not os.path.exists(os.path.join(cache, "llmshearing_cache.json"))  # no failed start claims the cache
    assert load("data.shards=null", f"data.remote={remote}", f"data.local={cache}").data.root == cache

    other = str(tmp_path / "other")
    shutil.copytree(remote, other)
    with pytest.raises(ConfigError, match="cache of another remote"):
        load("data.shards=null", f"data.remote={other}", f"data.local={cache}")
    manifest = json.load(open(os.path.join(remote, "manifest.json")))
    manifest["note"] = "rebuilt"
    with open(os.path.join(other, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    load("data.shards=null", f"data.remote={other}", f"data.local={tmp_path}/cache2")
    shutil.copy(os.path.join(remote, "manifest.json"), os.path.join(other, "manifest.json"))
    with pytest.raises(ConfigError, match="changed since the cache"):
        load("data.shards=null", f"data.remote={other}", f"data.local={tmp_path}/cache2")

    proc = run([sys.executable, "train.py", TINY_YAML, *remote_args(tiny_setup, str(tmp_path / "r"),
                                                                    f"{tmp_path}/gone", cache)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.remote" in proc.stderr and not os.path.exists(tmp_path / "r")


@pytest.mark.slow
def test_training_from_a_remote_equals_local_shards_across_sigkill_and_two_ranks(tiny_setup, remote, tmp_path):
    """One process from local shards; the same from the remote (2 dataloader workers sharing the cold cache),
    SIGKILLed mid-run, its cache deleted, then resumed: bit-identical. Two ranks from the remote into one cache:
    the same domain weights as one rank from local shards, every shard file fetched once."""
    common = ["max_duration=20ba", "save_interval=5ba", "autoresume=true", "export_dir=null", "device=cpu",
              "device_train_microbatch_size=2"]
    base, killed, two = (str(tmp_path / n) for n in ("base", "killed", "two"))
    local_args = [a if not a.startswith("data.shards=") else f"data.shards={remote}" for a in paths(tiny_setup, base)]
    proc = run([sys.executable, "train.py", TINY_YAML, *local_args, *common])
    assert proc.returncode == 0, proc.stderr[-3000:]

    cache = str(tmp_path / "cache")
    victim = popen([sys.executable, "train.py", TINY_YAML, *remote_args(tiny_setup, killed, remote, cache), *common])
    wait_for_lines(os.path.join(killed, "pruning_log.jsonl"), 13, victim)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    shutil.rmtree(cache)  # the resumed run starts from a cold cache (a new node)
    proc = run([sys.executable, "train.py", TINY_YAML, *remote_args(tiny_setup, killed, remote, cache), *common])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(os.path.join(base, "ep0-ba20-rank0.pt"), os.path.join(killed, "ep0-ba20-rank0.pt"))
    assert jsonl(os.path.join(killed, "pruning_log.jsonl")) == jsonl(os.path.join(base, "pruning_log.jsonl"))
    assert weights_log(killed) == weights_log(base)

    cache2 = str(tmp_path / "cache2")
    proc = run([os.path.join(BIN, "composer"), "-n", "2", "train.py", TINY_YAML,
                *remote_args(tiny_setup, two, remote, cache2), *common])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for a, b in zip(weights_log(two), weights_log(base), strict=True):  # the same losses up to summation order
        assert a["weights"] == pytest.approx(b["weights"], abs=1e-5)
    files = downloads(cache2)
    assert len(files) == len(set(files)) and any(f.endswith(".mds") for f in files)


def test_eval_and_reference_loss_read_a_remote(tiny_setup, remote, tmp_path, capsys):
    """`llmshearing eval` and `reference-loss` take --remote/--local as a run takes data.remote/data.local: the
    same numbers as from the folder, only the test split's files fetched (eval's final numbers); bad combinations are one-line errors."""
    from llmshearing.cli import main
    from llmshearing.eval.evaluate import evaluate_models

    model, cache = tiny_setup["model"], str(tmp_path / "cache")
    here = evaluate_models([model], remote, max_sequences=3, batch_size=2)
    there = evaluate_models([model], remote=remote, local=cache, max_sequences=3, batch_size=2)
    assert there["models"][0]["domains"] == here["models"][0]["domains"]
    assert there["shards"] == f"{remote} (cache {cache})"
    fetched = [f for f in downloads(cache) if f.endswith(".mds")]
    assert fetched and all(f.split(os.sep)[1] == "test" for f in fetched)

    capsys.readouterr()
    assert main(["reference-loss", "--model", model, "--shards", remote, "--max-sequences", "3"]) == 0
    from_folder = capsys.readouterr().out
    assert main(["reference-loss", "--model", model, "--remote", remote, "--local", cache, "--max-sequences", "3"]) == 0
    from_remote = capsys.readouterr().out
    assert from_remote.splitlines()[-1] == from_folder.splitlines()[-1]  # reference_losses: {...}
    assert from_remote.splitlines()[-1].startswith("reference_losses:")

    for argv, message in [
        (["eval", model, "--shards", remote, "--remote", remote, "--local", cache], "not both"),
        (["eval", model, "--remote", remote], "needs --local"),
        (["eval", model, "--shards", remote, "--local", cache], "--local=.* is the cache of --remote"),
        (["eval", model, "--remote", str(tmp_path / "nowhere"), "--local", cache], "--remote=.* is not a folder"),
        (["reference-loss", "--model", model, "--remote", remote], "needs --local"),
        (["reference-loss", "--paper", "7b", "--remote", remote], "--paper takes no --remote"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, (argv, err)
