"""Bad input, given as a hostile new user would give it, to every entry point: `composer train.py`,
`llmshearing export | eval | reference-loss | make-tiny` and `python -m llmshearing.data_prep.shards`.

Each case asserts the exit code, that no traceback is printed, that the message names the key or path at
fault, and that nothing was written or replaced. Classes (README "When things go wrong"): data loss, silently
wrong, hang, unclear, traceback."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ENV, REPO, TINY_YAML, paths

from llmshearing.data_prep.shards import main as shards_main
from llmshearing.cli import main as cli_main
from llmshearing.train.run import main as train_main


def snapshot(*roots):
    """path -> sha256 of every file under `roots` (and the folders themselves): 'nothing written or replaced'."""
    seen = {}
    for root in roots:
        if not os.path.exists(root):
            seen[root] = None
            continue
        for folder, dirs, files in os.walk(root):
            seen[folder] = "dir"
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    seen[path] = hashlib.sha256(f.read()).hexdigest()
    return seen


def refused(capsys, rc, *names, code=2):
    """The call returned `code`, printed one clear error naming `names`, and no traceback."""
    out, err = capsys.readouterr()
    assert rc == code, (rc, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out
    for name in names:
        assert name in err, (name, err[-2000:])
    return err


@pytest.fixture()
def tiny(tiny_setup, tmp_path):
    """The tiny setup plus a run folder and a copy of the model that a case may break."""
    model = tmp_path / "model"
    shutil.copytree(tiny_setup["model"], model)
    return {**tiny_setup, "run": str(tmp_path / "run"), "copy": str(model), "tmp": tmp_path}


def train(t, *extra, model=None):
    args = paths(t, t["run"]) + list(extra)
    if model:
        args.append(f"model.path={model}")
    return train_main([TINY_YAML, *args])


# ----------------------------------------------------------------------------------------- the run config

@pytest.mark.parametrize("override, names", [
    ("optimizer.lr=-1", ["optimizer.lr"]),
    ("optimizer.lr=.nan", ["optimizer.lr"]),
    ("optimizer.betas=[1.5,0.9]", ["optimizer.betas"]),
    ("optimizer.eps=0", ["optimizer.eps"]),
    ("optimizer.weight_decay=-0.1", ["optimizer.weight_decay"]),
    ("device_eval_batch_size=0", ["device_eval_batch_size"]),
    ("max_duration=0ba", ["max_duration"]),
    ("eval_interval=0ba", ["eval_interval"]),
    ("save_interval=0ba", ["save_interval"]),
    ("eval_subset_num_batches=0", ["eval_subset_num_batches"]),
    ("data.dynamic.eta=.nan", ["data.dynamic.eta"]),
    ("data.dynamic.reference_losses={prose: .inf, code: 3.0}", ["data.dynamic.reference_losses"]),
    ("data.proportions={prose: .nan, code: 0.5}", ["data.proportions"]),
    ("pruning.mask_lr=0", ["pruning.mask_lr"]),
    ("pruning.lambda_lr=-1", ["pruning.lambda_lr"]),
    ("scheduler.alpha_f=2", ["scheduler.alpha_f"]),
    ("seed=-1", ["seed"]),
    ("dist_timeout=.inf", ["dist_timeout"]),
    ("data.eval_sequences_per_domain=0", ["data.eval_sequences_per_domain"]),
])
def test_numbers_out_of_range_are_refused_before_training(tiny, capsys, override, names):
    before = snapshot(tiny["run"])
    refused(capsys, train(tiny, override), *names)
    assert snapshot(tiny["run"]) == before


@pytest.mark.parametrize("override, names", [
    ("fsdp={sharding_strategy: BOGUS}", ["fsdp.sharding_strategy", "FULL_SHARD"]),
    ("fsdp={sharding_strategy: FULL_SHRAD}", ["fsdp.sharding_strategy", "did you mean 'FULL_SHARD'"]),
    ("fsdp={mixed_precision: BOGUS}", ["fsdp.mixed_precision", "DEFAULT"]),
    ("fsdp={mixed_precision: {param_type: bf16}}", ["fsdp.mixed_precision", "param_dtype"]),
    ("fsdp={state_dict_type: shard}", ["fsdp.state_dict_type", "did you mean 'sharded'"]),
    ("fsdp={backward_prefetch: SOMETIMES}", ["fsdp.backward_prefetch", "BACKWARD_POST"]),
    ("fsdp={use_orig_params: maybe}", ["fsdp.use_orig_params", "bool"]),
])
def test_fsdp_values_are_checked_before_composer_sees_them(tiny, capsys, override, names):
    """Composer maps these names only when it wraps the model (KeyError / ValueError tracebacks)."""
    refused(capsys, train(tiny, override), *names)
    assert not os.path.exists(tiny["run"])


@pytest.mark.parametrize("override, names", [
    ("pruning.init_sequences=-5", ["pruning.init_sequences", ">= 1"]),  # with init=uniform too
    ("pruning.init=activation|pruning.init_sequences=100000|pruning.lagrangian_warmup=0ba",
     ["pruning.init_sequences=100000", "prose (128)", "at most 128"]),  # was capped silently
    ("pruning.target={}", ["pruning.target", "source's own shape", "prune nothing"]),
    ("pruning.target={num_hidden_layers: 4}", ["pruning.target", "prune nothing"]),
    ("pruning.hidden_mask=both", ["pruning.hidden_mask", "residual or original", "'both'"]),
    ("pruning.lambda_optimizer=rmsprop", ["pruning.lambda_optimizer", "adam or sgd", "'rmsprop'"]),
    ("pruning.mask_beta1=1", ["pruning.mask_beta1", "[0, 1)", "got 1"]),
    ("pruning.mask_eps=0", ["pruning.mask_eps", "positive number", "got 0"]),
    ("pruning.penalty=-1", ["pruning.penalty", ">= 0", "got -1"]),
])
def test_settings_that_would_do_nothing_or_be_capped_are_refused(tiny, capsys, override, names):
    refused(capsys, train(tiny, *override.split("|")), *names)
    assert not os.path.exists(tiny["run"])


def test_a_yaml_that_does_not_parse_names_file_and_line(tiny, capsys):
    bad = tiny["tmp"] / "bad.yaml"
    bad.write_text("run_name: x\nmodel: {path: data/tiny/model\nmax_duration: 10ba\n")
    refused(capsys, train_main([str(bad)]), str(bad), "line")


def test_gpu_settings_without_a_gpu_are_refused(tiny, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    refused(capsys, train(tiny, "precision=amp_fp16"), "precision")
    refused(capsys, train(tiny, "device=gpu"), "device")
    assert not os.path.exists(tiny["run"])


def test_microbatch_auto_on_cpu_means_the_whole_batch(tiny, capsys):
    """The config's own default must run on CPU (Composer's 'auto' needs CUDA)."""
    from llmshearing.train.config import microbatch_size

    assert microbatch_size("auto", 8, "cpu") == 8
    assert microbatch_size("auto", 8, "gpu") == "auto"
    assert microbatch_size(2, 8, "cpu") == 2
    assert train(tiny, "device_train_microbatch_size=auto", "max_duration=2ba", "eval_interval=2ba") == 0


def test_structured_files_that_do_not_parse_name_the_key(tiny, capsys):
    bad_yaml = tiny["tmp"] / "ref.yaml"
    bad_yaml.write_text("reference_losses: {prose: 4.0, code: [3.0\n")
    refused(capsys, train(tiny, f"data.dynamic.reference_losses={bad_yaml}"), "data.dynamic.reference_losses",
            str(bad_yaml))
    bad_json = tiny["tmp"] / "w.json"
    bad_json.write_text('{"prose": 0.5, "code": ')
    refused(capsys, train(tiny, f"data.proportions={bad_json}"), "data.proportions", str(bad_json))
    refused(capsys, train(tiny, f"pruning.target={bad_json}"), "pruning.target", str(bad_json))
    empty = tiny["tmp"] / "empty_target"
    empty.mkdir()
    refused(capsys, train(tiny, f"pruning.target={empty}"), "pruning.target", "config.json")


def test_load_path_that_is_not_a_checkpoint(tiny, capsys):
    text = tiny["tmp"] / "notes.txt"
    text.write_text("not a checkpoint\n")
    refused(capsys, train(tiny, f"load_path={text}"), "load_path", str(text))


# ------------------------------------------------------------------------------------------ model folders

def _config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def _broken_models(t):
    """name -> (folder, words the message must hold)."""
    base = t["copy"]
    cases = {}

    def copy(name):
        path = str(t["tmp"] / name)
        shutil.copytree(base, path)
        return path

    no_config = copy("no_config")
    os.remove(os.path.join(no_config, "config.json"))
    cases["no config.json"] = (no_config, ["config.json"])
    bad_json = copy("bad_json")
    with open(os.path.join(bad_json, "config.json"), "w") as f:
        f.write('{"model_type": "llama", ')
    cases["config.json not json"] = (bad_json, ["config.json"])
    wrong_hidden = copy("wrong_hidden")
    _config(wrong_hidden, hidden_size=128)
    cases["wrong hidden size"] = (wrong_hidden, ["model.embed_tokens.weight"])
    fewer_layers = copy("fewer_layers")
    with open(os.path.join(base, "config.json")) as f:
        layers = json.load(f)["num_hidden_layers"]
    _config(fewer_layers, num_hidden_layers=layers - 1)
    cases["config says fewer layers"] = (fewer_layers, [f"model.layers.{layers - 1}."])
    truncated = copy("truncated")
    weights = os.path.join(truncated, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    cases["truncated safetensors"] = (truncated, ["model.safetensors"])
    garbage = copy("garbage")
    with open(os.path.join(garbage, "model.safetensors"), "wb") as f:
        f.write(b"\x00" * 100)
    cases["not safetensors"] = (garbage, ["model.safetensors"])
    no_weights = copy("no_weights")
    os.remove(os.path.join(no_weights, "model.safetensors"))
    cases["no weights"] = (no_weights, ["weights"])
    return cases


def test_broken_model_folders_are_refused_by_every_entry_point(tiny, capsys):
    for name, (folder, words) in _broken_models(tiny).items():
        before = snapshot(tiny["run"])
        refused(capsys, train(tiny, model=folder), folder, *words)
        assert snapshot(tiny["run"]) == before, name
        refused(capsys, cli_main(["eval", folder, "--shards", tiny["shards"]]), folder, *words)
        refused(capsys, cli_main(["reference-loss", "--model", folder, "--shards", tiny["shards"]]), folder, *words)


def test_shards_longer_than_the_model_positions_are_refused(tiny, capsys):
    _config(tiny["copy"], max_position_embeddings=32)  # the tiny shards hold 64-token sequences
    refused(capsys, train(tiny, model=tiny["copy"]), "seq_len", "max_position_embeddings")
    refused(capsys, cli_main(["eval", tiny["copy"], "--shards", tiny["shards"]]), "max_position_embeddings")


def test_a_manifest_without_its_splits_is_refused(tiny, capsys):
    shards = str(tiny["tmp"] / "shards")
    shutil.copytree(tiny["shards"], shards)
    path = os.path.join(shards, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    del manifest["domains"]["prose"]["splits"]
    with open(path, "w") as f:
        json.dump(manifest, f)
    refused(capsys, train(tiny, f"data.shards={shards}"), path, "splits")
    refused(capsys, cli_main(["eval", tiny["model"], "--shards", shards]), path, "splits")
    with open(path, "w") as f:
        f.write("{not json")
    refused(capsys, train(tiny, f"data.shards={shards}"), path)


# ---------------------------------------------------------------------------------------------- data loss

def test_export_dir_never_replaces_what_it_did_not_write(tiny, capsys):
    """A foreign folder, the run folder itself, or a folder above it: refused before training, intact after."""
    notes = tiny["tmp"] / "notes"
    notes.mkdir()
    (notes / "NOTES.txt").write_text("mine\n")
    run_folder = tiny["run"]
    for export_dir, words in ((str(notes), ["export_dir", "not an llmshearing export"]),
                              (run_folder, ["export_dir", "run folder"]),
                              (str(tiny["tmp"]), ["export_dir", "run folder"])):
        before = snapshot(str(notes), run_folder)
        refused(capsys, train(tiny, f"export_dir={export_dir}"), *words)
        assert snapshot(str(notes), run_folder) == before, export_dir


def test_an_export_replaces_only_an_earlier_export(tiny, capsys):
    """A finished run exports; a rerun into the same export_dir replaces that export (it carries the marker);
    `llmshearing export` into a foreign folder or over an export without --overwrite refuses."""
    from llmshearing.pruning.export import EXPORT_MARKER

    export = os.path.join(tiny["run"], "export")
    assert train(tiny, "max_duration=2ba", "eval_interval=2ba", "save_interval=2ba") == 0
    assert os.path.isfile(os.path.join(export, EXPORT_MARKER))
    checkpoint = os.path.join(tiny["run"], "latest-rank0.pt")
    capsys.readouterr()
    before = snapshot(export)
    refused(capsys, cli_main(["export", checkpoint, export]), "--overwrite")
    assert snapshot(export) == before
    notes = tiny["tmp"] / "notes"
    notes.mkdir()
    (notes / "NOTES.txt").write_text("mine\n")
    refused(capsys, cli_main(["export", checkpoint, str(notes), "--overwrite"]), str(notes), "not an llmshearing export")
    assert (notes / "NOTES.txt").read_text() == "mine\n"
    assert cli_main(["export", checkpoint, export, "--overwrite"]) == 0


def test_a_finished_run_folder_is_bound_to_its_run(tiny, capsys):
    """A rerun with another target refuses and changes nothing (run_config.yaml included); the checkpoint
    carries its config, so exporting it gives the old run's shape even if run_config.yaml beside it is another
    run's; a rerun of the same run without autoresume refuses to silently start over."""
    from transformers import AutoConfig

    common = ["max_duration=2ba", "eval_interval=2ba", "save_interval=2ba", "save_overwrite=false", "export_dir=null"]
    assert train(tiny, *common) == 0
    capsys.readouterr()
    before = snapshot(tiny["run"])
    other = "pruning.target={num_hidden_layers: 2, hidden_size: 48, num_attention_heads: 2, num_key_value_heads: 1, intermediate_size: 64}"
    refused(capsys, train(tiny, *common, other), "pruning.target", "another run")
    assert snapshot(tiny["run"]) == before
    refused(capsys, train(tiny, *common), "autoresume=true")
    assert snapshot(tiny["run"]) == before
    import yaml  # a run config written by an older version (a key since removed) still binds by what it names

    config_path = os.path.join(tiny["run"], "run_config.yaml")
    old = yaml.safe_load(open(config_path))
    old["data"]["dynamic"]["clamp_min"] = 0.0
    with open(config_path, "w") as f:
        yaml.safe_dump(old, f)
    assert train(tiny, *common, "autoresume=true", "max_duration=3ba") == 0

    other_run = str(tiny["tmp"] / "other")
    assert train_main([TINY_YAML, *paths(tiny, other_run), *common, other]) == 0
    shutil.copy(os.path.join(other_run, "run_config.yaml"), os.path.join(tiny["run"], "run_config.yaml"))
    out = str(tiny["tmp"] / "export")
    assert cli_main(["export", os.path.join(tiny["run"], "latest-rank0.pt"), out]) == 0
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 3  # the checkpoint's own target, not the other run's


