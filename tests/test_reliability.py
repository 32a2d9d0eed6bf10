"""A crash costs minutes, not the run: kills and SIGTERM resume bit-identically, non-finite losses stop
with a checkpoint from before them, ranks agree, and failures end the run within a bounded time."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import BIN, CONTINUE_YAML, ENV, REPO, TINY_YAML, jsonl, paths, run, weights_log
from transformers import AutoModelForCausalLM

from llmshearing.compat import checkpoint_state, install_atomic_writes
from llmshearing.checkpoint_files import checkpoints, repair_latest

pytestmark = pytest.mark.slow  # Composer training runs / subprocesses: left out of `make test-fast`


def popen(args):
    """A run in its own process group, so a signal reaches it and its dataloader workers like a scheduler's."""
    return subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_lines(path, n, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {path} had {n} lines:\n{proc.stderr.read()[-3000:]}")
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for _ in f) >= n:
                    return
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"{path} did not reach {n} lines in {timeout}s")


def model_state(path):
    """The model weights of a checkpoint: a `.pt` file or a sharded folder."""
    return checkpoint_state(path)["model"]


def assert_same_weights(a, b):
    a, b = model_state(a), model_state(b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_pruning_killed_mid_run_autoresumes_bit_identically(tiny_setup, tmp_path):
    """SIGKILL at an arbitrary batch (2 dataloader workers), with the `latest` link lost and a torn
    temporary checkpoint left behind, then the same command again: the same masks, lambdas, weights,
    pruning log and domain weights as the uninterrupted run."""
    def args(folder):
        return [sys.executable, "train.py", TINY_YAML, *paths(tiny_setup, folder), "max_duration=20ba",
                "save_interval=5ba", "autoresume=true", "export_dir=null"]

    base, killed = str(tmp_path / "base"), str(tmp_path / "killed")
    proc = run(args(base))
    assert proc.returncode == 0, proc.stderr[-3000:]

    victim = popen(args(killed))
    wait_for_lines(os.path.join(killed, "pruning_log.jsonl"), 13, victim)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert os.path.exists(os.path.join(killed, "ep0-ba10-rank0.pt"))
    os.remove(os.path.join(killed, "latest-rank0.pt"))  # as if killed while Composer re-pointed the link
    with open(os.path.join(killed, ".ep0-ba15-rank0.pt.tmp-dead"), "wb") as f:
        f.write(b"half a checkpoint")  # as if killed while writing the next checkpoint

    start = time.time()
    proc = run(args(killed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.time() - start < 240  # no stale state from the killed run makes the new one wait
    assert_same_weights(os.path.join(base, "ep0-ba20-rank0.pt"), os.path.join(killed, "ep0-ba20-rank0.pt"))
    assert jsonl(os.path.join(killed, "pruning_log.jsonl")) == jsonl(os.path.join(base, "pruning_log.jsonl"))
    assert weights_log(killed) == weights_log(base)
    assert not [n for n in os.listdir(killed) if ".tmp-" in n]


def test_continued_pretraining_sigterm_checkpoints_and_resumes_bit_identically(tiny_setup, tmp_path):
    """SIGTERM (preemption) to the whole process group: the run saves a checkpoint at the end of the
    batch it is in, exports nothing and exits 143; the same command resumes and ends where the
    uninterrupted run ends, bit for bit, and exports."""
    def args(folder):
        return [sys.executable, "train.py", CONTINUE_YAML, *paths(tiny_setup, folder), "data.proportions=null",
                "save_interval=1000ba", "autoresume=true"]

    base, stopped = str(tmp_path / "base"), str(tmp_path / "stopped")
    proc = run(args(base))
    assert proc.returncode == 0, proc.stderr[-3000:]

    victim = popen(args(stopped))
    wait_for_lines(os.path.join(stopped, "domain_weights.jsonl"), 1, victim)  # past the eval at batch 10
    os.killpg(victim.pid, signal.SIGTERM)
    out, err = victim.communicate(timeout=120)
    assert victim.returncode == 143, err[-3000:]
    saved = [n for n in os.listdir(stopped) if n.startswith("ep0-ba") and n.endswith("-rank0.pt")]
    assert len(saved) == 1 and "SIGTERM: saved" in out, (saved, out[-2000:])
    batch = int(saved[0][len("ep0-ba"):-len("-rank0.pt")])
    assert 10 <= batch < 20
    assert os.path.realpath(os.path.join(stopped, "latest-rank0.pt")) == os.path.join(stopped, saved[0])
    assert not os.path.exists(os.path.join(stopped, "export"))  # a stopped run is not a finished model

    proc = run(args(stopped))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(os.path.join(base, "ep0-ba20-rank0.pt"), os.path.join(stopped, "ep0-ba20-rank0.pt"))
    assert weights_log(stopped) == weights_log(base)
    a = AutoModelForCausalLM.from_pretrained(os.path.join(base, "export"))
    b = AutoModelForCausalLM.from_pretrained(os.path.join(stopped, "export"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_ctrl_c_ends_a_run_like_sigterm_and_resumes_bit_identically(tiny_setup, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, 2 dataloader workers): a checkpoint at the end of the batch,
    exit 130, one line and no worker tracebacks; the same command resumes to the uninterrupted run's state.
    With save_on_sigterm=false there is nothing to save: exit 130, one line."""
    def args(folder, *extra):
        return [sys.executable, "train.py", TINY_YAML, *paths(tiny_setup, folder), "max_duration=20ba",
                "save_interval=1000ba", "autoresume=true", "export_dir=null", *extra]

    base, stopped = str(tmp_path / "base"), str(tmp_path / "stopped")
    proc = run(args(base))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for extra, saves in (((), True), (("save_on_sigterm=false",), False)):
        shutil.rmtree(stopped, ignore_errors=True)
        victim = popen(args(stopped, *extra))
        wait_for_lines(os.path.join(stopped, "pruning_log.jsonl"), 5, victim)
        os.killpg(victim.pid, signal.SIGINT)
        out, err = victim.communicate(timeout=120)
        assert victim.returncode == 130, err[-3000:]
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
        saved = [n for n in os.listdir(stopped) if n.startswith("ep0-ba") and n.endswith("-rank0.pt")]
        assert bool(saved) == saves and (("SIGINT: saved" in out) == saves), (saved, out[-2000:], err[-2000:])
        if not saves:
            assert "interrupted" in err and len(err.strip().splitlines()) == 1, err[-2000:]
    shutil.rmtree(stopped)
    victim = popen(args(stopped))
    wait_for_lines(os.path.join(stopped, "pruning_log.jsonl"), 5, victim)
    os.killpg(victim.pid, signal.SIGINT)
    victim.communicate(timeout=120)
    assert victim.returncode == 130
    proc = run(args(stopped))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(os.path.join(base, "ep0-ba20-rank0.pt"), os.path.join(stopped, "ep0-ba20-rank0.pt"))
    assert jsonl(os.path.join(stopped, "pruning_log.jsonl")) == jsonl(os.path.join(base, "pruning_log.jsonl"))


def test_nonfinite_gradient_stops_with_a_checkpoint_from_before_it(tiny_setup, tmp_path):
    """lr=1e30 makes the weights explode after one step: batch 2's gradient is inf. The run stops before
    the optimizer applies it, saves the state after batch 1 and says so; no traceback."""
    folder = str(tmp_path / "nan")
    proc = run([sys.executable, "train.py", TINY_YAML, *paths(tiny_setup, folder), "optimizer.lr=1e30",
                "data.num_workers=0", "max_duration=10ba", "export_dir=null"])
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "non-finite gradient in batch 2" in proc.stderr and "ep0-ba1-rank0.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
    ckpt = torch.load(os.path.join(folder, "ep0-ba1-rank0.pt"), map_location="cpu", weights_only=False)
    assert ckpt["state"]["timestamp"]["Timestamp"]["batch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state"]["model"].values())
    assert not os.path.exists(os.path.join(folder, "ep0-ba2-rank0.pt"))
    assert os.path.realpath(os.path.join(folder, "latest-rank0.pt")).endswith("ep0-ba1-rank0.pt")


def test_two_ranks_agree_and_export_what_one_rank_exports(tiny_setup, tmp_path):
    """`composer -n 2` (gloo, CPU), 2 samples per rank, vs one process with microbatches of 2: the mask noise
    is keyed by the microbatch's place in the global batch, so both runs train the same thing. Every eval
    checks that both ranks hold identical parameters (masks, lambdas, weights) and domain weights."""
    common = ["device=cpu", "device_train_microbatch_size=2", "max_duration=20ba"]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    proc = run([os.path.join(BIN, "composer"), "-n", "2", "train.py", TINY_YAML, *paths(tiny_setup, two), *common])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["ranks"] for r in jsonl(os.path.join(two, "rank_checks.jsonl"))] == [2, 2]
    assert [r["ranks_agreeing"] for r in weights_log(two)] == [2, 2]
    proc = run([sys.executable, "train.py", TINY_YAML, *paths(tiny_setup, one), *common])
    assert proc.returncode == 0, proc.stderr[-3000:]

    for a, b in zip(weights_log(two), weights_log(one)):  # the same losses up to summation order
        assert a["weights"] == pytest.approx(b["weights"], abs=1e-5)
    x = AutoModelForCausalLM.from_pretrained(os.path.join(two, "export")).eval()
    y = AutoModelForCausalLM.from_pretrained(os.path.join(one, "export")).eval()
    assert x.config.to_dict()["intermediate_size"] == y.config.to_dict()["intermediate_size"] == 64
    ids = torch.randint(0, x.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(x(ids).logits, y(ids).logits, atol=1e-3, rtol=0)


def test_two_ranks_continued_pretraining_agree(tiny_setup, tmp_path):
    folder = str(tmp_path / "cont")
    proc = run([os.path.join(BIN, "composer"), "-n", "2", "train.py", CONTINUE_YAML, *paths(tiny_setup, folder),
                "data.proportions=null", "device=cpu", "device_train_microbatch_size=2", "max_duration=10ba",
                "export_dir=null"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["ranks"] for r in jsonl(os.path.join(folder, "rank_checks.jsonl"))] == [2]
    assert [r["ranks_agreeing"] for r in weights_log(folder)] == [2]


def test_a_rank_that_dies_ends_the_run_within_a_bounded_time(tiny_setup, tmp_path):
    import psutil

    folder = str(tmp_path / "dies")
    launcher = popen([os.path.join(BIN, "composer"), "-n", "2", "train.py", TINY_YAML, *paths(tiny_setup, folder),
                      "device=cpu", "device_train_microbatch_size=2", "max_duration=1000ba", "export_dir=null"])
    wait_for_lines(os.path.join(folder, "pruning_log.jsonl"), 3, launcher)
    ranks = {p.environ().get("RANK"): p for p in psutil.Process(launcher.pid).children()}
    ranks["1"].kill()
    start = time.time()
    try:
        launcher.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        pytest.fail("the launcher did not end within 120 s of rank 1 dying")
    assert launcher.returncode != 0 and time.time() - start < 120


def test_shard_deleted_mid_run_fails_the_run_promptly(tiny_setup, tmp_path):
    shards = str(tmp_path / "shards")
    shutil.copytree(tiny_setup["shards"], shards)
    folder = str(tmp_path / "gone")
    victim = popen([sys.executable, "train.py", TINY_YAML, *paths(tiny_setup, folder), f"data.shards={shards}",
                    "max_duration=1000ba", "export_dir=null", "eval_interval=1000ba"])
    wait_for_lines(os.path.join(folder, "pruning_log.jsonl"), 2, victim)
    for domain in ("prose", "code"):
        shutil.rmtree(os.path.join(shards, domain, "prune"))  # an NFS mount gone, a cleanup job too eager
    start = time.time()
    try:
        _, err = victim.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(victim.pid, signal.SIGKILL)
        pytest.fail("the run did not end within 120 s of its shards disappearing")
    assert victim.returncode != 0 and "shard.00000.mds" in err and time.time() - start < 120


def test_checkpoint_writes_are_atomic(tmp_path):
    """An interrupted write (here: pickling fails half-way) leaves the previous checkpoint intact and no
    file of the new name; `repair_latest` restores a lost `latest` link and removes torn leftovers."""
    from composer.utils import checkpoint

    install_atomic_writes()
    path = str(tmp_path / "ep0-ba5-rank0.pt")
    checkpoint._write_checkpoint_file({"weights": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        checkpoint._write_checkpoint_file({"weights": torch.zeros(10_000), "then": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["weights"], torch.ones(3))
    with pytest.raises(RuntimeError):
        checkpoint._write_checkpoint_file({"then": Unpicklable()}, str(tmp_path / "ep0-ba10-rank0.pt"))
    assert sorted(os.listdir(tmp_path)) == ["ep0-ba5-rank0.pt"]

    checkpoint._write_checkpoint_file({"weights": torch.full((3,), 2.0)}, str(tmp_path / "ep0-ba10-rank0.pt"))
    (tmp_path / ".ep0-ba15-rank0.pt.tmp-x").write_bytes(b"torn")
    os.symlink("ep0-ba99-rank0.pt", tmp_path / "latest-rank0.pt")  # dangling
    assert repair_latest(str(tmp_path)) == str(tmp_path / "ep0-ba10-rank0.pt")
    assert torch.equal(torch.load(tmp_path / "latest-rank0.pt")["weights"], torch.full((3,), 2.0))
    assert not (tmp_path / ".ep0-ba15-rank0.pt.tmp-x").exists()


def test_repair_latest_with_sharded_checkpoints(tmp_path):
    """Sharded checkpoints are folders whose `.metadata` is written last and lists every rank's file: a `latest`
    link at a folder without it (a save cut short), or at one that lost a rank's file, is re-pointed at the newest
    complete one (the damaged folder set aside with a warning)."""
    import torch.distributed.checkpoint as dcp

    for name in ("ep0-ba5", "ep0-ba10", "ep0-ba15", "ep0-ba20"):
        dcp.save({"w": torch.ones(4)}, checkpoint_id=str(tmp_path / name))  # one process: writes __0_0.distcp
    os.remove(tmp_path / "ep0-ba20" / ".metadata")  # the save was cut short
    os.remove(tmp_path / "ep0-ba15" / "__0_0.distcp")  # a rank's file lost: its .metadata still names it
    assert [os.path.basename(p) for p in checkpoints(str(tmp_path))] == ["ep0-ba5", "ep0-ba10"]
    os.symlink("ep0-ba20", tmp_path / "latest-rank0.pt")
    assert repair_latest(str(tmp_path)) == str(tmp_path / "ep0-ba10")
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep0-ba10"
    assert os.path.isdir(tmp_path / "ep0-ba20")  # an unfinished save is no damage: left as it is
    os.replace(tmp_path / "latest-rank0.pt", tmp_path / "x")
    os.symlink("ep0-ba15", tmp_path / "latest-rank0.pt")
    assert repair_latest(str(tmp_path)) == str(tmp_path / "ep0-ba10")
    assert os.path.isdir(tmp_path / "ep0-ba15.damaged") and not os.path.exists(tmp_path / "ep0-ba15")
    assert repair_latest(str(tmp_path)) == str(tmp_path / "ep0-ba10")  # a good link is left alone
    # the same name damaged again (a rerun saved ep0-ba15 anew): both kept, nothing fails
    dcp.save({"w": torch.ones(4)}, checkpoint_id=str(tmp_path / "ep0-ba15"))
    os.remove(tmp_path / "ep0-ba15" / "__0_0.distcp")
    os.remove(tmp_path / "latest-rank0.pt")
    os.symlink("ep0-ba15", tmp_path / "latest-rank0.pt")
    assert repair_latest(str(tmp_path)) == str(tmp_path / "ep0-ba10")
    assert os.path.isdir(tmp_path / "ep0-ba15.damaged") and os.path.isdir(tmp_path / "ep0-ba15.damaged-1")


@pytest.mark.slow
def test_a_demo_stopped_by_sigterm_exits_with_its_code_and_a_rerun_resumes(tiny_setup, tmp_path):
    """SIGTERM during the continued stage: the stage saves its checkpoint, the demo stops with 143 and one line
    (it went on to evaluate an export that did not exist: an HFValidationError traceback); the same command again
    reuses the finished pruning stage, resumes the continued one and writes the summary."""
    data, out = tmp_path / "data", str(tmp_path / "demo")
    shutil.copytree(tiny_setup["model"], data / "models" / "smollm2-135m")
    os.makedirs(data / "text")
    for source, names in (("prose", ("news", "books")), ("code", ("code", "docs"))):
        lines = open(tiny_setup[source]).readlines()
        for i, name in enumerate(names):  # two halves: distinct documents per domain
            (data / "text" / f"{name}.jsonl").write_text("".join(lines[i::2]))
    target = ("prune.pruning.target={num_hidden_layers: 3, hidden_size: 48, num_attention_heads: 2, "
              "num_key_value_heads: 1, intermediate_size: 64}")
    command = [sys.executable, "-m", "llmshearing.cli", "demo", "--data", str(data), "--out", out, target,
               "progress_bar=false", "max_duration=4ba", "eval_interval=2ba", "save_interval=4ba",
               "continue.max_duration=200ba", "continue.save_interval=200ba", "continue.eval_interval=5ba",
               "continue.scheduler.t_warmup=0ba"]
    demo = popen(command)
    wait_for_lines(os.path.join(out, "continue", "domain_weights.jsonl"), 2, demo, timeout=600)
    os.killpg(demo.pid, signal.SIGTERM)
    _, err = demo.communicate(timeout=300)
    assert demo.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "run the demo again" in err, err[-3000:]
    assert not os.path.exists(os.path.join(out, "continued")) and not os.path.exists(os.path.join(out, "summary.json"))
    proc = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"reusing the finished stage in {out}/prune" in proc.stdout
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["perplexity"]) == {"source", "pruned", "pruned + continued"}
    # the final numbers are the test split's; the reference losses (which steer) are the source's on eval
    from llmshearing.eval.evaluate import domain_losses

    assert summary["split"] == "test" and "held-out test split" in open(os.path.join(out, "summary.md")).read()
    shards = str(data / "shards")
    pruned = AutoModelForCausalLM.from_pretrained(os.path.join(out, "pruned")).eval()
    source = AutoModelForCausalLM.from_pretrained(str(data / "models" / "smollm2-135m")).eval()
    test = domain_losses(lambda ids: pruned(ids).logits, shards, split="test")
    assert summary["loss"]["pruned"] == pytest.approx(test, rel=1e-5)
    assert summary["loss"]["pruned"] != pytest.approx(domain_losses(lambda ids: pruned(ids).logits, shards), rel=1e-3)
    assert summary["reference_losses"] == pytest.approx(domain_losses(lambda ids: source(ids).logits, shards), rel=1e-5)
    assert os.path.isfile(os.path.join(out, "continue", "ep0-ba200-rank0.pt"))
    gguf = os.path.join(out, "continued", "model.gguf")  # the demo's llama.cpp file, written by the rerun
    assert summary["gguf"].get("dtype") == "f16" and os.path.samefile(summary["gguf"]["file"], gguf), summary["gguf"]
    assert "llama-cli -m" in open(os.path.join(out, "summary.md")).read()


def test_a_stop_signal_quiets_only_the_broken_pipes_of_gone_workers(monkeypatch):
    """Ctrl-C / SIGTERM reach the dataloader workers too, so multiprocessing's resource-sharer thread may lose a
    worker mid-handshake, possibly before the main thread sees the signal (seen in CI: an EOFError traceback from
    resource_sharer._serve after the one line). That thread reports through sys.excepthook; every entry point
    (run_entry) drops its connection errors from the start. After a stop signal, pipe errors of any thread are
    dropped too; any other thread exception is reported."""
    import socket
    import threading
    import time
    from multiprocessing import resource_sharer

    from llmshearing.errors import _quiet_broken_pipes, run_entry

    seen_sys, seen_thread = [], []
    monkeypatch.setattr(sys, "excepthook", lambda t, e, tb: seen_sys.append(t))
    monkeypatch.setattr(threading, "excepthook", lambda args: seen_thread.append(args.exc_type))
    assert run_entry(lambda: 0) == 0  # installs the resource sharer's filter; no stop signal yet
    quiet_sys_hook, calls = sys.excepthook, []
    monkeypatch.setattr(sys, "excepthook", lambda *a: (calls.append(a[0]), quiet_sys_hook(*a)))

    # The real resource sharer: a worker that connects and is gone before the authentication handshake ends.
    sharer = resource_sharer._resource_sharer
    sharer.register(lambda conn, pid: None, lambda: None)
    client = socket.socket(socket.AF_UNIX)
    client.connect(sharer._address)
    client.close()
    deadline = time.time() + 30
    while not calls and time.time() < deadline:
        time.sleep(0.05)
    assert calls, "the resource sharer's accept() did not fail"
    assert seen_sys == []
    _quiet_broken_pipes()  # a stop signal: pipe errors of other threads are the workers' exit too

    def report(exc):  # another thread that reports through sys.excepthook, as the resource sharer does
        try:
            raise exc
        except Exception:
            sys.excepthook(*sys.exc_info())

    for exc in (BrokenPipeError(32, "Broken pipe"), ValueError("a bug")):
        def fail(exc=exc):
            raise exc
        for target in (fail, lambda exc=exc: report(exc)):
            t = threading.Thread(target=target)
            t.start()
            t.join()
    assert seen_thread == [ValueError] and seen_sys == [ValueError]
