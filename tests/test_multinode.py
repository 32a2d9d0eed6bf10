"""Two nodes on one machine: two Composer launchers (`-n 1 --world_size 2 --node_rank 0|1 --master_addr 127.0.0.1
--master_port P`, gloo) run FSDP pruning with autoresume (sharded checkpoints; the uninterrupted run full ones,
Composer's other autoresume path), each node reading the shards from `data.remote` through its own `data.local`
cache, both writing one shared save_folder. A node that dies ends the other within dist_timeout; relaunching both
with autoresume ends bit-identical to the uninterrupted run; the run equals `composer -n 2` on one node bit for bit
(same world size, same global ranks: only the node layout differs); a save_folder the nodes do not share is refused
at start. NCCL and real multi-host networking are not exercised here (docs/multinode.md)."""
import os
import re
import shlex
import signal
import socket
import subprocess
import time

import pytest
import torch
from conftest import BIN, ENV, REPO, jsonl, weights_log
from safetensors.torch import load_file
from test_fsdp import FSDP_YAML
from test_reliability import assert_same_weights, wait_for_lines
from test_remote import downloads, remote_args

from llmshearing.checkpoint_files import checkpoints

DIST_TIMEOUT = 60  # seconds: how long a collective waits for a rank that is gone
# 6 batches, a checkpoint every 2, an eval (domain-weight update) every 3, the sparsity ramp over 3.
COMMON = ["max_duration=6ba", "save_interval=2ba", "eval_interval=3ba", "pruning.lagrangian_warmup=3ba",
          "autoresume=true", f"dist_timeout={DIST_TIMEOUT}"]
SHARDED, FULL = "fsdp.state_dict_type=sharded", "fsdp.state_dict_type=full"  # which one changes no number
NODE_FLAGS = ("-n", "--world_size", "--node_rank", "--master_addr", "--master_port")  # as in README's command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, log):
    """A launcher in its own session (a node's scheduler would start it so), its output in a file: the worker of
    local rank 0 writes to the launcher's stdout, which a pipe nobody reads could block."""
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def nodes(setup, remote, folder, port, *extra, folder1=None, script="train.py"):
    """Node 0 and node 1 of a 2-node run: one process each, a node-local shard cache each, one shared folder
    (or node 1 given `folder1`, as if its save_folder were on its own disk)."""
    procs = []
    for node, here in ((0, folder), (1, folder1 or folder)):
        cache = f"{folder}-cache{node}"
        args = [os.path.join(BIN, "composer"), "-n", "1", "--world_size", "2", "--node_rank", str(node),
                "--master_addr", "127.0.0.1", "--master_port", str(port),
                script, FSDP_YAML, *remote_args(setup, here, remote, cache), *COMMON, *extra]
        procs.append(launch(args, f"{folder}-node{node}.log"))
    return procs


def tail(folder, node):
    with open(f"{folder}-node{node}.log") as f:
        return f.read()[-3000:]


def finish(procs, folder, timeout=600):
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert codes == [0] * len(procs), (codes, *(tail(folder, node) for node in range(len(procs))))


def exported(folder):
    return load_file(os.path.join(folder, "export", "model.safetensors"))


def assert_same_export(a, b):
    x, y = exported(a), exported(b)
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key
    with open(os.path.join(a, "export", "pruning.json")) as f, open(os.path.join(b, "export", "pruning.json")) as g:
        assert f.read() == g.read()


@pytest.fixture(scope="module")
def runs(tiny_setup, tmp_path_factory):
    """The uninterrupted two-node run (full checkpoints: Composer's autoresume path that needs
    compat.per_node_signal_files), and `composer -n 2` on one node (sharded checkpoints), both from the tiny shards
    as the remote. The checkpoint kind changes when and how the state is written, not a number of the run."""
    root, remote = tmp_path_factory.mktemp("multinode"), tiny_setup["shards"]
    two, one = str(root / "two"), str(root / "one")
    finish(nodes(tiny_setup, remote, two, free_port(), FULL), two)
    single = launch([os.path.join(BIN, "composer"), "-n", "2", "--stdout", one + "-rank{rank}.out", "--stderr",
                     one + "-rank{rank}.err", "train.py", FSDP_YAML,
                     *remote_args(tiny_setup, one, remote, one + "-cache"), *COMMON, SHARDED], one + "-node0.log")
    finish([single], one)
    return {"root": root, "remote": remote, "two": two, "one": one}