def test_a_second_run_on_a_locked_folder_refuses_naming_the_holder(tiny, capsys):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from llmshearing.train.run_folder import lock; lock(sys.argv[1]); print('locked', "
        "flush=True); time.sleep(120)"), tiny["run"]], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tiny["run"])
        refused(capsys, train(tiny), "in use by another run", f"PID {holder.pid}")
        assert snapshot(tiny["run"]) == before
    finally:
        holder.kill()
        holder.wait()
    assert train(tiny, "max_duration=2ba", "eval_interval=2ba", "save_interval=2ba") == 0  # released with the process


def test_a_finished_run_is_never_replaced_and_the_folder_is_taken_first(tiny, capsys):
    """A second launch of a finished run under the tiny recipe's save_overwrite: true refuses and changes nothing
    (it used to replace the first run's checkpoints and logs); the lock is taken before the slow checks, so a
    launch on a busy folder refuses on the lock even when its model folder is broken; an unfinished run is started
    over with a warning."""
    common = ["max_duration=2ba", "eval_interval=2ba", "save_interval=2ba", "export_dir=null"]
    assert train(tiny, *common) == 0
    capsys.readouterr()
    before = snapshot(tiny["run"])
    for extra in ([], ["max_duration=4ba"], ["save_overwrite=true", "max_duration=1ba"]):
        refused(capsys, train(tiny, *common, *extra), tiny["run"], "finished run", "autoresume=true")
        assert snapshot(tiny["run"]) == before, extra
    refused(capsys, train(tiny, *common, "autoresume=true"), "finished run", "nothing to train", "max_duration")
    assert snapshot(tiny["run"]) == before  # it was Composer's ValueError traceback
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from llmshearing.train.run_folder import lock; lock(sys.argv[1]); print('locked', "
        "flush=True); time.sleep(120)"), tiny["run"]], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused(capsys, train(tiny, *common, model=str(tiny["tmp"] / "no_such_model")), "in use by another run")
    finally:
        holder.kill()
        holder.wait()
    os.replace(os.path.join(tiny["run"], "ep0-ba2-rank0.pt"), os.path.join(tiny["run"], "ep0-ba1-rank0.pt"))
    assert train(tiny, *common) == 0  # unfinished (newest checkpoint: batch 1 of 2): started over, with a warning
    assert "replacing the checkpoints and logs of the unfinished run" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- other commands

