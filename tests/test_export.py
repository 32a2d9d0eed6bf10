"""Exports: what they read (only the student's tensors), what they hold (one layer, not a model), what they write
(Hugging Face safetensors, sharded like HF, stock configs, a model card; GGUF read back by transformers), and a
full disk."""
import json
import os
import resource
import shutil
import subprocess
import tempfile
import weakref

import pytest
import torch
from conftest import BIN, ENV, REPO, TINY_YAML, paths, run
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmshearing.compat import checkpoint_state
from llmshearing.errors import ConfigError
from llmshearing.experiments.tiny import random_model, tiny_config
from llmshearing.train.composer_model import student_state
from llmshearing.model.loading import from_pretrained
from llmshearing.pruning.export import finalize, save_hf
from llmshearing.train.export_run import export_checkpoint, recipe_dtype
from llmshearing.pruning.gguf_export import _permute, convert
from llmshearing.pruning import target as target_module
from llmshearing.pruning.oneshot import oneshot_prune
from llmshearing.train.builders import build_model
from llmshearing.train.restore import open_checkpoint
from llmshearing.train.run import main as train_main

WIDE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6)  # layers outweigh the 384-token embedding
WIDE_TARGET = {"num_hidden_layers": 4, "hidden_size": 96, "num_attention_heads": 2, "num_key_value_heads": 2,
               "intermediate_size": 128}
SAMPLE = "the quick brown fox jumps over the lazy dog and then some more words about the river"


def model_folder(tiny_setup, folder, family, tokenizer=None, **overrides):
    """A random model of `family` (config overrides allowed) with the tiny tokenizer (or `tokenizer`), saved as an
    HF folder."""
    torch.manual_seed(0)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(tiny_setup["model"])
    if overrides:
        model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=len(tokenizer), **overrides))
    else:
        model = random_model(family, len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pruned_run(tiny_setup, tmp_path_factory):
    """A pruning run with a distillation teacher of a 6-layer, 128-wide model: its final monolithic checkpoint
    (student, masks, teacher, AdamW state) and its end-of-run export."""
    root = tmp_path_factory.mktemp("export")
    source = model_folder(tiny_setup, str(root / "source"), "llama-mha", **WIDE)
    folder = str(root / "run")
    target = [f"pruning.target.{k}={v}" for k, v in WIDE_TARGET.items()]
    reads = []  # every model config read and every target resolved during the run (counted, not replaced)
    config_from_pretrained, resolve = AutoConfig.from_pretrained.__func__, target_module.resolve_target
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoConfig, "from_pretrained", classmethod(
            lambda cls, path, *a, **kw: reads.append(("config", os.path.realpath(str(path))))
            or config_from_pretrained(cls, path, *a, **kw)))
        mp.setattr(target_module, "resolve_target", lambda *a: reads.append(("target",)) or resolve(*a))
        assert train_main([TINY_YAML, *paths(tiny_setup, folder), f"model.path={source}", *target, "max_duration=4ba",
                           "save_interval=4ba", "eval_interval=2ba", "data.num_workers=0", "distill.alpha=0.5"]) == 0
    return {"root": root, "folder": folder, "checkpoint": os.path.join(folder, "ep0-ba4-rank0.pt"),
            "export": os.path.join(folder, "export"), "source": source, "tiny_setup": tiny_setup, "reads": reads}


def test_a_run_reads_its_source_config_and_resolves_its_target_once(pruned_run):
    """Validation, the run-folder binding, the student, the teacher (distill.teacher=source), the masks and the
    end-of-run export all use TrainConfig.source_config / target_shape: one read each per run (issue 24)."""
    reads = pruned_run["reads"]
    assert reads.count(("config", os.path.realpath(pruned_run["source"]))) == 1, reads
    assert reads.count(("target",)) == 1, reads


