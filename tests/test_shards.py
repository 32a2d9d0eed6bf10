"""The per-domain MDS shard builder (data_prep/shards.py) against the layout contract (llmshearing/data/layout.py)."""
import glob
import gzip
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest

from llmshearing.data_prep import shards as builder
from llmshearing.errors import ConfigError
from llmshearing.data.layout import FORMAT, open_split, read_manifest, REDPAJAMA_PROPORTIONS, SPLITS, tokens_of

from conftest import REPO

WORDS = ("the of and to in is was for on that with as by at from it an be this which or are were has "
         "river stone light window garden paper music signal market engine forest winter number table").split()
SIZES = dict(seq_len=32, eval_sequences=8, prune_tokens=2000, continue_tokens=3000)


def doc(i: int, rng: random.Random) -> str:
    return f"Document {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25)))


def write_jsonl(path, texts, opener=open):
    with opener(path, "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Domain `a`: a jsonl and a .gz jsonl (90 docs); domain `b`: a folder of one jsonl and .txt files."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    a = [doc(i, rng) for i in range(90)]
    b = [doc(i, rng) for i in range(60)]
    files_a = [write_jsonl(root / "a1.jsonl", a[:50]), write_jsonl(root / "a2.jsonl.gz", a[50:], gzip.open)]
    os.makedirs(root / "b")
    write_jsonl(root / "b" / "00.jsonl", b[:40])
    for i, text in enumerate(b[40:]):  # a plain text file is one document
        (root / "b" / f"{i + 1:02d}.txt").write_text(text)
    (root / "b" / ".hidden.txt").write_text("not read")
    return {"a": files_a, "b": [str(root / "b")]}, {"a": a, "b": b}


@pytest.fixture(scope="module")
def tok_dir(tiny_setup):
    return tiny_setup["model"]


@pytest.fixture(scope="module")
def bos_tok_dir(tiny_setup, tmp_path_factory):
    """The tiny tokenizer with a bos token different from eos."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_setup["model"])
    tok.add_special_tokens({"bos_token": "<s>"})
    out = str(tmp_path_factory.mktemp("bos_tok"))
    tok.save_pretrained(out)
    return out


def build(out, tok, domains, **kw):
    return builder.build_shards(str(out), tok, domains, **{**SIZES, "progress": False, "workers": 1, **kw})


def stored(root, domain, split) -> list[int]:
    data = open_split(str(root), domain, split)
    return [int(t) for i in range(len(data)) for t in tokens_of(data[i])]


def expected_streams(framed, wanted, seq_len, every):
    """The documented routing rule, written out independently of the builder."""
    streams = {s: [] for s in SPLITS}
    full = lambda s: len(streams[s]) // seq_len >= wanted[s]  # noqa: E731
    for i, ids in enumerate(framed):
        held = [s for s in ("eval", "test") if not full(s)]
        if held and (i % every == 0 or full("prune")):
            split = held[0]
        elif held and i % every == every // 2:
            split = held[-1]
        elif not full("prune"):
            split = "prune"
        elif not full("continue"):
            split = "continue"
        else:
            break
        streams[split] += ids
    return {s: streams[s][: min(len(streams[s]) // seq_len, wanted[s]) * seq_len] for s in SPLITS}


@pytest.mark.parametrize("which", ["eos only", "bos and eos"])
def test_round_trip_disjoint_and_counts(corpus, tok_dir, bos_tok_dir, tmp_path, which):
    from transformers import AutoTokenizer

    paths, texts = corpus
    tok_path = tok_dir if which == "eos only" else bos_tok_dir
    props = {"a": 0.7, "b": 0.3}
    m = build(tmp_path / "s", tok_path, paths, proportions=props)
    tok = AutoTokenizer.from_pretrained(tok_path)
    bos = [tok.bos_token_id] if which == "bos and eos" else []
    assert (m["framing"]["bos"] is None) == (which == "eos only")
    seq = SIZES["seq_len"]
    for d in paths:
        entry = m["domains"][d]
        wanted = {"eval": SIZES["eval_sequences"], "test": SIZES["eval_sequences"], "prune": math.ceil(SIZES["prune_tokens"] * props[d] / seq),
                  "continue": math.ceil(SIZES["continue_tokens"] * props[d] / seq)}
        assert entry["wanted"] == wanted and not entry["short"]
        framed = [bos + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts[d]]
        want = expected_streams(framed, wanted, seq, entry["eval_every"])
        seen = {}
        for s in SPLITS:
            got = stored(tmp_path / "s", d, s)
            assert got == want[s], (d, s)  # exactly the framed documents routed to s, in order
            assert entry["splits"][s] == {"sequences": wanted[s], "tokens": wanted[s] * seq}
            assert len(open_split(str(tmp_path / "s"), d, s)) == wanted[s]
            seen[s] = {int(i) for i in re.findall(r"Document (\d+):", tok.decode(got))}
        assert seen["eval"] and seen["test"] and not seen["eval"] & seen["test"]  # document-disjoint
        assert not (seen["eval"] | seen["test"]) & (seen["prune"] | seen["continue"])
        assert not seen["prune"] & seen["continue"]
        every = entry["eval_every"]
        assert min(seen["eval"]) == 0 and every in seen["eval"]  # spread: every k-th document
        assert min(seen["test"]) == every // 2 and every + every // 2 in seen["test"]
        assert every == max(2, (2 * wanted["eval"] + wanted["prune"]) // (2 * wanted["eval"]))
    assert m["format"] == FORMAT and m["dtype"] == "uint16" and read_manifest(str(tmp_path / "s")) == m
    assert m["tokenizer"]["vocab_size"] == len(tok) and m["proportions"] == props
    assert m["budgets"] == {"eval_sequences": 8, "test_sequences": 8, "prune_tokens": 2000, "continue_tokens": 3000}


@pytest.mark.slow
def test_two_workers_same_shards(corpus, tok_dir, tmp_path):
    """Tokenized by 2 processes or in this one: the same folder, byte for byte (MDS shards, indexes, manifest)."""
    paths, _ = corpus
    one = build(tmp_path / "one", tok_dir, paths)
    two = build(tmp_path / "two", tok_dir, paths, workers=2)
    assert one == two
    files = sorted(str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert any(f.endswith(".mds") for f in files)
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    for d in paths:
        for s in SPLITS:
            assert stored(tmp_path / "one", d, s) == stored(tmp_path / "two", d, s)
    assert one["proportions"] == {"a": 0.5, "b": 0.5}


def test_eval_and_prune_do_not_depend_on_the_continue_budget(corpus, tok_dir, tmp_path):
    paths, _ = corpus
    small = build(tmp_path / "small", tok_dir, paths, continue_tokens=0)
    big = build(tmp_path / "big", tok_dir, paths)
    for d in paths:
        assert small["domains"][d]["splits"]["continue"]["sequences"] == 0
        assert big["domains"][d]["splits"]["continue"]["sequences"] == math.ceil(1500 / SIZES["seq_len"])
        for s in ("eval", "test", "prune"):
            assert stored(tmp_path / "small", d, s) == stored(tmp_path / "big", d, s)
    with pytest.raises(ConfigError, match="holds no sequences"):
        open_split(str(tmp_path / "small"), "a", "continue")


def test_idempotent_then_changed_arguments(corpus, tok_dir, tmp_path, capsys):
    paths, _ = corpus
    out = tmp_path / "s"
    first = build(out, tok_dir, paths)
    stamp = os.stat(out / "manifest.json").st_mtime_ns
    capsys.readouterr()
    assert build(out, tok_dir, paths) == first
    assert "up to date" in capsys.readouterr().out
    assert os.stat(out / "manifest.json").st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="different arguments.*--overwrite"):
        build(out, tok_dir, paths, seq_len=16)
    assert os.stat(out / "manifest.json").st_mtime_ns == stamp and read_manifest(str(out)) == first
    assert len(open_split(str(out), "a", "prune")) == first["domains"]["a"]["splits"]["prune"]["sequences"]
    second = build(out, tok_dir, paths, seq_len=16, overwrite=True)
    assert second["seq_len"] == 16 and read_manifest(str(out)) == second
    assert sorted(os.listdir(tmp_path)) == ["s"]  # no temporary folder left beside it


def test_refuses_to_replace_a_folder_that_is_not_shards(corpus, tok_dir, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "precious.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a shard folder"):
        build(tmp_path / "s", tok_dir, corpus[0], overwrite=True)
    assert os.listdir(tmp_path / "s") == ["precious.txt"]


@pytest.mark.slow
@pytest.mark.parametrize("case, match", [
    ("empty domain", "domain 'empty' has no documents"),
    ("missing file", "domain 'a': input .*nope.jsonl' does not exist"),
    ("proportions sum", "sum to 0.9"),
    ("unknown domain", "unknown domain.*zz"),
    ("too little text", "domain 'tiny' has too little text"),
    ("bad jsonl", r"bad.jsonl:2: not a json object"),
])
def test_bad_input_is_refused_and_nothing_written(corpus, tok_dir, tmp_path, case, match):
    paths, _ = corpus
    inputs, kw = dict(paths), {}
    if case == "empty domain":
        (tmp_path / "empty.jsonl").write_text("\n\n")
        inputs["empty"] = [str(tmp_path / "empty.jsonl")]
    elif case == "missing file":
        inputs["a"] = [str(tmp_path / "nope.jsonl")]
    elif case == "proportions sum":
        kw["proportions"] = {"a": 0.5, "b": 0.4}
    elif case == "unknown domain":
        kw["proportions"] = {"a": 0.5, "b": 0.25, "zz": 0.25}
    elif case == "too little text":  # found by a worker process: the error crosses the pool
        inputs["tiny"] = [write_jsonl(tmp_path / "tiny.jsonl", ["Document 0: a few words"])]
        kw["workers"] = 2
    elif case == "bad jsonl":
        (tmp_path / "bad.jsonl").write_text('{"text": "Document 0: fine"}\n{"txt": "no"}\n')
        inputs["bad"] = [str(tmp_path / "bad.jsonl")]
    before = set(os.listdir(tmp_path))
    with pytest.raises(ConfigError, match=match):
        build(tmp_path / "out", tok_dir, inputs, **kw)
    assert set(os.listdir(tmp_path)) == before  # no output, no temporary folder


def test_short_domain_is_flagged(corpus, tok_dir, tmp_path, capsys):
    paths, texts = corpus
    small = write_jsonl(tmp_path / "small.jsonl", texts["b"][:12])
    m = build(tmp_path / "s", tok_dir, {"a": paths["a"], "small": [small]})
    entry = m["domains"]["small"]
    assert entry["short"] and not m["domains"]["a"]["short"]
    assert entry["documents_used"] == 12 and sum(entry["documents"].values()) == 12
    got = {s: entry["splits"][s]["sequences"] for s in SPLITS}
    assert got["eval"] >= 1 and got["prune"] >= 1 and got["continue"] < entry["wanted"]["continue"]
    assert all(len(open_split(str(tmp_path / "s"), "small", s)) == got[s] for s in SPLITS if got[s])
    assert "warning: domain 'small' ran out of text" in capsys.readouterr().err


def test_proportions_rules():
    rp = list(REDPAJAMA_PROPORTIONS)
    assert builder.resolve_proportions(rp[::-1]) == REDPAJAMA_PROPORTIONS
    assert builder.resolve_proportions(["x", "y", "z", "w"]) == {d: 0.25 for d in "xyzw"}
    with pytest.raises(ConfigError, match="lack domain"):
        builder.resolve_proportions(["x", "y"], {"x": 1.0})
    with pytest.raises(ConfigError, match=">= 0"):
        builder.resolve_proportions(["x", "y"], {"x": 1.5, "y": -0.5})


def test_redpajama_layout(tmp_path):
    for d in REDPAJAMA_PROPORTIONS:
        os.makedirs(tmp_path / d / "sub")
        write_jsonl(tmp_path / d / "sub" / "b.jsonl", ["x"])
        write_jsonl(tmp_path / d / "a.jsonl", ["x"])
        (tmp_path / d / "README").write_text("skipped")
    domains = builder.redpajama_domains(str(tmp_path))
    assert sorted(domains) == sorted(REDPAJAMA_PROPORTIONS)
    assert domains["c4"] == [str(tmp_path / "c4" / "a.jsonl"), str(tmp_path / "c4" / "sub" / "b.jsonl")]
    os.rename(tmp_path / "github", tmp_path / "gh")
    os.rename(tmp_path / "book", tmp_path / "books")
    with pytest.raises(ConfigError, match="lacks the domain folders book, github"):
        builder.redpajama_domains(str(tmp_path))


def test_compressed_inputs(tmp_path, monkeypatch):
    gz = write_jsonl(tmp_path / "x.jsonl.gz", ["one", "two"], gzip.open)
    assert list(builder.read_documents(gz)) == ["one", "two"]
    try:
        import zstandard
    except ImportError:
        zstandard = None
    if zstandard is not None:
        (tmp_path / "y.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "three"}\n'))
        assert list(builder.read_documents(str(tmp_path / "y.jsonl.zst"))) == ["three"]
    (tmp_path / "z.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 8)  # zstd's magic: zstd by content
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed
    with pytest.raises(ConfigError, match="zstandard"):
        list(builder.read_documents(str(tmp_path / "z.jsonl.zst")))


def test_cli(corpus, tok_dir, tmp_path, capsys):
    paths, _ = corpus
    base = ["--tokenizer", tok_dir, "--seq-len", "32", "--eval-sequences", "8", "--prune-tokens", "2000",
            "--continue-tokens", "3000", "--no-progress", "--workers", "1"]
    assert builder.main(base + ["--out", str(tmp_path / "x"), "--domain", "a=" + str(tmp_path / "nope")]) == 2
    assert "error: domain 'a': input" in capsys.readouterr().err
    assert builder.main(base + ["--out", str(tmp_path / "x"), "--domain", "a"]) == 2
    assert "error: --domain expects name=value" in capsys.readouterr().err
    assert builder.main(["--out", str(tmp_path / "x"), "--domain", "a=" + paths["a"][0]]) == 2
    assert "error: missing --tokenizer, --seq-len" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
    args = base + ["--out", str(tmp_path / "ok"), "--proportions", "a=0.25", "--proportions", "b=0.75"]
    args += [f"--domain=a={p}" for p in paths["a"]] + ["--domain", "b=" + paths["b"][0]]
    assert builder.main(args) == 0
    m = read_manifest(str(tmp_path / "ok"))
    assert m["proportions"] == {"a": 0.25, "b": 0.75} and m["domains"]["a"]["sources"] == paths["a"]
    assert "continue seqs" in capsys.readouterr().out  # the summary table
    run = subprocess.run([sys.executable, "-m", "llmshearing.data_prep.shards", "--seq-len", "many"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "error:" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "llmshearing.data_prep.shards", "--tokenizer", str(tmp_path / "none")] + base[2:]
                         + ["--out", str(tmp_path / "y"), "--domain", "a=" + paths["a"][0]], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: tokenizer") and "Traceback" not in run.stderr


def test_cli_default_with_sizes_adds_continue_data_only(tok_dir, tmp_path, monkeypatch, capsys):
    """Without --tokenizer/--domain/--redpajama the CLI builds the embedded default (`data/` as `make fetch` lays it
    out) with the sizes given: `--out data/shards-big --continue-tokens N` is how a larger scale gets more continued
    data (docs/reproduce_mini.md). A larger --continue-tokens only adds continue documents: eval, test and prune
    stay byte for byte the same, so numbers on the test split compare across the two."""
    rng = random.Random(1)
    os.makedirs(tmp_path / "data" / "models")
    os.symlink(tok_dir, tmp_path / "data" / "models" / "smollm2-135m")
    os.makedirs(tmp_path / "data" / "text")
    for name in builder.DEFAULT_DOMAINS:
        write_jsonl(tmp_path / "data" / "text" / f"{name}.jsonl", [doc(i, rng) for i in range(150)])
    monkeypatch.chdir(tmp_path)
    sizes = ["--seq-len", "32", "--eval-sequences", "4", "--prune-tokens", "2000", "--no-progress", "--workers", "1"]
    assert builder.main(sizes + ["--out", "small", "--continue-tokens", "2000"]) == 0
    assert builder.main(sizes + ["--out", "big", "--continue-tokens", "6000", "--shard-size", "1024"]) == 0
    small, big = read_manifest("small"), read_manifest("big")
    # --eval-sequences alone sizes the test split too (it had stayed at the default 16); --shard-size is honoured
    assert small["budgets"]["test_sequences"] == big["budgets"]["test_sequences"] == 4
    shard_files = lambda root: sorted(glob.glob(os.path.join(root, "*", "continue", "shard.*.mds")))  # noqa: E731
    assert len(shard_files("small")) == 4 and len(shard_files("big")) > 8
    assert max(os.path.getsize(f) for f in shard_files("big")) <= 1024
    seqs = lambda root, name, split: [tokens_of(x).tolist() for x in open_split(root, name, split)]  # noqa: E731
    assert big["budgets"]["continue_tokens"] == 6000 and big["tokenizer"]["path"] == "data/models/smollm2-135m"
    assert list(big["domains"]) == list(builder.DEFAULT_DOMAINS)
    for name in builder.DEFAULT_DOMAINS:
        for split in ("eval", "test", "prune"):
            assert seqs("big", name, split) == seqs("small", name, split), (name, split)
        assert [m["domains"][name]["splits"]["continue"]["sequences"] for m in (small, big)] == [16, 47]  # ceil(N/4/32)
    capsys.readouterr()
    assert builder.main(["--out", "x", "--seq-len", "32", "--domain", "a=" + str(tmp_path / "data" / "text" / "news.jsonl")]) == 2
    assert "error: missing --tokenizer" in capsys.readouterr().err  # a domain given: no default to fill in


def test_default_inputs_need_fetch(tmp_path):
    with pytest.raises(ConfigError, match="make fetch"):
        builder.default_inputs(str(tmp_path))


def test_byte_ranges_read_exactly_the_documents_of_the_whole_file(tmp_path):
    """Workers read uncompressed jsonl files in byte ranges (the line that starts in a range belongs to it): any cut
    of a file into ranges gives the documents the sequential reader gives, in order, including multi-byte characters
    at the cuts, CRLF line ends, blank lines and empty texts, and invalid bytes past the first 64 KiB (U+FFFD)."""
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() + end for t, end in [
        ("héllo wörld ✓", b"\n"), ("", b"\n"), ("crlf line", b"\r\n"), ("日本語のテキスト", b"\n"), ("x" * 300, b"\n")]]
    data = b"".join(lines) + b"\n\n" + b"".join(lines[::-1])
    data = data + b'{"text": "' + b"y" * 70_000 + b'\xff\xfe tail"}\n' + lines[0]  # an invalid byte past 64 KiB
    path = tmp_path / "doc.jsonl"
    path.write_bytes(data)
    whole = [t for t in builder._read_file(str(path)) if t]
    assert len(whole) == 10 and "\ufffd" in whole[-2]
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(rng.randrange(1, 6)))})
        got = [t for a, b in zip(cuts, cuts[1:]) for t in builder._read_range(str(path), a, b)]
        assert got == whole, cuts
    assert [t for a in range(len(data) - 2000, len(data)) for t in builder._read_range(str(path), a, a + 1)] == whole[-1:]
    assert builder._splittable(str(path))
    gz = tmp_path / "doc.jsonl.gz"
    gz.write_bytes(gzip.compress(data))
    assert not builder._splittable(str(gz))  # compressed: read in the main process, whole


def test_a_bad_line_in_a_later_range_is_named_by_its_byte_offset(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = b'{"text": "fine"}\n'
    path.write_bytes(good * 3 + b'{"txt": "no"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:4: not a json object"):
        builder._read_range(str(path), 0, 10_000)
    with pytest.raises(ConfigError, match=rf"bad.jsonl \(the line at byte {3 * len(good)}\): not a json object"):
        builder._read_range(str(path), 20, 10_000)


def test_a_domain_too_few_documents_for_eval_test_and_training_is_refused(tok_dir, tmp_path):
    """Held-out splits take whole documents: a domain needs one for eval, one for test and one for training. A
    single plain-text book (ONE document) or two long documents are refused with the reason; three are enough."""
    rng = random.Random(1)
    long = [f"Document {i}: " + " ".join(rng.choice(WORDS) for _ in range(400)) for i in range(3)]
    (tmp_path / "book.txt").write_text(long[0])
    for inputs, match in (([str(tmp_path / "book.txt")], r"1 document\(s\) gave 8 eval, 0 test .*ONE document"),
                          ([write_jsonl(tmp_path / "two.jsonl", long[:2])], r"2 document\(s\) gave 8 eval, 0 test and 35 "
                                                                             r"training .*at least 3")):
        with pytest.raises(ConfigError, match=match):
            build(tmp_path / "out", tok_dir, {"x": inputs})
        assert not os.path.exists(tmp_path / "out")
    m = build(tmp_path / "out", tok_dir, {"x": [write_jsonl(tmp_path / "three.jsonl", long)]})
    assert m["domains"]["x"]["documents"] == {"eval": 1, "test": 1, "prune": 1, "continue": 0}


def test_a_checkout_moved_with_its_data_keeps_its_shards_and_an_edited_input_does_not(corpus, tok_dir, tmp_path, capsys):
    """The fingerprint names the inputs, not where they lie: the corpus and the shard folder moved elsewhere (mtimes
    kept, as `mv` does) are up to date; so is a folder fingerprinted with absolute paths before; an edited input
    is not."""
    import shutil

    from llmshearing.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    here = tmp_path / "here"
    shutil.copytree(os.path.dirname(corpus[0]["a"][0]), here / "corpus")  # copy2: mtimes kept
    paths = {"a": [str(here / "corpus" / os.path.basename(f)) for f in corpus[0]["a"]], "b": [str(here / "corpus" / "b")]}
    first = build(here / "shards", tok_dir, paths)
    os.rename(here, tmp_path / "moved")
    moved = {d: [p.replace(str(here), str(tmp_path / "moved")) for p in ps] for d, ps in paths.items()}
    capsys.readouterr()
    again = build(tmp_path / "moved" / "shards", tok_dir, moved)
    assert "up to date" in capsys.readouterr().out
    assert again["build_fingerprint"] == first["build_fingerprint"]
    # the manifest names where the inputs are now, not where they were built from
    on_disk = json.loads((tmp_path / "moved" / "shards" / "manifest.json").read_text())
    for m in (again, on_disk):
        assert {d: e["sources"] for d, e in m["domains"].items()} == moved
    assert {d: e["sources"] for d, e in first["domains"].items()} == paths

    manifest = json.loads((tmp_path / "moved" / "shards" / "manifest.json").read_text())
    args = dict(seq_len=SIZES["seq_len"], eval_sequences=SIZES["eval_sequences"], test_sequences=SIZES["eval_sequences"],
                prune_tokens=SIZES["prune_tokens"], continue_tokens=SIZES["continue_tokens"],
                proportions=first["proportions"], gguf_file=None,
                domains={d: [os.path.abspath(p) for p in ps] for d, ps in moved.items()})
    manifest["build_fingerprint"] = builder.build_fingerprint(args, moved, tokenizer_fingerprint(load_tokenizer(tok_dir)),
                                                              located=True)
    (tmp_path / "moved" / "shards" / "manifest.json").write_text(json.dumps(manifest))
    assert build(tmp_path / "moved" / "shards", tok_dir, moved)["build_fingerprint"] == manifest["build_fingerprint"]

    with open(moved["b"][0] + "/01.txt", "a") as f:
        f.write(" one more word")
    with pytest.raises(ConfigError, match="different arguments.*--overwrite"):
        build(tmp_path / "moved" / "shards", tok_dir, moved)


def test_a_folder_built_before_the_test_split_is_rebuilt_without_overwrite(corpus, tok_dir, tmp_path, capsys):
    """The same arguments and inputs under builder 2 (no test split): `make shards` rebuilds it (a folder built with
    other arguments still needs --overwrite)."""
    from llmshearing.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    paths, _ = corpus
    out = tmp_path / "s"
    m = build(out, tok_dir, paths)
    args = dict(seq_len=SIZES["seq_len"], eval_sequences=SIZES["eval_sequences"], prune_tokens=SIZES["prune_tokens"],
                continue_tokens=SIZES["continue_tokens"], proportions=m["proportions"], gguf_file=None,
                domains={d: [os.path.abspath(p) for p in ps] for d, ps in paths.items()})
    old = json.loads((out / "manifest.json").read_text())
    old["build_fingerprint"] = builder.build_fingerprint(args, paths, tokenizer_fingerprint(load_tokenizer(tok_dir)), 2,
                                                         located=True)  # absolute paths, as folders of that time
    for entry in old["domains"].values():
        del entry["splits"]["test"]
    (out / "manifest.json").write_text(json.dumps(old))
    capsys.readouterr()
    assert build(out, tok_dir, paths) == m
    assert "before the shards had a test split; rebuilding" in capsys.readouterr().err
    old["build_fingerprint"] = "0" * 16  # other arguments
    (out / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="different arguments.*--overwrite"):
        build(out, tok_dir, paths)