def test_export_of_something_that_is_not_a_checkpoint(tiny, capsys):
    text = tiny["tmp"] / "notes.txt"
    text.write_text("hello\n")
    out = str(tiny["tmp"] / "out")
    refused(capsys, cli_main(["export", str(text), out]), str(text), "not a Composer checkpoint")
    truncated = tiny["tmp"] / "half.pt"
    torch.save({"state": {"model": {"w": torch.zeros(1000)}}}, truncated)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    refused(capsys, cli_main(["export", str(truncated), out]), str(truncated), "truncated")
    refused(capsys, cli_main(["export", str(tiny["tmp"]), out]), "not a sharded checkpoint")
    assert not os.path.exists(out)


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tiny, capsys):
    blocker = tiny["tmp"] / "a_file"
    blocker.write_text("x")
    under = str(blocker / "sub" / "out.json")
    refused(capsys, cli_main(["eval", tiny["model"], "--shards", tiny["shards"], "--out", under]), "--out", str(blocker))
    refused(capsys, cli_main(["reference-loss", "--paper", "llama2-7b-to-1.3b", "--out", under]), "--out", str(blocker))
    refused(capsys, train(tiny, f"save_folder={blocker}/run"), "save_folder", str(blocker))
    refused(capsys, train(tiny, f"export_dir={blocker}/export"), "export_dir", str(blocker))
    refused(capsys, cli_main(["make-tiny", str(blocker / "tiny")]), str(blocker))
    refused(capsys, shards_main(["--tokenizer", tiny["model"], "--out", str(blocker / "shards"), "--seq-len", "16",
                                 "--eval-sequences", "1", "--prune-tokens", "64", "--continue-tokens", "64",
                                 "--domain", f"prose={tiny['prose']}", "--no-progress"]), "--out", str(blocker))
    assert blocker.read_text() == "x"