def todays_export(checkpoint):
    """The export of the whole masked model in memory: the whole checkpoint read, the model rebuilt and loaded,
    finalize() of it. The streaming paths (tensor by tensor from the checkpoint, layer by layer under FSDP) must equal
    it bit for bit; finalize shares their fold (dense_tensors), so the fold itself is proven elsewhere: masked ==
    sliced == exported logits (tests/test_model.py) and the meta-device slicing (tests/test_devices.py)."""
    cfg, _ = open_checkpoint(checkpoint)
    model = build_model(cfg, load_weights=False)
    model.load_state_dict(student_state(checkpoint_state(checkpoint)["model"]), strict=True)
    dense, _ = finalize(model.model, model.l0)
    state = dense.state_dict()
    if dense.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def weights(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_checkpoint_and_end_of_run_exports_equal_todays_export_bit_for_bit(pruned_run, tmp_path):
    out = str(tmp_path / "x")
    export_checkpoint(pruned_run["checkpoint"], out)
    reference = todays_export(pruned_run["checkpoint"])
    assert_bit_identical(weights(out), reference)
    assert_bit_identical(weights(pruned_run["export"]), reference)  # the end-of-run export of the live model


@pytest.mark.slow
def test_export_of_a_run_whose_source_moved_says_what_to_pass(pruned_run, tmp_path):
    """The checkpoint holds the weights; the source folder gives config.json and the tokenizer. Moved since the
    run: one line naming it and --model-path (nothing written); with --model-path, the same export."""
    moved = str(tmp_path / "moved-source")
    shutil.move(pruned_run["source"], moved)
    try:
        out = str(tmp_path / "x")
        proc = run([os.path.join(BIN, "llmshearing"), "export", pruned_run["checkpoint"], out])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "--model-path" in proc.stderr and pruned_run["source"] in proc.stderr
        assert not os.path.exists(out)
        proc = run([os.path.join(BIN, "llmshearing"), "export", pruned_run["checkpoint"], out, "--model-path",
                    str(tmp_path / "nowhere")])
        assert proc.returncode == 2 and "--model-path names a folder that does not exist" in proc.stderr
        other = model_folder(pruned_run["tiny_setup"], str(tmp_path / "other"), "llama-mha", **{**WIDE, "num_hidden_layers": 8})
        with pytest.raises(ConfigError, match="does not fit the model of its run config"):
            export_checkpoint(pruned_run["checkpoint"], out, model_path=other)
        assert not os.path.exists(out)
        export_checkpoint(pruned_run["checkpoint"], out, model_path=moved)
        assert_bit_identical(weights(out), weights(pruned_run["export"]))
    finally:
        shutil.move(moved, pruned_run["source"])


@pytest.mark.slow
def test_export_needs_no_optimizer_or_teacher_and_no_temporary_folder(pruned_run, tmp_path, monkeypatch):
    """A checkpoint with the optimizer state and the teacher taken out exports the same model, and the export
    writes nothing to the system temporary folder (pointed at a path that cannot be created)."""
    state = checkpoint_state(pruned_run["checkpoint"])
    assert any(k.startswith("teacher.") for k in state["model"]) and state["optimizers"]["AdamW"]["state"]
    state["model"] = student_state(state["model"])
    state["optimizers"] = {}
    stripped = str(tmp_path / "stripped.pt")
    torch.save({"state": state}, stripped)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir" / "tmp"))
    export_checkpoint(stripped, str(tmp_path / "a"))
    export_checkpoint(pruned_run["checkpoint"], str(tmp_path / "b"))
    assert_bit_identical(weights(str(tmp_path / "a")), weights(str(tmp_path / "b")))
    assert not os.path.exists(str(tmp_path / "no-such-dir"))


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage that torch ops allocate while it is active, until the last tensor
    using it is gone, and keeps the peak. Storages it did not see allocated (a memory-mapped checkpoint, DCP's
    read buffers, safetensors' reads) are not counted: those are the checkpoint reading buffers."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _drop(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self.live:
                if key in seen:
                    continue  # a view of a storage allocated elsewhere
                self.live[key] = [t.untyped_storage().nbytes(), 0]
                self.now += self.live[key][0]
                self.peak = max(self.peak, self.now)
            self.live[key][1] += 1
            weakref.finalize(t, self._drop, key)
        return out


@pytest.mark.slow
def test_export_holds_one_layer_not_a_model(pruned_run, tmp_path):
    """The tensors alive at once during `llmshearing export` (measured by LiveTensorBytes) stay within one source
    layer plus one target layer: the export is streamed to disk, the source read a tensor at a time."""
    state = student_state(checkpoint_state(pruned_run["checkpoint"])["model"])
    nbytes = lambda prefix: sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith(prefix))  # noqa: E731
    source_layer = nbytes("model.model.layers.0.")
    source_model = nbytes("model.")
    exported = weights(pruned_run["export"])
    target_layer = sum(v.numel() * v.element_size() for k, v in exported.items() if k.startswith("model.layers.0."))
    target_model = sum(v.numel() * v.element_size() for v in exported.values())
    embedding = nbytes("model.model.embed_tokens.")
    with LiveTensorBytes() as live:
        export_checkpoint(pruned_run["checkpoint"], str(tmp_path / "x"))
    bound = max(source_layer, embedding) + target_layer
    print(f"\nexport host peak: {live.peak:,} B tracked; source layer {source_layer:,} B, target layer "
          f"{target_layer:,} B, embedding {embedding:,} B, target model {target_model:,} B, source model "
          f"{source_model:,} B")
    assert live.peak <= bound, (live.peak, bound)
    assert live.peak < target_model / 2  # no model copy


@pytest.mark.slow
def test_sharded_export_reloads_with_transformers_and_safetensors(pruned_run, tmp_path):
    """--max-shard-size splits the weights like Hugging Face (model-0000k-of-0000n + index); transformers and
    safetensors read back the single-file export's tensors; --dtype bfloat16 overrides the recipe's fp32."""
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    export_checkpoint(pruned_run["checkpoint"], one)
    proc = run([os.path.join(BIN, "llmshearing"), "export", pruned_run["checkpoint"], many, "--max-shard-size",
                "150KB"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(many, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(n for n in os.listdir(many) if n.endswith(".safetensors")) == files
    assert not os.path.exists(os.path.join(many, "model.safetensors"))
    for name in files:
        assert os.path.getsize(os.path.join(many, name)) <= 150_000 + 4096  # + header
    direct = {}
    for name in files:
        with safe_open(os.path.join(many, name), framework="pt") as f:
            direct.update({k: f.get_tensor(k) for k in f.keys()})
    assert_bit_identical(direct, weights(one))
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in direct.values())
    a, b = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (one, many))
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    half = str(tmp_path / "bf16")
    export_checkpoint(pruned_run["checkpoint"], half, dtype="bfloat16")
    assert {v.dtype for v in weights(half).values()} == {torch.bfloat16}
    assert json.load(open(os.path.join(half, "config.json")))["torch_dtype"] == "bfloat16"
    assert json.load(open(os.path.join(one, "config.json")))["torch_dtype"] == "float32"  # the recipe's fp32


def test_recipe_precision_is_the_default_export_dtype():
    class Cfg:
        precision = "amp_bf16"

    assert recipe_dtype(Cfg) == torch.bfloat16
    Cfg.precision = "fp32"
    assert recipe_dtype(Cfg) == torch.float32


@pytest.mark.slow
def test_model_card_and_generation_config(pruned_run):
    with open(os.path.join(pruned_run["export"], "README.md")) as f:
        card = f.read()
    assert "Tokens pruned" in card and "1,024" in card  # 4 batches x 4 sequences x 64 tokens
    assert "Final domain weights: prose" in card and "Eval perplexity per domain" in card
    assert "layers kept" in card and "llama.cpp, Ollama, vLLM: not run" in card
    with open(os.path.join(pruned_run["folder"], "domain_weights.json")) as f:
        final = json.load(f)
    assert f"prose {final['prose']:.3f}" in card
    with open(os.path.join(pruned_run["source"], "generation_config.json")) as f:
        source_generation = json.load(f)
    with open(os.path.join(pruned_run["export"], "generation_config.json")) as f:
        assert json.load(f) == source_generation


def failing_write(args, limit_bytes):
    """Run `llmshearing <args>` with files capped at `limit_bytes` (RLIMIT_FSIZE; writes past it fail with EFBIG)."""
    def cap():
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([os.path.join(BIN, "llmshearing"), *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300, preexec_fn=cap)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_nothing(pruned_run, tmp_path):
    out = str(tmp_path / "x")
    proc = failing_write(["export", pruned_run["checkpoint"], out], 100_000)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "full" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == []
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        return  # not root, or no mount in this container: the file-size cap above is the check
    try:
        proc = run([os.path.join(BIN, "llmshearing"), "export", pruned_run["checkpoint"], str(mount / "x")])
        assert proc.returncode == 2 and "No space left" in proc.stderr, proc.stderr[-3000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("family", ["llama-mha", "smollm2-gqa", "mistral", "qwen2", "phi3", "pythia"])
def test_exported_config_has_only_stock_fields(tiny_setup, tmp_path, family):
    folder = model_folder(tiny_setup, str(tmp_path / "src"), family)
    save_hf(from_pretrained(folder, attn_impl="sdpa"), str(tmp_path / "x"))
    with open(tmp_path / "x" / "config.json") as f:
        config = json.load(f)
    stock = set(AutoConfig.for_model(config["model_type"]).to_dict()) | {"head_dim"}
    assert set(config) <= stock, set(config) - stock
    assert config["head_dim"] == 16 and config["torch_dtype"] == "float32"
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "x"))


# ----------------------------------------------------------------------------------------------------- GGUF
GGUF_CASES = {  # case -> (family, config overrides, target): the Qwen2 target keeps hidden/heads == head_dim
    "llama-mha": ("llama-mha", {}, {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 2,
                                    "num_key_value_heads": 2, "intermediate_size": 64}),
    "smollm2-gqa": ("smollm2-gqa", {}, {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 2,
                                        "num_key_value_heads": 1, "intermediate_size": 64}),
    "mistral": ("mistral", {"sliding_window": None}, {"num_hidden_layers": 3, "hidden_size": 48,
                                                      "num_attention_heads": 2, "num_key_value_heads": 1,
                                                      "intermediate_size": 64}),
    "qwen2": ("qwen2", {}, {"num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 2,
                            "num_key_value_heads": 1, "intermediate_size": 64}),
    "llama-2-spm": ("llama-mha", {}, {"num_hidden_layers": 2, "hidden_size": 48, "num_attention_heads": 2,
                                      "num_key_value_heads": 2, "intermediate_size": 64}),
}
# a leading space, double spaces, a tab, digits and characters outside the vocabulary (byte fallback)
SPM_SAMPLE = " the quick brown fox ü→日本  jumps\n\tdef f(): return 42"


def spm_tokenizer(tiny_setup, folder, model_type="bpe"):
    """A Llama-2-style SentencePiece tokenizer (BPE, byte fallback, split digits, '▁' prefix; <unk> <s> </s>)
    trained on the tiny setup's text, as transformers' LlamaTokenizerFast."""
    import sentencepiece as spm
    from transformers import LlamaTokenizerFast

    texts = [json.loads(line)["text"] for name in ("prose", "code") for line in open(tiny_setup[name])]
    os.makedirs(folder, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=os.path.join(folder, "sp"), model_type=model_type, vocab_size=512,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 16,
        num_threads=1, minloglevel=2)
    return LlamaTokenizerFast(vocab_file=os.path.join(folder, "sp.model"), add_prefix_space=True, legacy=True)


# max |logit difference| to the HF export; these random models' logits have std ~0.14 (observed: f32 0, f16 <=2.2e-4,
# bf16 <=2.5e-3, q8_0 <=4.6e-3 over the four families)
TOLERANCE = {"f32": 1e-5, "f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}


def pruned_export(tiny_setup, tmp_path, case):
    family, overrides, target = GGUF_CASES[case]
    tokenizer = spm_tokenizer(tiny_setup, str(tmp_path / "spm")) if case == "llama-2-spm" else None
    source = model_folder(tiny_setup, str(tmp_path / "src"), family, tokenizer, **overrides)
    out = str(tmp_path / "pruned")
    oneshot_prune(source, target, out)
    return out


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_of_a_pruned_export_reads_back_in_transformers(tiny_setup, tmp_path, case):
    """`llmshearing convert --to gguf` of a pruned export: transformers' GGUF reader gives the same config dims,
    token ids and logits (f32 to 1e-5; f16, bf16 and q8_0 within their rounding), q/k permuted for llama.cpp."""
    out = pruned_export(tiny_setup, tmp_path, case)
    family, sample = GGUF_CASES[case][0], SPM_SAMPLE if case == "llama-2-spm" else SAMPLE
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits
    for dtype in ("f32", "f16", "bf16", "q8_0"):
        name = f"model-{dtype}.gguf"
        convert(out, dtype, os.path.join(out, name))
        g = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, torch_dtype=torch.float32).eval()
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size", "tie_word_embeddings"):
            assert getattr(g.config, key) == getattr(hf.config, key), (dtype, key)
        for key in ("rope_theta", "rms_norm_eps"):  # GGUF stores float32
            assert getattr(g.config, key) == pytest.approx(getattr(hf.config, key), rel=1e-6), (dtype, key)
        assert g.config.head_dim == hf.config.head_dim if family != "qwen2" else True
        gt = AutoTokenizer.from_pretrained(out, gguf_file=name)
        assert gt(sample, add_special_tokens=False)["input_ids"] == ids
        with torch.no_grad():
            got = g(torch.tensor([ids])).logits
        diff = float((got - expected).abs().max())
        assert diff <= TOLERANCE[dtype], (dtype, diff)
        if dtype == "f32":
            assert diff <= 1e-5
    if case == "llama-2-spm":
        assert_llama_2_tokenizer(os.path.join(out, "model-f32.gguf"), str(tmp_path / "spm" / "sp.model"), tokenizer,
                                 AutoTokenizer.from_pretrained(out, gguf_file="model-f32.gguf"))


def assert_llama_2_tokenizer(gguf_file, sp_model, tokenizer, gt):
    """The GGUF `llama` tokenizer of a SentencePiece export: the HF tokenizer and the read-back one give
    SentencePiece's own ids (byte fallback, leading space) and BOS, the file has its types and its score order."""
    import sentencepiece as spm
    from gguf import GGUFReader, TokenType

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    ids = sp.encode(SPM_SAMPLE)
    assert tokenizer(SPM_SAMPLE, add_special_tokens=False)["input_ids"] == ids
    assert sum(t.startswith("<0x") for t in tokenizer.convert_ids_to_tokens(ids)) >= 8  # ü → 日本 and the tab
    assert gt(SPM_SAMPLE)["input_ids"] == tokenizer(SPM_SAMPLE)["input_ids"] == [sp.bos_id(), *ids]
    assert gt.decode(ids) == tokenizer.decode(ids) == SPM_SAMPLE
    fields = GGUFReader(gguf_file).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    types, scores = fields["tokenizer.ggml.token_type"].contents(), fields["tokenizer.ggml.scores"].contents()
    n = sp.get_piece_size()
    assert types[:3] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    assert [i for i in range(n) if types[i] == TokenType.BYTE] == [i for i in range(n) if sp.is_byte(i)]
    assert len([i for i in range(n) if sp.is_byte(i)]) == 256
    normal = [i for i in range(n) if types[i] == TokenType.NORMAL]  # llama.cpp merges by these scores
    order = sorted(normal, key=sp.get_score, reverse=True)
    assert len(normal) == n - 259 and all(scores[a] > scores[b] for a, b in zip(order, order[1:]))


def test_gguf_refuses_a_sentencepiece_unigram_tokenizer(tiny_setup, tmp_path):
    """llama.cpp's `llama` tokenizer merges pairs by score (SentencePiece BPE); a unigram model would split
    otherwise, so it is refused before anything is written."""
    from llmshearing.pruning.gguf_export import tokenizer_spec

    tokenizer = spm_tokenizer(tiny_setup, str(tmp_path), "unigram")
    with pytest.raises(ConfigError, match=r"GGUF export refused: the tokenizer \(Unigram with byte fallback"):
        tokenizer_spec(tokenizer, len(tokenizer))


def test_gguf_without_the_gguf_package_is_one_line(tiny_setup, monkeypatch):
    """gguf is an optional extra: without it a GGUF export is refused naming the extra, not an ImportError."""
    import sys

    from llmshearing.pruning.gguf_export import check_gguf

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(ConfigError, match=r"llmshearing\[gguf\]"):
        check_gguf(tiny_config("llama-mha"), AutoTokenizer.from_pretrained(tiny_setup["model"]), "f16")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gguf_refuses_gemma_naming_why(tiny_setup, family):
    """transformers 4.53 reads gemma2/gemma3 GGUF, but not what a (pruned) Gemma needs: one line saying what."""
    from llmshearing.pruning.gguf_export import check_gguf

    pytest.importorskip("gguf")
    with pytest.raises(ConfigError, match="GGUF export refused: .*drops query_pre_attn_scalar, the soft-caps and the "
                                          "per-layer layer_types") as e:
        check_gguf(tiny_config(family), AutoTokenizer.from_pretrained(tiny_setup["model"]), "f16")
    assert "\n" not in str(e.value)


def test_gguf_q_k_permutation_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(6 * 16, 40).numpy()
    for heads, kv in ((6, 6), (6, 2)):
        rows = kv * 16
        back = LlamaTensorProcessor({"num_attention_heads": heads, "num_key_value_heads": kv})._reverse_permute_weights(
            _permute(w[:rows], kv), heads, kv)
        assert (back == w[:rows]).all()
        assert not (_permute(w[:rows], kv) == w[:rows]).all()


@pytest.mark.slow  # `llmshearing convert` in a subprocess
@pytest.mark.parametrize("family, target, why", [
    ("mistral", GGUF_CASES["mistral"][2], "sliding_window=24"),
    ("qwen2", GGUF_CASES["smollm2-gqa"][2], "head_dim 16 != hidden_size/num_attention_heads"),
    ("qwen3", GGUF_CASES["qwen2"][2], "cannot read it"),  # transformers 4.53 has no qwen3 GGUF reader
    ("pythia", {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 3},
     "cannot read it"),  # no gpt_neox GGUF reader in transformers 4.53
    ("phi3", GGUF_CASES["qwen2"][2], "drops partial rotary"),
])
def test_gguf_refuses_what_it_cannot_carry(tiny_setup, tmp_path, family, target, why):
    source = model_folder(tiny_setup, str(tmp_path / "src"), family)
    out = str(tmp_path / "pruned")
    oneshot_prune(source, target, out)
    proc = run([os.path.join(BIN, "llmshearing"), "convert", out, "--to", "gguf"])
    assert proc.returncode == 2 and why in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not any(n.endswith(".gguf") or ".tmp-" in n for n in os.listdir(out))
    with pytest.raises(ConfigError, match="GGUF export refused"):
        convert(out)


@pytest.mark.slow
def test_export_format_gguf_writes_model_gguf_beside_the_hf_files(pruned_run, tmp_path):
    out = str(tmp_path / "x")
    proc = run([os.path.join(BIN, "llmshearing"), "export", pruned_run["checkpoint"], out, "--format", "gguf",
                "--gguf-dtype", "f32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    g = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", torch_dtype=torch.float32).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(g(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    with open(os.path.join(out, "README.md")) as f:
        assert "`model.gguf` (f32)" in f.read()
    shutil.rmtree(out)