@pytest.mark.slow
def test_each_node_fills_its_own_cache_and_one_shared_folder_holds_the_run(runs):
    """Autoresume with full checkpoints on the shared folder starts (Composer's signal file, one per node) and
    leaves no signal file behind; each node's cache fetched what its rank read, each file once."""
    two = runs["two"]
    for node in (0, 1):
        files = downloads(f"{two}-cache{node}")
        assert len(files) == len(set(files)) and any(f.endswith(".mds") for f in files), (node, files)
    assert [os.path.basename(c) for c in checkpoints(two)] == [f"ep0-ba{b}-rank0.pt" for b in (2, 4, 6)]
    assert [r["ranks"] for r in jsonl(os.path.join(two, "rank_checks.jsonl"))] == [2, 2]
    assert not [n for n in os.listdir(two) if n.startswith("._signal_file")]


def test_composer_signal_files_are_named_after_the_node(monkeypatch):
    """Composer names the file after rank 0's node on every node; the shim names it after this node. In one process
    Composer's broadcast does nothing, so the test stands in for rank 0's broadcast (node 0's name arrives)."""
    from composer.utils import dist

    from llmshearing.compat import per_node_signal_files

    def from_rank0(objects, src=0):
        objects[0] = "._signal_file_node0_abcdef"

    monkeypatch.setattr(dist, "broadcast_object_list", from_rank0)
    monkeypatch.setenv("NODE_RANK", "1")
    if not getattr(dist.get_node_signal_file_name, "_llmshearing_per_node", False):  # (a trainer built earlier installs it)
        assert dist.get_node_signal_file_name() == "._signal_file_node0_abcdef"  # Composer's own: rank 0's node
    per_node_signal_files()
    per_node_signal_files()  # idempotent
    assert dist.get_node_signal_file_name() == "._signal_file_node1_abcdef"
    for node in ("0", "1", "12"):
        monkeypatch.setenv("NODE_RANK", node)
        name = dist.get_node_signal_file_name()
        assert re.fullmatch(rf"\._signal_file_node{node}_[A-Za-z0-9]{{6}}", name), name


@pytest.mark.slow
def test_two_nodes_equal_two_processes_on_one_node_bit_for_bit(runs):
    """The same world size, global ranks, per-rank batches and gloo collectives: only LOCAL_RANK, NODE_RANK and the
    caches differ, none of which enters the arithmetic, so the logs and the export are equal exactly (the 1e-5 /
    1e-3 tolerances of tests/test_fsdp.py are for a different world size, where the summation order changes)."""
    two, one = runs["two"], runs["one"]
    assert jsonl(os.path.join(two, "pruning_log.jsonl")) == jsonl(os.path.join(one, "pruning_log.jsonl"))
    assert weights_log(two) == weights_log(one)
    assert_same_export(two, one)
    assert_same_weights(os.path.join(two, "ep0-ba6-rank0.pt"), os.path.join(one, "ep0-ba6"))