# ------------------------------------------------------------------------------------------------- shards

def shards_args(t, out, *domains, seq_len="16"):
    return ["--tokenizer", t["model"], "--out", out, "--seq-len", seq_len, "--eval-sequences", "1",
            "--prune-tokens", "256", "--continue-tokens", "256", "--no-progress",
            *[a for d in domains for a in ("--domain", d)]]


def test_shard_inputs_are_checked_before_tokenizing(tiny, capsys):
    out = str(tiny["tmp"] / "shards")
    fifo = str(tiny["tmp"] / "pipe.jsonl")
    os.mkfifo(fifo)
    binary = tiny["tmp"] / "weights.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    latin = tiny["tmp"] / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    archive = tiny["tmp"] / "docs.jsonl"
    shutil.make_archive(str(tiny["tmp"] / "docs_zip"), "zip", tiny["tmp"], "weights.txt")
    os.replace(str(tiny["tmp"] / "docs_zip.zip"), archive)
    cases = [
        ([f"prose={fifo}"], ["pipe.jsonl", "not a regular file"]),  # would block forever
        ([f"prose={binary}"], ["weights.txt", "binary"]),
        ([f"prose={latin}"], ["latin.txt", "UTF-8"]),
        ([f"prose={archive}"], ["docs.jsonl", "zip"]),
        ([f"prose={tiny['prose']}", f"prose={tiny['prose']}"], ["given twice"]),
        ([f"prose={tiny['prose']}", f"code={tiny['prose']}"], ["given twice", "leaks"]),
    ]
    for domains, words in cases:
        start = time.time()
        refused(capsys, shards_main(shards_args(tiny, out, *domains)), *words)
        assert time.time() - start < 60
        assert not os.path.exists(out)
    refused(capsys, shards_main(shards_args(tiny, out, f"prose={tiny['prose']}", seq_len="1")), "seq_len", ">= 2")


