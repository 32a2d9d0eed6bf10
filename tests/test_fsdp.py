"""Sharded training through Composer's own FSDP (FSDP1, the path the paper recipes take on GPUs), run on CPU with
two processes over gloo: wrapping, equality with one process, export, exact resume after SIGKILL (full and
sharded checkpoints), SIGTERM, and continued pretraining."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import BIN, jsonl, paths, run, weights_log
from test_reliability import popen, wait_for_lines
from transformers import AutoModelForCausalLM

from llmshearing.compat import checkpoint_state

pytestmark = pytest.mark.slow  # two-process Composer runs: left out of `make test-fast`

FSDP_YAML = os.path.join("yamls", "testing", "prune_tiny_fsdp.yaml")
CONTINUE_FSDP_YAML = os.path.join("yamls", "testing", "continue_tiny_fsdp.yaml")
COMMON = ["max_duration=20ba", "save_interval=5ba", "autoresume=true"]
TARGET = {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
          "intermediate_size": 64}
# A script that builds the trainer of a recipe + overrides and defines chain(x): the wrappers around a module.
BUILD_AND_CHAIN = """
import json, sys
from llmshearing.train.builders import build_trainer
from llmshearing.train.config import load_config
trainer, _ = build_trainer(load_config(sys.argv[1], sys.argv[2:]))
def chain(x):
    names = []
    while x is not None:
        names.append(type(x).__name__)
        x = getattr(x, "_fsdp_wrapped_module", None) or getattr(x, "_checkpoint_wrapped_module", None)
    return names
"""
PROBE = BUILD_AND_CHAIN + """m = trainer.state.model
print("STRUCTURE " + json.dumps({"model": chain(m.model), "l0": chain(m.l0), "layers": [chain(x) for x in m.model.model.layers]}))
"""


def two_procs(recipe, setup, folder, *extra, popen_it=False):
    args = [os.path.join(BIN, "composer"), "-n", "2", "--stdout", os.path.join(folder + "-rank{rank}.out"),
            "--stderr", os.path.join(folder + "-rank{rank}.err"), "train.py", recipe, *paths(setup, folder), *extra]
    return popen(args) if popen_it else run(args, timeout=600)


def rank1_log(folder):
    with open(folder + "-rank1.err") as f:
        return f.read()[-3000:]


def ok(proc, folder):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + rank1_log(folder)


@pytest.fixture(scope="module")
def runs(tiny_setup, tmp_path_factory):
    """One process without FSDP, and two processes under FSDP with full checkpoints (the uninterrupted runs)."""
    root = tmp_path_factory.mktemp("fsdp")
    one, two = str(root / "one"), str(root / "two")
    proc = run([sys.executable, "train.py", FSDP_YAML, *paths(tiny_setup, one), *COMMON, "fsdp=null"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = two_procs(FSDP_YAML, tiny_setup, two, *COMMON)
    ok(proc, two)
    return {"one": one, "two": two, "root": root, "two_rank0_stdout": proc.stdout}


def test_every_decoder_layer_is_an_fsdp_unit_checkpointed_when_asked(tiny_setup, tmp_path):
    for checkpointing, layer in ((True, ["FullyShardedDataParallel", "CheckpointWrapper", "DecoderLayer"]),
                                 (False, ["FullyShardedDataParallel", "DecoderLayer"])):
        proc = run([sys.executable, "-c", PROBE, FSDP_YAML, *paths(tiny_setup, str(tmp_path / str(checkpointing))),
                    f"fsdp.activation_checkpointing={str(checkpointing).lower()}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("STRUCTURE "))
        structure = json.loads(line[len("STRUCTURE "):])
        assert structure["model"] == ["FullyShardedDataParallel", "DecoderLM"]
        assert structure["l0"] == ["L0Module"]  # the masks stay whole and replicated
        assert structure["layers"] == [layer] * 4


def test_two_process_fsdp_pruning_equals_one_process(runs):
    """Same global batch (2 ranks x 2 vs 1 process with 2 microbatches of 2): the log of losses, expected sizes,
    target sparsities and multipliers agrees to 1e-5 at the first step and 1e-3 after (relative), and both
    ranks hold the same masks at every eval."""
    one, two = jsonl(os.path.join(runs["one"], "pruning_log.jsonl")), jsonl(os.path.join(runs["two"], "pruning_log.jsonl"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(20))
    assert set(one[0]) == set(two[0]) and {"loss/train/total", "loss/train/lm", "expected/params"} <= set(one[0])
    for i, (a, b) in enumerate(zip(one, two)):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5 if i == 0 else 1e-3, abs=1e-6), (i, key)
    assert one[-1]["l0/layer/target_sparsity"] == pytest.approx(0.25)  # ramped up after the 10-batch warm-up
    assert [r["ranks"] for r in jsonl(os.path.join(runs["two"], "rank_checks.jsonl"))] == [2, 2]
    for a, b in zip(weights_log(runs["two"]), weights_log(runs["one"]), strict=True):
        assert a["weights"] == pytest.approx(b["weights"], abs=1e-5)


def test_fsdp_export_is_the_target_model_and_equals_the_one_process_export(runs):
    said = [runs["two_rank0_stdout"], open(runs["two"] + "-rank1.out").read()]  # the launcher prints rank 0's
    assert said[0].count("exported the pruned model") == 1 and "exported" not in said[1]  # said once, by rank 0
    x = AutoModelForCausalLM.from_pretrained(os.path.join(runs["two"], "export")).eval()
    y = AutoModelForCausalLM.from_pretrained(os.path.join(runs["one"], "export")).eval()
    assert {k: x.config.to_dict()[k] for k in TARGET} == TARGET
    ids = torch.randint(0, x.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(x(ids).logits, y(ids).logits, atol=1e-3, rtol=0)


def final_weights(folder, sharded):
    path = os.path.join(folder, "ep0-ba20" if sharded else "ep0-ba20-rank0.pt")
    return checkpoint_state(path)["model"]


@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_fsdp_sigkill_then_autoresume_is_bit_identical(runs, tiny_setup, kind):
    """SIGKILL of the launcher's process group at an arbitrary batch, then the same command: the final checkpoint,
    pruning log and domain weights equal the uninterrupted FSDP run's exactly."""
    extra = [*COMMON, f"fsdp.state_dict_type={kind}", "export_dir=null"]
    base = runs["two"] if kind == "full" else str(runs["root"] / "base-sharded")
    if kind == "sharded":
        ok(two_procs(FSDP_YAML, tiny_setup, base, *extra), base)
        assert os.path.isfile(os.path.join(base, "ep0-ba20", ".metadata"))
    killed = str(runs["root"] / f"killed-{kind}")
    victim = two_procs(FSDP_YAML, tiny_setup, killed, *extra, popen_it=True)
    wait_for_lines(os.path.join(killed, "pruning_log.jsonl"), 13, victim)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    subprocess.run(["pkill", "-9", "-f", killed], check=False)  # ranks the launcher started in their own group
    ok(two_procs(FSDP_YAML, tiny_setup, killed, *extra), killed)
    a, b = final_weights(base, kind == "sharded"), final_weights(killed, kind == "sharded")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert jsonl(os.path.join(killed, "pruning_log.jsonl")) == jsonl(os.path.join(base, "pruning_log.jsonl"))
    assert weights_log(killed) == weights_log(base)