@pytest.mark.slow
def test_a_node_that_dies_ends_both_and_autoresume_ends_bit_identical(runs, tiny_setup):
    """SIGKILL of node 1's training process mid-run: both launchers exit non-zero within dist_timeout and no
    process of the run is left. Relaunching both nodes with the same commands resumes from the newest complete
    sharded checkpoint in the shared folder and ends on the uninterrupted run's checkpoint, logs and export."""
    import psutil

    killed = str(runs["root"] / "killed")
    procs = nodes(tiny_setup, runs["remote"], killed, free_port(), SHARDED)
    try:
        wait_for_lines(os.path.join(killed, "pruning_log.jsonl"), 4, procs[0])
        workers = [c for p in procs for c in psutil.Process(p.pid).children(recursive=True)]  # dataloader workers too
        victim = next(c for c in psutil.Process(procs[1].pid).children() if c.environ().get("RANK") == "1")
        victim.kill()
        start = time.time()
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(1.0, DIST_TIMEOUT + 30 - (time.time() - start))))
            except subprocess.TimeoutExpired:
                codes.append(None)
        took = time.time() - start
    finally:
        for p in procs:  # the launchers' process groups (their workers are in them), if the test failed early
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    print(f"exit codes {codes}, {took:.1f}s after node 1's worker was killed")
    left = [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    for w in left:
        w.kill()
    assert not left, f"processes {[w.pid for w in left]} of the killed run were still running {took:.0f}s later"
    assert None not in codes, f"a launcher did not end within {DIST_TIMEOUT + 30}s of node 1 dying: {codes}"
    assert all(c != 0 for c in codes), (codes, tail(killed, 0), tail(killed, 1))
    assert took < DIST_TIMEOUT + 30  # the dist_timeout, and the launcher's 30 s to stop its processes
    assert checkpoints(killed), "the kill came before the first checkpoint; the resume would start over"
    first = os.path.join(killed, "ep0-ba2", ".metadata")
    stamp = os.stat(first).st_mtime_ns

    finish(nodes(tiny_setup, runs["remote"], killed, free_port(), SHARDED), killed)
    assert os.stat(first).st_mtime_ns == stamp  # resumed, not started over (which would rewrite ep0-ba2)
    assert sorted(n for n in os.listdir(os.path.join(killed, "ep0-ba6")) if n.endswith(".distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # both nodes' shards in the one folder
    assert_same_weights(os.path.join(runs["two"], "ep0-ba6-rank0.pt"), os.path.join(killed, "ep0-ba6"))
    assert jsonl(os.path.join(killed, "pruning_log.jsonl")) == jsonl(os.path.join(runs["two"], "pruning_log.jsonl"))
    assert weights_log(killed) == weights_log(runs["two"])
    assert_same_export(killed, runs["two"])


@pytest.mark.slow
def test_a_save_folder_the_nodes_do_not_share_is_refused_at_start(runs, tiny_setup):
    """Node 1 writing another folder than node 0 (a node-local disk): both nodes stop at start, exit 2, with one
    line naming the folder, before any training (every sharded checkpoint would be incomplete)."""
    folder = str(runs["root"] / "apart")
    procs = nodes(tiny_setup, runs["remote"], folder, free_port(), SHARDED, folder1=folder + "-node1-disk")
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [2, 2], (codes, tail(folder, 0), tail(folder, 1))
    for node in (0, 1):
        assert "is not the folder rank 0 writes on node(s) [1]" in tail(folder, node), tail(folder, node)
        assert "Traceback" not in tail(folder, node)
    assert not os.path.exists(os.path.join(folder, "pruning_log.jsonl")) and not checkpoints(folder)
    left = os.listdir(folder) if os.path.isdir(folder) else []  # a refused run removes the folder its lock made
    assert not [n for n in left if n.startswith(".shared-check")]


def readme_node_command():
    with open(os.path.join(REPO, "README.md")) as f:
        lines = [line for line in f if "--node_rank" in line and line.lstrip().startswith("composer")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split("#")[0])


def test_the_documented_launch_lines_carry_what_two_nodes_need():
    """README's multi-node command uses the launcher flags these tests run with; every paper recipe's multi-node
    line carries --master_port (without it Composer stops: 'In a multi-node environment, master_port is
    required')."""
    words = readme_node_command()
    flags = tuple(w for w in words[:words.index("train.py")] if w.startswith("-"))
    assert flags == NODE_FLAGS
    for recipe in ("prune_1.3b", "prune_2.7b", "continue_1.3b", "continue_2.7b"):
        with open(os.path.join(REPO, "yamls", f"{recipe}.yaml")) as f:
            lines = [line for line in f if line.startswith("#") and "--world_size" in line]
        assert lines and all(re.search(r"--master_port \S+", line) for line in lines), (recipe, lines)


FULL_DISK_AT_EXPORT = """
import errno, sys
from llmshearing.pruning import export

written = []
real_add = export.SafetensorsWriter.add


def add(self, name, tensor):  # rank 0 writes the export; its disk fills at the third tensor
    written.append(name)
    if len(written) == 3:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_add(self, name, tensor)


export.SafetensorsWriter.add = add
from llmshearing.train.run import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_failed_export_on_node_0_fails_the_run_and_node_1_is_not_left_waiting(runs, tiny_setup, tmp_path):
    """Rank 0's disk fills while it writes the export (the other rank is in the layer-by-layer gathers): rank 0
    finishes those gathers and tells every rank, so both nodes fail at once with the one-line error, none in a
    collective waiting for a rank that is gone (node 1's launcher cannot see node 0 fail: on gloo the wait ends
    with 'Connection closed by peer', on NCCL at dist_timeout); nothing is exported."""
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_AT_EXPORT)
    folder = str(tmp_path / "run")
    procs = nodes(tiny_setup, runs["remote"], folder, free_port(), SHARDED, script=str(script))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert codes[0] != 0 and "the disk or quota is full; nothing was written" in tail(folder, 0), tail(folder, 0)
    node1 = tail(folder, 1)
    assert codes[1] != 0 and "error: rank 0's export failed: writing" in node1 and "disk or quota is full" in node1, node1
    assert "Connection closed" not in node1 and "Traceback" not in node1, node1
    assert not os.path.exists(os.path.join(folder, "export"))