def test_compressed_inputs_are_read_by_content(tiny, capsys):
    """.jsonl.bz2 / .jsonl.xz / gzip content under a plain name: the same documents as the plain file."""
    import bz2
    import gzip
    import lzma

    from llmshearing.data_prep.shards import iter_documents

    raw = open(tiny["prose"], "rb").read()
    expected = list(iter_documents([tiny["prose"]]))
    for name, data in (("p.jsonl.bz2", bz2.compress(raw)), ("p.jsonl.xz", lzma.compress(raw)),
                       ("p.jsonl", gzip.compress(raw))):
        path = tiny["tmp"] / name
        path.write_bytes(data)
        assert list(iter_documents([str(path)])) == expected, name


def test_one_plain_text_file_per_domain_says_why_it_is_too_little(tiny, capsys):
    big = tiny["tmp"] / "book.txt"
    big.write_text("All work and no play. " * 20000)
    refused(capsys, shards_main(shards_args(tiny, str(tiny["tmp"] / "s"), f"prose={big}")), "too little text",
            "ONE document")


def test_a_full_disk_while_building_shards_is_one_line_and_leaves_nothing(tiny):
    """RLIMIT_FSIZE makes writes fail with EFBIG as a full disk would (Python ignores SIGXFSZ)."""
    import resource

    out = str(tiny["tmp"] / "shards")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # noqa: E731
    args = shards_args(tiny, out, f"prose={tiny['prose']}", f"code={tiny['code']}")
    args[args.index("--prune-tokens") + 1] = "8192"
    proc = subprocess.run([sys.executable, "-m", "llmshearing.data_prep.shards", *args, "--workers", "1"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "File too large" in proc.stderr
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tiny["tmp"]) if n.startswith(".shards")]  # no temporary folder left behind