def base_sharded(runs, tiny_setup):
    base = str(runs["root"] / "base-sharded")
    if not os.path.exists(base):
        ok(two_procs(FSDP_YAML, tiny_setup, base, *COMMON, "fsdp.state_dict_type=sharded", "export_dir=null"), base)
    return base


def test_sharded_checkpoint_exports_like_the_end_of_run_export(runs, tiny_setup, tmp_path):
    """`llmshearing export` of a sharded checkpoint (a folder, through `latest-rank0.pt`) writes the model that
    the end of the same FSDP run exports (gathered layer by layer), and both equal, bit for bit, the export of the
    previous code (the whole checkpoint read, the model rebuilt, finalize())."""
    from test_export import assert_bit_identical, todays_export, weights

    base = base_sharded(runs, tiny_setup)
    proc = run([os.path.join(BIN, "llmshearing"), "export", os.path.join(base, "latest-rank0.pt"), str(tmp_path / "x")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    x = AutoModelForCausalLM.from_pretrained(str(tmp_path / "x")).eval()
    y = AutoModelForCausalLM.from_pretrained(os.path.join(runs["two"], "export")).eval()
    for (name, p), (_, q) in zip(x.state_dict().items(), y.state_dict().items()):
        assert torch.equal(p, q), name
    reference = todays_export(os.path.join(base, "ep0-ba20"))
    assert_bit_identical(weights(str(tmp_path / "x")), reference)
    assert_bit_identical(weights(os.path.join(runs["two"], "export")), reference)


def test_sharded_export_reads_only_the_student_and_writes_no_temporary_file(runs, tiny_setup, tmp_path, monkeypatch):
    """Every byte of the sharded checkpoint outside the student's tensors (the AdamW state: exp_avg, exp_avg_sq,
    steps) is overwritten with garbage: reading the whole checkpoint now fails, the export reads the same model as
    from the intact one, and writes nothing to the system temporary folder."""
    import tempfile

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from test_export import assert_bit_identical, weights

    from llmshearing.train.export_run import export_checkpoint

    source = os.path.join(base_sharded(runs, tiny_setup), "ep0-ba20")
    damaged = str(tmp_path / "ep0-ba20")
    shutil.copytree(source, damaged)
    metadata = FileSystemReader(damaged).read_metadata()
    spoiled = 0
    for index, info in metadata.storage_data.items():
        entry = metadata.state_dict_metadata[index.fqn]
        if index.fqn.startswith("state.model.") or not isinstance(entry, TensorStorageMetadata):
            continue
        with open(os.path.join(damaged, info.relative_path), "r+b") as f:
            f.seek(info.offset)
            f.write(b"\xff" * info.length)
        spoiled += info.length
    assert spoiled > 0
    with pytest.raises(CheckpointException):
        checkpoint_state(damaged)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir" / "tmp"))
    export_checkpoint(damaged, str(tmp_path / "a"))
    export_checkpoint(source, str(tmp_path / "b"))
    assert_bit_identical(weights(str(tmp_path / "a")), weights(str(tmp_path / "b")))
    assert not os.path.exists(str(tmp_path / "no-such-dir"))


@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_fsdp_sigterm_saves_and_resumes(runs, tiny_setup, kind):
    """SIGTERM to every process (a scheduler's preemption): the ranks save at the end of the batch they are in
    and stop; the same command resumes and ends on the uninterrupted run's weights."""
    stopped = str(runs["root"] / f"stopped-{kind}")
    extra = [*COMMON, "save_interval=1000ba", "export_dir=null", f"fsdp.state_dict_type={kind}"]
    victim = two_procs(FSDP_YAML, tiny_setup, stopped, *extra, popen_it=True)
    wait_for_lines(os.path.join(stopped, "pruning_log.jsonl"), 12, victim)
    os.killpg(victim.pid, signal.SIGTERM)
    out, err = victim.communicate(timeout=180)
    suffix = "-rank0.pt" if kind == "full" else ""
    saved = [n for n in os.listdir(stopped) if n.startswith("ep0-ba") and n.endswith(suffix)]
    assert len(saved) == 1, (os.listdir(stopped), out[-2000:], err[-2000:])
    assert 12 <= int(saved[0][len("ep0-ba"):len(saved[0]) - len(suffix)]) < 20
    assert os.path.realpath(os.path.join(stopped, "latest-rank0.pt")) == os.path.join(stopped, saved[0])
    ok(two_procs(FSDP_YAML, tiny_setup, stopped, *extra), stopped)
    a, b = final_weights(runs["two"], False), checkpoint_state(os.path.join(stopped, "latest-rank0.pt"))["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_continued_pretraining_under_fsdp_runs_and_exports(runs, tiny_setup):
    folder = str(runs["root"] / "continue")
    pruned = os.path.join(runs["two"], "export")
    ok(two_procs(CONTINUE_FSDP_YAML, tiny_setup, folder, f"model.path={pruned}",
                 f"data.proportions={os.path.join(runs['two'], 'domain_weights.json')}", "max_duration=10ba"), folder)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "export"))
    assert {k: model.config.to_dict()[k] for k in TARGET} == TARGET
    assert [r["ranks_agreeing"] for r in weights_log(folder)] == [2]


def test_plain_gradient_multipliers_under_fsdp_match_one_process_and_resume_from_a_sharded_checkpoint(tiny_setup, tmp_path):
    """`pruning.lambda_optimizer: sgd` (the demo's recipe) under FSDP: the multipliers' plain steps see the same
    all-reduced gradients as one process (same log to 1e-3), and a run resumed from the sharded batch-10
    checkpoint ends on the uninterrupted run's weights, bit for bit."""
    sgd = ["max_duration=20ba", "save_interval=10ba", "export_dir=null", "pruning.lambda_optimizer=sgd",
           "pruning.lambda_lr=10", "pruning.mask_eps=1e-3", "fsdp.state_dict_type=sharded"]
    one, two, resumed = (str(tmp_path / n) for n in ("one", "two", "resumed"))
    proc = run([sys.executable, "train.py", FSDP_YAML, *paths(tiny_setup, one), *sgd[:-1], "fsdp=null"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok(two_procs(FSDP_YAML, tiny_setup, two, *sgd), two)
    a, b = jsonl(os.path.join(one, "pruning_log.jsonl")), jsonl(os.path.join(two, "pruning_log.jsonl"))
    assert len(a) == len(b) == 20
    for i, (x, y) in enumerate(zip(a, b)):
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=1e-5 if i == 0 else 1e-3, abs=1e-6), (i, key)
    assert a[-1]["l0/layer/lambda_1"] != 0.0  # the multipliers moved
    ok(two_procs(FSDP_YAML, tiny_setup, resumed, *sgd, f"load_path={two}/ep0-ba10"), resumed)
    x, y = final_weights(two, True), final_weights(resumed, True)
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key