# ------------------------------------------------------------------------------ folders that are not the project's

def test_a_cache_or_shard_output_is_never_a_folder_the_project_did_not_make(tiny, capsys):
    """data.local / --local at a model folder or at a shard folder is refused before a file lands in it; a shard
    build replaces (even with --overwrite) only a folder it built itself: a stray manifest.json, as a cache leaves,
    does not make a model folder replaceable (that chain deleted config.json and model.safetensors)."""
    from llmshearing.data.layout import BUILT_MARKER
    from llmshearing.data.remote import prepare_cache

    remote, model = tiny["shards"], tiny["copy"]
    shard_copy = str(tiny["tmp"] / "my_shards")
    shutil.copytree(remote, shard_copy)
    for local in (model, shard_copy):
        before = snapshot(local)
        refused(capsys, train(tiny, "data.shards=null", f"data.remote={remote}", f"data.local={local}"),
                "data.local", local, "not a shard cache")
        refused(capsys, cli_main(["eval", tiny["model"], "--remote", remote, "--local", local]), "--local", local,
                "not a shard cache")
        refused(capsys, cli_main(["reference-loss", "--model", tiny["model"], "--remote", remote, "--local", local]),
                "--local", local, "not a shard cache")
        assert snapshot(local) == before, local
    shutil.copy(os.path.join(remote, "manifest.json"), model)  # what a cache used to leave there
    cache = str(tiny["tmp"] / "cache")
    prepare_cache(remote, cache)
    for out in (model, cache):
        before = snapshot(out)
        for extra in ([], ["--overwrite"]):
            refused(capsys, shards_main(shards_args(tiny, out, f"prose={tiny['prose']}") + extra), out, BUILT_MARKER)
        assert snapshot(out) == before, out
    own = str(tiny["tmp"] / "own")
    assert shards_main(shards_args(tiny, own, f"prose={tiny['prose']}", f"code={tiny['code']}")) == 0
    assert os.path.isfile(os.path.join(own, BUILT_MARKER))
    os.remove(os.path.join(own, BUILT_MARKER))  # built before the marker existed: only its manifest and domains
    assert shards_main(shards_args(tiny, own, f"prose={tiny['prose']}", f"code={tiny['code']}", seq_len="32")
                       + ["--overwrite"]) == 0


# ------------------------------------------------------------------------------------ checkpoints on resume

def _damage(path, how):
    """Overwrite through the `latest` link as `cp` would (random bytes), or cut the file in half."""
    if how == "random":
        with open(path, "wb") as f:
            f.write(os.urandom(4096))
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


@pytest.mark.slow
def test_autoresume_skips_a_damaged_newest_checkpoint_or_refuses_naming_it(tiny, capsys):
    """A newest checkpoint overwritten or truncated is set aside with a warning and the run resumes from the newest
    complete one; with none left it refuses naming the file and changes nothing (it used to end in an
    UnpicklingError / PytorchStreamReader traceback)."""
    from conftest import CONTINUE_YAML

    common = ["eval_interval=2ba", "save_interval=2ba", "export_dir=null", "autoresume=true", "save_overwrite=false"]
    run = tiny["run"]
    assert train(tiny, *common, "max_duration=4ba") == 0
    for how, until in (("random", 6), ("truncated", 8)):
        newest = os.path.realpath(os.path.join(run, "latest-rank0.pt"))
        _damage(os.path.join(run, "latest-rank0.pt"), how)
        capsys.readouterr()
        assert train(tiny, *common, f"max_duration={until}ba") == 0
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"'{newest}'" in err and "resuming from the newest complete" in err, err
        assert os.path.isfile(newest + ".damaged")
        assert os.path.basename(os.path.realpath(os.path.join(run, "latest-rank0.pt"))) == f"ep0-ba{until}-rank0.pt"
    only = str(tiny["tmp"] / "only")
    assert train_main([TINY_YAML, *paths(tiny, only), *common, "max_duration=2ba"]) == 0
    _damage(os.path.join(only, "latest-rank0.pt"), "random")
    capsys.readouterr()
    before = snapshot(only)
    refused(capsys, train_main([TINY_YAML, *paths(tiny, only), *common, "max_duration=4ba"]), "ep0-ba2-rank0.pt",
            "no earlier complete checkpoint")
    assert snapshot(only) == before
    # load_path of another kind of run: a continued run's checkpoint (no masks) into a pruning run and back
    cont = str(tiny["tmp"] / "cont")
    assert train_main([CONTINUE_YAML, *paths(tiny, cont), "max_duration=2ba", "eval_interval=2ba", "data.proportions=null",
                       "save_interval=2ba", "export_dir=null"]) == 0
    capsys.readouterr()
    other = str(tiny["tmp"] / "other")
    refused(capsys, train_main([TINY_YAML, *paths(tiny, other), f"load_path={cont}/latest-rank0.pt"]), "load_path",
            "without pruning")
    refused(capsys, train_main([CONTINUE_YAML, *paths(tiny, other), "data.proportions=null", f"load_path={run}/latest-rank0.pt"]),
            "load_path", "holds masks")
    assert not os.path.exists(other)


# --------------------------------------------------------------------------------------------- shard files

class _Raises(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        from llmshearing.errors import ConfigError

        raise ConfigError("shard 'x/shard.00000.mds' is 3 bytes but its index.json says 9")


def test_shard_indexes_are_checked_at_start_and_a_damaged_cached_index_is_fetched_again(tiny, capsys):
    """A corrupt index.json, local or at the remote, is one line naming it from every entry point (it was a
    JSONDecodeError); a truncated shard file at a folder remote stops the start; a damaged or stale cached index
    is fetched again once the remote is good; an error raised in a dataloader worker is the same one line."""
    from llmshearing.data.layout import check_domains, read_manifest
    from llmshearing.data.remote import prepare_cache
    from llmshearing.errors import run_entry

    remote = str(tiny["tmp"] / "remote")
    shutil.copytree(tiny["shards"], remote)
    index = os.path.join(remote, "code", "eval", "index.json")
    good = open(index).read()
    cache = str(tiny["tmp"] / "cache")
    via_remote = ["data.shards=null", f"data.remote={remote}", f"data.local={cache}"]
    for damage in ("{not json", '{"version": 2}'):
        with open(index, "w") as f:
            f.write(damage)
        refused(capsys, train(tiny, f"data.shards={remote}"), index)
        refused(capsys, cli_main(["eval", tiny["model"], "--shards", remote, "--split", "eval"]), index)
        shutil.rmtree(cache, ignore_errors=True)
        refused(capsys, train(tiny, *via_remote), index)
        refused(capsys, cli_main(["eval", tiny["model"], "--remote", remote, "--local", cache, "--split", "eval"]), index)
        refused(capsys, cli_main(["reference-loss", "--model", tiny["model"], "--remote", remote, "--local", cache]),
                index)
        assert not os.path.exists(tiny["run"])
    with open(index, "w") as f:
        f.write(good)
    shard = os.path.join(remote, "prose", "prune", "shard.00000.mds")
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[:100])
    refused(capsys, train(tiny, *via_remote), shard, "truncated")
    with open(shard, "wb") as f:
        f.write(data)

    shutil.rmtree(cache, ignore_errors=True)
    prepare_cache(remote, cache)
    manifest = read_manifest(cache)
    check_domains(manifest, cache, ["code"], "eval", remote=remote)
    cached = os.path.join(cache, "code", "eval", "index.json")
    for damage in ("{not json", open(os.path.join(remote, "prose", "eval", "index.json")).read()):
        with open(cached, "w") as f:
            f.write(damage)
        check_domains(manifest, cache, ["code"], "eval", remote=remote)
        assert open(cached).read() == good
        assert "fetched it again" in capsys.readouterr().err

    def read_with_a_worker():
        for _ in torch.utils.data.DataLoader(_Raises(), num_workers=1):
            pass

    assert run_entry(read_with_a_worker) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: shard 'x/shard.00000.mds' is 3 bytes but its index.json says 9", err


# ------------------------------------------------------------------------------------------- other inputs

def test_target_takes_only_a_model_folder_or_its_config_json(tiny, capsys):
    """`llmshearing target` uses the model-folder checks of training: a yaml, a shard folder, a weights file, a
    broken config.json and a missing --gguf-file are each one line naming the path (they were tracebacks)."""
    recipe = os.path.join(REPO, TINY_YAML)
    weights = os.path.join(tiny["copy"], "model.safetensors")
    broken = str(tiny["tmp"] / "broken")
    shutil.copytree(tiny["model"], broken)
    with open(os.path.join(broken, "config.json"), "w") as f:
        f.write('{"model_type": "llama", ')
    for args, names in (([recipe], [recipe, "config.json"]), ([tiny["shards"]], [tiny["shards"], "config.json"]),
                        ([weights], [weights, "config.json"]), ([broken], [broken, "config.json"]),
                        ([tiny["model"], "--gguf-file", "model.gguf"], ["model.gguf", "does not exist"])):
        refused(capsys, cli_main(["target", *args, "--fraction", "0.5"]), *names)
    assert cli_main(["target", tiny["model"], "--fraction", "0.5"]) == 0
    assert cli_main(["target", os.path.join(tiny["model"], "config.json"), "--fraction", "0.5"]) == 0


def test_a_truncated_compressed_input_is_one_line(tiny, capsys):
    import bz2
    import gzip
    import lzma

    raw = open(tiny["prose"], "rb").read() * 4
    out = str(tiny["tmp"] / "shards")
    for name, data in (("p.jsonl.gz", gzip.compress(raw)), ("p.jsonl.bz2", bz2.compress(raw)),
                       ("p.jsonl.xz", lzma.compress(raw))):
        path = tiny["tmp"] / name
        path.write_bytes(data[:len(data) * 2 // 3])
        args = shards_args(tiny, out, f"prose={path}", f"code={tiny['code']}")
        args[args.index("--prune-tokens") + 1] = "10000000"  # read to the end, where the file is cut
        refused(capsys, shards_main(args), str(path), "truncated or damaged")
        assert not os.path.exists(out)


def test_shard_settings_that_would_build_something_useless(tiny, capsys):
    """Whitespace-only documents are no documents (they built shards of framing tokens); a --seq-len longer than the
    tokenizer's model's positions is refused before the build (training refused the shards later); --workers above
    the usable CPUs is capped, saying so."""
    out = str(tiny["tmp"] / "shards")
    blank = tiny["tmp"] / "blank.jsonl"
    blank.write_text("".join(json.dumps({"text": t}) + "\n" for t in (" ", "\n\n", "\t \n") * 50))
    refused(capsys, shards_main(shards_args(tiny, out, f"prose={blank}", f"code={tiny['code']}")), "prose",
            "no documents")
    with open(os.path.join(tiny["model"], "config.json")) as f:
        limit = json.load(f)["max_position_embeddings"]
    refused(capsys, shards_main(shards_args(tiny, out, f"prose={tiny['prose']}", seq_len=str(limit + 1))),
            "--seq-len", "max_position_embeddings")
    assert not os.path.exists(out)
    assert shards_main(shards_args(tiny, out, f"prose={tiny['prose']}", f"code={tiny['code']}")
                       + ["--workers", "1000"]) == 0
    from llmshearing.data_prep.shards import _cpu_count

    assert f"using {_cpu_count()}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_continued_run_that_changes_its_objective_says_so(tiny, capsys):
    """Distillation switched on at autoresume, or load_path into a new folder with another target: allowed, with a
    note (the objective changes at the resumed batch; it changed silently)."""
    common = ["eval_interval=2ba", "save_interval=2ba", "export_dir=null", "save_overwrite=false"]
    assert train(tiny, *common, "max_duration=2ba") == 0
    capsys.readouterr()
    assert train(tiny, *common, "max_duration=3ba", "autoresume=true", "distill.alpha=0.5") == 0
    err = capsys.readouterr().err
    assert "note:" in err and "distill=None" in err and "objective changes" in err, err
    other = "pruning.target={num_hidden_layers: 2, hidden_size: 48, num_attention_heads: 2, num_key_value_heads: 1, intermediate_size: 64}"
    assert train_main([TINY_YAML, *paths(tiny, str(tiny["tmp"] / "new")), *common, "max_duration=4ba", other,
                       f"load_path={tiny['run']}/latest-rank0.pt"]) == 0
    err = capsys.readouterr().err
    assert "note:" in err and "continues toward" in err and "'num_hidden_layers': 2" in err, err


def test_a_remote_with_a_trailing_slash_is_the_same_remote(tiny):
    """`data.remote=<folder>/` was called "another remote" than the cache it had filled as `<folder>`."""
    from llmshearing.train.config import load_config

    cache = str(tiny["tmp"] / "cache")
    for remote in (tiny["shards"], tiny["shards"] + "/", tiny["shards"] + "//"):
        cfg = load_config(TINY_YAML, paths(tiny, tiny["run"]) + ["data.shards=null", f"data.remote={remote}",
                                                                  f"data.local={cache}"])
        assert cfg.data.remote == tiny["shards"]


@pytest.mark.parametrize("family, norms", [("gemma2", "GemmaNorms"), ("pythia", "LayerNorms")])
def test_hidden_mask_original_is_refused_where_the_norms_are_not_rmsnorm(tiny, capsys, family, norms):
    """`pruning.hidden_mask=original` folds the gate into RMSNorm weights (the released code's Llama): Gemma's
    (1 + weight) norms and GPT-NeoX's LayerNorms with bias are refused at validation, naming the key."""
    from llmshearing.experiments.tiny import random_model

    model = tiny["tmp"] / family
    random_model(family).save_pretrained(model)
    for name in os.listdir(tiny["model"]):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(tiny["model"], name), model)
    refused(capsys, train(tiny, "pruning.hidden_mask=original", model=str(model)),
            "pruning.hidden_mask=original", norms, "use residual")
    assert not os.path.exists(tiny["run"])
