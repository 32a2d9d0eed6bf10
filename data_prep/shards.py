"""`make shards`: raw text of several domains -> per-domain MDS token shards (layout: llmshearing/data/layout.py).

    python -m llmshearing.data_prep.shards                       # the embedded default (after `make fetch`)
    python -m llmshearing.data_prep.shards --out data/shards-big --continue-tokens 1000000   # it, more continue data
    python -m llmshearing.data_prep.shards --tokenizer MODEL_DIR --out data/rp_shards --seq-len 4096 \\
        --eval-sequences 500 --test-sequences 500 --prune-tokens 400000000 --continue-tokens 50000000000 --redpajama RedPajama-Data-1T

Per domain (one after another): documents are read lazily in order and tokenized in batches with the fast tokenizer
(no special tokens) by --workers processes, which read uncompressed jsonl files themselves in byte ranges (a line
belongs to the range it starts in; compressed and plain-text files are read by the main process); the main process
takes the results in document order, frames each document as [bos] + ids + [eos] (bos only when the tokenizer has
one that differs from eos) and routes it, a whole document at a time, to one split:

  document i (counting non-empty documents from 0) is held out when i % eval_every == 0 (it goes to `eval`,
  or to `test` once eval is full), when i % eval_every == eval_every // 2 (to `test`, or to `eval` once test
  is full), or when `prune` is full (to eval, else test), as long as one of the two is not full; otherwise
  it goes to `prune` while that is not full; otherwise to `continue`. eval_every = max(2, (E + T + P) //
  (E + T)) with E, T the eval and test sequences and P the prune sequences the domain needs, so held-out
  documents are spread over the part of the corpus that eval, test and prune read, and none of them
  depends on the continued-pretraining budget (a larger --continue-tokens only adds documents).

`test` holds the final numbers and is never read by training, dynamic loading, reference losses or
calibration (llmshearing.data.layout.refuse_test); `eval` steers. A domain whose documents are too few to
give each of eval, test and training at least one document (a plain-text file is ONE document) is refused
with a clear error: there is no fallback that would split a document between held-out and training text.

Each split's documents are concatenated and cut into `seq_len` sequences; a document that overfills a
split is cut there (its rest is not used anywhere) and the final partial sequence of a split is dropped.
Reading stops as soon as the four splits are full. Domain d gets `eval_sequences` eval sequences,
`test_sequences` test sequences (default: as many as eval) and ceil(budget * p_d / seq_len) sequences of each
training split.
"""
from __future__ import annotations

import argparse
import bz2
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import math
import multiprocessing as mp
import os
import sys
import time

import numpy as np

from llmshearing.checks import regular_file, sniff, writable_output
from llmshearing.errors import ConfigError, run_entry
from llmshearing.io import atomic_directory, atomic_write_text
from llmshearing.data.layout import BUILT_MARKER, FORMAT, MANIFEST, REDPAJAMA_PROPORTIONS, SPLITS, built_here
from llmshearing.data.tokenizer import load_tokenizer, tokenizer_fingerprint

BUILDER_VERSION = 3  # part of the build fingerprint: bump when the routing or framing rule changes
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".csv")  # plain text: the whole file is one document
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")  # one json object with a `text` field per line
COMPRESSED = (".gz", ".zst", ".zstd", ".bz2", ".xz")  # recognised in names; the content decides how it is read
REDPAJAMA_DOMAINS = tuple(sorted(REDPAJAMA_PROPORTIONS))
DEFAULT_DOMAINS = ("news", "books", "code", "docs")
# test_sequences follows eval_sequences (build_shards), so `--eval-sequences N` alone sizes both held-out splits
DEFAULTS = dict(seq_len=128, eval_sequences=16, prune_tokens=120_000, continue_tokens=240_000)
MAX_BATCH_DOCS = 1024
MAX_BATCH_CHARS = 4_000_000
RANGE_BYTES = 1 << 20  # most bytes of a file one task reads: ~0.3 s of a core, so little waits at a domain's end
CHARS_PER_TOKEN = 4  # a rough average of text per token (English prose ~4.5, code ~3): sizes read-ahead only
SHARD_SIZE = 1 << 26  # bytes per MDS shard file: streaming's default (64 MiB), the unit of a download


# ----------------------------------------------------------------------------------------------- reading

def _inner_suffix(path: str) -> tuple[str, str]:
    """(compression, suffix of the uncompressed name): 'a.jsonl.zst' -> ('.zst', '.jsonl')."""
    root, ext = os.path.splitext(path.lower())
    if ext in COMPRESSED:
        return ext, os.path.splitext(root)[1]
    return "", ext


def _readable(name: str) -> bool:
    return _inner_suffix(name)[1] in TEXT_SUFFIXES + JSONL_SUFFIXES


def input_files(path: str) -> list[str]:
    """The files a path stands for: itself, or a directory's readable files (recursive, sorted, no hidden)."""
    if not os.path.isdir(path):
        return [path]
    found = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and _readable(f))
    return found


def _zstandard(path: str):
    try:
        import zstandard  # optional: the redpajama extra
    except ImportError:
        raise ConfigError(f"'{path}' is zstd-compressed but the `zstandard` package is not installed; "
                          f"install it (pip install zstandard) or decompress the file") from None
    return zstandard


@contextlib.contextmanager
def _open_binary(path: str):
    """The decompressed bytes of an input, by its content (gzip, bz2, xz, zstd or plain), not by its name: a
    compressed file is never tokenized as bytes of text. Archives and binary files are refused."""
    kind = sniff(path)
    if kind in ("zip", "binary"):
        raise ConfigError(f"'{path}' is {'a zip archive' if kind == 'zip' else 'binary data'}, not text; inputs are "
                          f"UTF-8 text or jsonl, optionally gzip/bz2/xz/zstd-compressed")
    if kind == "gzip":
        with gzip.open(path, "rb") as f:
            yield f
    elif kind == "bz2":
        with bz2.open(path, "rb") as f:
            yield f
    elif kind == "xz":
        with lzma.open(path, "rb") as f:
            yield f
    elif kind == "zstd":
        zstandard = _zstandard(path)
        with open(path, "rb") as raw:
            yield zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(raw)
    else:
        with open(path, "rb") as f:
            yield f


@contextlib.contextmanager
def _open_text(path: str):
    """Text of an input as UTF-8. Encoding policy: `check_input` refuses a file whose first 64 KiB are not UTF-8
    (another encoding, UTF-16, binary); past that, a rare invalid byte becomes U+FFFD instead of failing a
    build hours in."""
    with _open_binary(path) as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as f:
        yield f


def check_input(path: str, domain: str) -> None:
    """A regular file (a FIFO would block forever) whose content is UTF-8 text once decompressed."""
    regular_file(path, f"domain '{domain}'")
    with _open_binary(path) as f:
        try:
            head = f.read(65536)
        except (OSError, EOFError, ValueError) as e:  # a damaged archive, or gzip named .zst
            raise ConfigError(f"domain '{domain}': '{path}' cannot be decompressed ({type(e).__name__}: {e})") from None
    if b"\x00" in head:
        raise ConfigError(f"domain '{domain}': '{path}' holds NUL bytes: binary data or UTF-16 text, not UTF-8")
    for cut in range(4):  # the 64 KiB may end inside a multi-byte character
        try:
            head[:len(head) - cut].decode("utf-8")
            return
        except UnicodeDecodeError as e:
            error = e
    raise ConfigError(f"domain '{domain}': '{path}' is not UTF-8 text (invalid byte at {error.start}); convert it, "
                      f"e.g. iconv -f latin1 -t utf-8")


def _text_of(line: str, where: str) -> str | None:
    """The `text` of one jsonl line (None for a blank line); `where` names the line in errors."""
    if not line.strip():
        return None
    try:
        text = json.loads(line)["text"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{where}: not a json object with a 'text' field ({type(e).__name__}: {e}); "
                          f"jsonl inputs need one {{\"text\": ...}} object per line") from None
    if not isinstance(text, str):
        raise ConfigError(f"{where}: the 'text' field is {type(text).__name__}, not a string")
    return text


def _read_file(path: str):
    i = 0
    try:
        with _open_text(path) as f:
            if _inner_suffix(path)[1] not in JSONL_SUFFIXES:
                yield f.read()
                return
            for i, line in enumerate(f):
                text = _text_of(line, f"{path}:{i + 1}")
                if text is not None:
                    yield text
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or damaged .gz / .bz2 / .xz / .zst, each its own kind
        damaged = (isinstance(e, (EOFError, ValueError)) or (isinstance(e, OSError) and e.errno is None)
                   or type(e).__name__ in ("LZMAError", "error", "ZstdError"))  # zlib.error; OSError: a disk error
        if not damaged:
            raise
        raise ConfigError(f"'{path}' cannot be decompressed after line {i + 1} ({type(e).__name__}: {e}): the file "
                          f"is truncated or damaged; re-download or recompress it") from None


def _splittable(path: str) -> bool:
    """An uncompressed jsonl file: workers can read byte ranges of it themselves."""
    return _inner_suffix(path)[1] in JSONL_SUFFIXES and sniff(path) == "text"


def _read_range(path: str, start: int, end: int) -> list[str]:
    """The non-empty documents of the jsonl lines that start in bytes [start, end) of `path`, in order. Lines are
    split at b"\\n" and decoded on their own (a newline byte never occurs inside a UTF-8 character, so this is
    what reading the whole file gives), with the same policy: invalid bytes become U+FFFD."""
    docs = []
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the rest of the line that starts before `start` (its reader takes it)
        pos, line = f.tell(), 0
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            line += 1
            where = f"{path}:{line}" if start == 0 else f"{path} (the line at byte {pos})"
            text = _text_of(raw.decode("utf-8", errors="replace"), where)
            if text and text.strip():  # as iter_documents
                docs.append(text)
            pos += len(raw)
    return docs


def read_documents(path: str):
    """Yield documents, lazily, from a plain text file (one document), a jsonl file (`text` field per line;
    also .json / .ndjson), either compressed with .gz or .zst, or a directory of such files (sorted,
    recursive, hidden files skipped)."""
    for file in input_files(path):
        yield from _read_file(file)


def iter_documents(paths: list[str]):
    """The documents of a domain's inputs that hold more than whitespace, in order (a whitespace-only document
    would become sequences of framing tokens)."""
    for path in paths:
        for text in read_documents(path):
            if text.strip():
                yield text


# ----------------------------------------------------------------------------------------------- inputs

def redpajama_domains(root: str) -> dict[str, list[str]]:
    """RedPajama-Data-1T's layout (`<root>/{arxiv,book,c4,common_crawl,github,stackexchange,wikipedia}/`)
    as domain -> sorted list of its files."""
    if not os.path.isdir(root):
        raise ConfigError(f"--redpajama: '{root}' is not a directory; pass the RedPajama-Data-1T root "
                          f"(the folder holding {', '.join(REDPAJAMA_DOMAINS)})")
    missing = [d for d in REDPAJAMA_DOMAINS if not os.path.isdir(os.path.join(root, d))]
    if missing:
        raise ConfigError(f"--redpajama: '{root}' lacks the domain folders {', '.join(missing)} "
                          f"(RedPajama-Data-1T has {', '.join(REDPAJAMA_DOMAINS)}); download them or pass "
                          f"the domains you have with --domain name=path")
    domains = {}
    for d in REDPAJAMA_DOMAINS:
        files = input_files(os.path.join(root, d))
        if not files:
            raise ConfigError(f"--redpajama: '{os.path.join(root, d)}' holds no .jsonl / .jsonl.zst / text files")
        domains[d] = files
    return domains


def _check_domains(domains) -> dict[str, list[str]]:
    if not isinstance(domains, dict) or not domains:
        raise ConfigError("no domains given; pass --domain name=path (repeatable) or --redpajama DIR")
    out, owner = {}, {}
    for name, paths in domains.items():
        if (not isinstance(name, str) or not name or name.startswith(".") or "/" in name or os.sep in name
                or name == MANIFEST):
            raise ConfigError(f"domain name {name!r} is not a plain folder name; use letters, digits, - or _")
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ConfigError(f"domain '{name}' has no input paths")
        for p in paths:
            if not os.path.exists(p):
                raise ConfigError(f"domain '{name}': input '{p}' does not exist; check the path")
            files = input_files(str(p))
            if not files:
                raise ConfigError(f"domain '{name}': directory '{p}' holds no readable files "
                                  f"(.jsonl/.json/.txt/..., optionally .gz/.bz2/.xz/.zst)")
            for f in files:
                check_input(f, name)
                real = os.path.realpath(f)
                if real in owner:  # the same text twice would put eval documents into a training split
                    raise ConfigError(f"input '{f}' is given twice (for domain '{owner[real]}' and domain '{name}'); "
                                      f"each file may feed one domain once, or held-out text leaks into training")
                owner[real] = name
        out[name] = [os.path.normpath(str(p)) for p in paths]
    return out


def resolve_proportions(domains: list[str], proportions=None) -> dict[str, float]:
    """Explicit proportions (exactly the domains, >= 0, sum 1 within 1e-6); else RedPajama's for its 7
    domains; else equal."""
    if proportions is None:
        if set(domains) == set(REDPAJAMA_PROPORTIONS):
            return {d: REDPAJAMA_PROPORTIONS[d] for d in domains}
        return {d: 1.0 / len(domains) for d in domains}
    unknown = [d for d in proportions if d not in domains]
    if unknown:
        raise ConfigError(f"proportions name unknown domain(s) {', '.join(map(str, unknown))}; "
                          f"the domains are {', '.join(domains)}")
    missing = [d for d in domains if d not in proportions]
    if missing:
        raise ConfigError(f"proportions lack domain(s) {', '.join(missing)}; give one for each of {', '.join(domains)}")
    out = {}
    for d in domains:
        try:
            p = float(proportions[d])
        except (TypeError, ValueError):
            raise ConfigError(f"proportion of '{d}' is {proportions[d]!r}, not a number") from None
        if not math.isfinite(p) or p < 0:
            raise ConfigError(f"proportion of '{d}' is {p}; proportions must be >= 0")
        out[d] = p
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"proportions sum to {total:.8g}, not 1: {out}; rescale them")
    return out


def _check_positions(tokenizer: str, seq_len: int) -> None:
    """--seq-len fits the positions of the model the tokenizer folder belongs to (its config.json, when it has one):
    training refuses longer sequences (checks.check_positions), so they are refused here, before the build."""
    config = os.path.join(tokenizer, "config.json")
    if not os.path.isfile(config):
        return
    try:
        with open(config, encoding="utf-8") as f:
            limit = json.load(f).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return  # not this check's business: a broken config.json is the model's, refused where it is used
    if isinstance(limit, int) and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} is longer than the max_position_embeddings {limit} of the model in "
                          f"'{tokenizer}'; training would refuse these shards: give --seq-len {limit} or less")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _file_stats(domains: dict[str, list[str]], located: bool) -> dict[str, list]:
    """Per domain, each input file's name, size and mtime: its path within the input given (a file's own name), or
    its absolute path when `located`."""
    stats = {}
    for name, paths in domains.items():
        rows = []
        for p in paths:
            for f in input_files(p):
                st = os.stat(f)
                where = os.path.abspath(f) if located else os.path.relpath(f, p) if os.path.isdir(p) else os.path.basename(f)
                rows.append([where, st.st_size, st.st_mtime_ns])
        stats[name] = rows
    return stats


def build_fingerprint(args: dict, domains: dict[str, list[str]], tok_fingerprint: str,
                      builder: int = BUILDER_VERSION, located: bool = False) -> str:
    """What a shard folder was built from: arguments, tokenizer and the inputs' names, sizes and mtimes, not where
    they lie, so a checkout moved with its data (or a worktree whose data links to it) keeps its shards.
    `located`: the scheme of folders built before that (absolute paths in `args['domains']` and the inputs)."""
    if not located:
        args = {**args, "domains": {d: [os.path.basename(os.path.normpath(p)) for p in ps] for d, ps in args["domains"].items()}}
    blob = json.dumps({"builder": builder, "format": FORMAT, "args": args, "tokenizer": tok_fingerprint,
                       "inputs": _file_stats(domains, located)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- one domain

_TOKENIZER = None  # set in each pool worker by _init_tokenizer


def _make_tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer  # heavy: tokenizers

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    return tok


def _init_tokenizer(tokenizer_json: str) -> None:
    """Pool initializer: one single-threaded tokenizer per process. Without RAYON_NUM_THREADS=1 (read when
    `tokenizers` first runs in parallel) every worker would start a thread per core: N workers, N x cores threads."""
    global _TOKENIZER
    os.environ["RAYON_NUM_THREADS"] = "1"
    _TOKENIZER = _make_tokenizer(tokenizer_json)


def _tasks(paths: list[str], need):
    """A domain's work, in document order: ("range", file, start, end) for about `need()` tokens' worth of bytes of
    an uncompressed jsonl file, which the worker reads and parses itself, so the main process only routes and
    writes; ("docs", texts) for documents read here (compressed and plain-text files cannot be split)."""
    for file in (f for p in paths for f in input_files(p)):
        if _splittable(file):
            size, start = os.path.getsize(file), 0
            while start < size:
                end = min(size, start + _read_ahead(need, RANGE_BYTES))
                yield ("range", file, start, end)
                start = end
        else:
            with contextlib.closing(_read_file(file)) as docs:
                docs = (text for text in docs if text.strip())  # as iter_documents
                while batch := _next_batch(docs, need):
                    yield ("docs", batch)


def _work(task: tuple, tok=None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (no special tokens) of a task's documents, concatenated, and each document's length: one array
    crosses the process boundary instead of one per document."""
    texts = _read_range(*task[1:]) if task[0] == "range" else task[1]
    encoded = (tok or _TOKENIZER).encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter((i for e in encoded for i in e.ids), dtype=np.int64, count=int(lengths.sum()))
    return ids, lengths


def _documents(ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(ids, np.cumsum(lengths)[:-1]) if len(lengths) else []


class _Split:
    def __init__(self, out: str, seq_len: int, dtype, wanted: int, shard_size: int = SHARD_SIZE):
        from streaming import MDSWriter  # heavy: streaming

        # xxh64 of every shard file in index.json: a copy fetched from object storage is checked against it
        self.writer = MDSWriter(out=out, columns={"tokens": f"ndarray:{np.dtype(dtype).name}:{seq_len}"},
                                hashes=["xxh64"], size_limit=shard_size)
        self.seq_len, self.dtype, self.wanted = seq_len, dtype, wanted
        self.buf = np.zeros(0, dtype=dtype)
        self.sequences = self.documents = 0

    @property
    def full(self) -> bool:
        return self.sequences >= self.wanted

    def add(self, ids: np.ndarray) -> int:
        """Append one framed document; write the whole sequences it completes; return how many."""
        self.documents += 1
        buf = np.concatenate([self.buf, ids]) if len(self.buf) else ids
        n = min(len(buf) // self.seq_len, self.wanted - self.sequences)
        for row in buf[: n * self.seq_len].reshape(n, self.seq_len):
            self.writer.write({"tokens": row})
        self.sequences += n
        self.buf = buf[n * self.seq_len:] if not self.full else buf[:0]  # a full split drops the rest
        return n


def _read_ahead(need, cap: int) -> int:
    """Characters (or bytes) of text for about `need()` tokens (~4 characters a token, read a little past the end),
    at least 64 KiB and at most `cap`."""
    return min(cap, max(65_536, 6 * need()))


def _next_batch(docs, need) -> list[str]:
    """The next batch of documents: `_read_ahead` characters, at most MAX_BATCH_DOCS documents."""
    budget = _read_ahead(need, MAX_BATCH_CHARS)
    batch, chars = [], 0
    for text in docs:
        batch.append(text)
        chars += len(text)
        if chars >= budget or len(batch) >= MAX_BATCH_DOCS:
            break
    return batch


def build_domain(job: dict, pool=None, workers: int = 1, report=None) -> dict:
    """Read, tokenize, route and write one domain (see the module docstring); returns its counts.

    Tasks (`_tasks`: byte ranges a worker reads itself, or documents read here) run in `pool` (`workers`
    processes, at most 2 x workers tasks in flight, so memory stays bounded) or in this process when `pool` is
    None; their documents are routed here, in order.
    Routing depends only on the documents' order and lengths, so the shards are the same for any `workers`."""
    name, seq_len, wanted = job["name"], job["seq_len"], job["wanted"]
    tok = None if pool is not None else _make_tokenizer(job["tokenizer_json"])
    dtype = np.dtype(job["dtype"])
    head = np.asarray([job["bos"]] if job["bos"] is not None else [], dtype=np.int64)
    tail = np.asarray([job["eos"]], dtype=np.int64)
    splits = {s: _Split(os.path.join(job["out"], s), seq_len, dtype, wanted[s], job.get("shard_size", SHARD_SIZE))
              for s in SPLITS}
    every = job["eval_every"]
    index, limit = 0, np.iinfo(dtype).max
    slots = 2 * workers if pool is not None else 1  # tasks in flight
    pending = [0]  # characters of the tasks in flight

    def need() -> int:
        """Tokens the next task should cover: what the splits still lack, less what the tasks in flight will
        likely bring (~CHARS_PER_TOKEN characters a token), shared among the free slots, so that few characters
        are read and tokenized past the point where the splits are full."""
        lacking = sum((s.wanted - s.sequences) * seq_len for s in splits.values())
        return max(0, lacking - pending[0] // CHARS_PER_TOKEN) // slots

    def route(i: int):  # the rule of the module docstring
        held = [s for s in ("eval", "test") if not splits[s].full]
        if held and (i % every == 0 or splits["prune"].full):
            return held[0]
        if held and i % every == every // 2:
            return held[-1]
        return next((s for s in ("prune", "continue") if not splits[s].full), None)

    in_flight = deque()
    try:
        with contextlib.closing(_tasks(job["paths"], need)) as tasks:
            done = exhausted = all(s.full for s in splits.values())
            while not done:
                while not exhausted and len(in_flight) < slots:
                    task = next(tasks, None)
                    exhausted = task is None
                    if task is not None:
                        chars = task[3] - task[2] if task[0] == "range" else sum(map(len, task[1]))
                        pending[0] += chars
                        in_flight.append((chars, pool.submit(_work, task) if pool is not None else _work(task, tok)))
                if not in_flight:
                    break
                chars, encoded = in_flight.popleft()
                pending[0] -= chars
                written = 0
                for ids in _documents(*(encoded.result() if pool is not None else encoded)):
                    split = route(index)
                    if split is None:
                        done = True
                        break
                    ids = np.concatenate([head, ids, tail])
                    if ids.max() > limit:
                        raise ConfigError(f"token id {int(ids.max())} does not fit {dtype.name}; the tokenizer's "
                                          f"len() understates its ids")
                    written += splits[split].add(ids.astype(dtype)) * seq_len
                    index += 1
                done = done or all(s.full for s in splits.values())
                if report and written:
                    report(name, written)
    finally:
        for _, f in in_flight:  # batches read past the end: not needed
            if pool is not None:
                f.cancel()
        for s in splits.values():
            s.writer.finish()
    return {"name": name, "documents_used": index,
            "documents": {s: splits[s].documents for s in SPLITS},
            "sequences": {s: splits[s].sequences for s in SPLITS}}


# ----------------------------------------------------------------------------------------------- all domains

def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _run_jobs(jobs: list[dict], workers: int, progress: bool) -> dict[str, dict]:
    """The domains one after another, each tokenized by `workers` processes (none for 1: this process, whose
    tokenizer may use several threads); a progress bar per domain with tokens/s and the ETA."""
    from tqdm import tqdm  # heavy: tqdm

    bars = {j["name"]: tqdm(total=sum(j["wanted"].values()) * j["seq_len"], desc=f"{j['name']:>14}", unit="tok",
                            unit_scale=True, position=i, leave=True, disable=not progress, dynamic_ncols=True)
            for i, j in enumerate(jobs)}
    pool = None
    try:
        if workers > 1:
            ctx = mp.get_context("spawn")  # fork would copy the parent's threads and locks (torch, tokenizers)
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_tokenizer,
                                       initargs=(jobs[0]["tokenizer_json"],))
        results = {}
        for job in jobs:
            try:
                results[job["name"]] = build_domain(job, pool, workers, lambda name, n: bars[name].update(n))
            except BrokenProcessPool:
                raise RuntimeError("a shard worker process died (killed, out of memory, or it could not start: a "
                                   "script that calls build_shards with workers > 1 needs `if __name__ == "
                                   "'__main__':`; or pass workers=1)") from None
        return results
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for bar in bars.values():
            bar.close()


def _summary(manifest: dict) -> str:
    head = ["domain"] + [f"{s} {k}" for s in SPLITS for k in ("seqs", "tokens")] + ["short"]
    rows = []
    totals = [0] * (2 * len(SPLITS))
    for name, d in manifest["domains"].items():
        cells = []
        for j, s in enumerate(SPLITS):
            n, t = d["splits"][s]["sequences"], d["splits"][s]["tokens"]
            totals[2 * j] += n
            totals[2 * j + 1] += t
            cells += [f"{n:,}", f"{t:,}"]
        rows.append([name] + cells + ["yes" if d["short"] else ""])
    rows.append(["total"] + [f"{v:,}" for v in totals] + [""])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]

    def fmt(row):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def build_shards(out: str, tokenizer: str, domains: dict, *, seq_len: int, eval_sequences: int, prune_tokens: int,
                 continue_tokens: int, proportions: dict | None = None, workers: int | None = None,
                 overwrite: bool = False, gguf_file: str | None = None, progress: bool = True,
                 shard_size: int | None = None, test_sequences: int | None = None) -> dict:
    """Build `<out>/manifest.json` and `<out>/<domain>/{eval,test,prune,continue}/` MDS shards; return the manifest.
    `test_sequences` defaults to `eval_sequences`.

    `tokenizer`: an HF tokenizer / model folder (`gguf_file` inside it, optionally). `domains`: name ->
    input paths (jsonl with `text`, plain text, .gz / .zst compressed, or folders of those). Everything
    is validated before any work; the shards are built in a temporary folder beside `out` and renamed
    into place. An `out` built with the same arguments and inputs is returned as is.
    """
    seq_len = _check_int("seq_len", seq_len, 2)  # a sequence of 1 token has no next token to predict
    eval_sequences = _check_int("eval_sequences", eval_sequences, 1)
    test_sequences = eval_sequences if test_sequences is None else _check_int("test_sequences", test_sequences, 1)
    prune_tokens = _check_int("prune_tokens", prune_tokens, 0)
    continue_tokens = _check_int("continue_tokens", continue_tokens, 0)
    shard_size = SHARD_SIZE if shard_size is None else _check_int("shard_size", shard_size, 1024)
    domains = _check_domains(domains)
    props = resolve_proportions(list(domains), proportions)
    out = os.path.normpath(str(out))
    writable_output(out, "--out")
    _check_positions(str(tokenizer), seq_len)
    tok = load_tokenizer(str(tokenizer), gguf_file)
    vocab = len(tok)
    bos = tok.bos_token_id if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id else None
    dtype = "uint16" if vocab <= 2**16 else "uint32"
    tok_fp = tokenizer_fingerprint(tok)
    args = dict(seq_len=seq_len, eval_sequences=eval_sequences, test_sequences=test_sequences, prune_tokens=prune_tokens,
                continue_tokens=continue_tokens, proportions=props, gguf_file=gguf_file,
                domains={d: [os.path.abspath(p) for p in ps] for d, ps in domains.items()})
    if shard_size != SHARD_SIZE:  # only then: folders built before the option existed stay up to date
        args["shard_size"] = shard_size
    fingerprint = build_fingerprint(args, domains, tok_fp)
    # the same build fingerprinted with absolute paths, as folders were before the fingerprint left them out
    located = build_fingerprint(args, domains, tok_fp, located=True)
    # the same arguments and inputs under builder 2, which wrote no test split (test_sequences did not exist)
    before_test = build_fingerprint({k: v for k, v in args.items() if k != "test_sequences"}, domains, tok_fp, 2,
                                    located=True)

    replace = False
    if os.path.isdir(out):
        path = os.path.join(out, MANIFEST)
        old = None
        if os.path.exists(path):
            try:
                with open(path) as f:
                    old = json.load(f)
            except (OSError, json.JSONDecodeError):
                old = {}
        if old is not None and not built_here(out, old):
            raise ConfigError(f"'{out}' holds a {MANIFEST} but is not a shard folder built by data_prep.shards (no "
                              f"{BUILT_MARKER}; it holds {', '.join(sorted(os.listdir(out))[:4])}): a shard cache "
                              f"or another folder; refusing to replace it{' even with --overwrite' if overwrite else ''}"
                              f": choose another --out")
        if old is not None and old.get("build_fingerprint") in (fingerprint, located) and old.get("format") == FORMAT:
            print(f"{out} is up to date (built with the same arguments, inputs and tokenizer); nothing to do")
            # the same inputs found elsewhere (a moved checkout): record where they are now (the fingerprint names the
            # domains, so they are the same); the fingerprint stays, so runs that named this build still match it
            if any(e["sources"] != domains[d] for d, e in old["domains"].items()):
                for d, e in old["domains"].items():
                    e["sources"] = domains[d]
                atomic_write_text(path, json.dumps(old, indent=1) + "\n")
            return old
        if old is None and os.listdir(out):
            raise ConfigError(f"'{out}' exists and is not a shard folder (no {MANIFEST}); refusing to replace it: "
                              f"choose another --out or remove it")
        if old is not None and old.get("build_fingerprint") == before_test:
            print(f"{out} was built with the same arguments before the shards had a test split; rebuilding it "
                  f"(its eval split changes too: held-out documents are now shared between eval and test)",
                  file=sys.stderr)
        elif old is not None and not overwrite:
            raise ConfigError(f"'{out}' exists and was built with different arguments, inputs or tokenizer; "
                              f"pass --overwrite (overwrite=True) to replace it")
        replace = True

    for name, paths in domains.items():  # cheap early check: every domain has a first document
        with contextlib.closing(iter_documents(paths)) as docs:
            if next(docs, None) is None:
                raise ConfigError(f"domain '{name}' has no documents in {', '.join(paths)} (empty files or no "
                                  f"'text' in any line); give it text or leave it out")

    wanted = {d: {"eval": eval_sequences, "test": test_sequences,
                  "prune": math.ceil(prune_tokens * props[d] / seq_len),
                  "continue": math.ceil(continue_tokens * props[d] / seq_len)} for d in domains}
    # Default: one worker per core. The workers read, parse and tokenize; the main process only routes and writes
    # (~10% of a core at 1.2M tokens/s), so it does not need a core of its own (docs/shards.md: 2 workers 1.8x one
    # pinned process, and ahead of one process on `tokenizers`' own threads, on this 2-core machine).
    workers = _cpu_count() if workers is None else _check_int("workers", workers, 1)
    if workers > _cpu_count():  # each worker is a process with its own tokenizer: more than the CPUs only costs memory
        print(f"warning: --workers {workers} is more than the {_cpu_count()} usable CPUs; using {_cpu_count()}",
              file=sys.stderr)
        workers = _cpu_count()
    tokenizer_json = tok.backend_tokenizer.to_str()
    eval_every = {}
    for d in domains:
        held = eval_sequences + test_sequences
        eval_every[d] = max(2, (held + wanted[d]["prune"]) // held)  # (E + T + P) // (E + T)

    with atomic_directory(out, overwrite=replace) as tmp:
        jobs = [dict(name=d, paths=domains[d], out=os.path.join(tmp, d), seq_len=seq_len, wanted=wanted[d], shard_size=shard_size,
                     eval_every=eval_every[d], tokenizer_json=tokenizer_json, bos=bos, eos=tok.eos_token_id,
                     dtype=dtype) for d in domains]
        wall, cpu = time.perf_counter(), time.process_time()
        results = _run_jobs(jobs, workers, progress)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        entries, warnings = {}, []
        for d in domains:
            r = results[d]
            got = r["sequences"]
            training, training_wanted = got["prune"] + got["continue"], wanted[d]["prune"] + wanted[d]["continue"]
            if got["eval"] < 1 or got["test"] < 1 or (training < 1 and training_wanted > 0):
                few = (f" Documents go whole to one split (eval and test held out at document level), so a domain "
                       f"needs at least 3; a plain-text file ({', '.join(TEXT_SUFFIXES)}) is ONE document: split it "
                       f"into several files, or give jsonl with one {{\"text\": ...}} per line."
                       if r["documents_used"] < 4 else "")
                raise ConfigError(f"domain '{d}' has too little text: {r['documents_used']} document(s) gave "
                                  f"{got['eval']} eval, {got['test']} test and {training} training sequences of "
                                  f"{seq_len} tokens (at least one of each is needed); add text or lower --seq-len."
                                  + few)
            short = any(got[s] < wanted[d][s] for s in SPLITS)
            if short:
                warnings.append(f"warning: domain '{d}' ran out of text after {r['documents_used']} documents: "
                                + ", ".join(f"{s} {got[s]:,}/{wanted[d][s]:,}" for s in SPLITS)
                                + " sequences written/wanted")
            entries[d] = {
                "sources": domains[d], "proportion": props[d], "eval_every": eval_every[d],
                "documents_used": r["documents_used"], "documents": r["documents"],
                "wanted": wanted[d],
                "splits": {s: {"sequences": got[s], "tokens": got[s] * seq_len} for s in SPLITS},
                "short": short,
            }
        manifest = {
            "format": FORMAT, "seq_len": seq_len, "dtype": dtype,
            "tokenizer": {"path": os.path.normpath(str(tokenizer)), "gguf_file": gguf_file, "vocab_size": vocab,
                          "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "fingerprint": tok_fp},
            "framing": {"bos": bos, "eos": tok.eos_token_id},
            "proportions": props,
            "budgets": {"eval_sequences": eval_sequences, "test_sequences": test_sequences, "prune_tokens": prune_tokens,
                        "continue_tokens": continue_tokens},
            "domains": entries,
            "build_fingerprint": fingerprint,
        }
        atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1) + "\n")
        atomic_write_text(os.path.join(tmp, BUILT_MARKER), json.dumps({"builder": BUILDER_VERSION,
                                                                       "build_fingerprint": fingerprint}) + "\n")
    for w in warnings:
        print(w, file=sys.stderr)
    print(f"shards in {out}/ (seq_len {seq_len}, {dtype}):\n{_summary(manifest)}")
    tokens = sum(s["tokens"] for d in entries.values() for s in d["splits"].values())
    # the main process reads what cannot be split, routes and writes: its CPU per token bounds what more workers give
    print(f"built in {wall:.1f} s ({tokens / wall / 1e6:.2f}M tokens/s, {workers} worker(s)); main process "
          f"{cpu:.1f} s CPU = {cpu / wall:.0%} of a core (its ceiling: ~{tokens / max(cpu, 1e-9) / 1e6:.1f}M tokens/s)")
    return manifest


def default_inputs(data_dir: str = "data") -> dict:
    """The embedded default's inputs (what `make fetch` writes under `data_dir`)."""
    model = os.path.join(data_dir, "models", "smollm2-135m")
    domains = {d: [os.path.join(data_dir, "text", f"{d}.jsonl")] for d in DEFAULT_DOMAINS}
    missing = [p for p in [model] + [ps[0] for ps in domains.values()] if not os.path.exists(p)]
    if missing:
        raise ConfigError(f"the default shards need {', '.join(missing)}; run `make fetch` first "
                          f"(the docs domain needs apt-get for python3.11-doc)")
    return dict(out=os.path.join(data_dir, "shards"), tokenizer=model, domains=domains, **DEFAULTS)


def build_default_shards(data_dir: str = "data", **kwargs) -> dict:
    """`make shards`: the embedded default (news, books, code, docs at 128 tokens, equal proportions)."""
    return build_shards(**{**default_inputs(data_dir), **kwargs})


# ----------------------------------------------------------------------------------------------- CLI

def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for v in values or []:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise ConfigError(f"{flag} expects name=value, got '{v}'")
        out.append((name, rest))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m llmshearing.data_prep.shards",
        description="Build per-domain MDS token shards (eval / test / prune / continue). Without --tokenizer, "
                    "--domain and --redpajama: the embedded default from `make fetch` (data/shards), with any sizes "
                    "given (e.g. --out data/shards-big --continue-tokens 1000000).")
    parser.add_argument("--tokenizer", help="HF tokenizer or model folder")
    parser.add_argument("--gguf-file", help="a GGUF file inside --tokenizer to read the tokenizer from")
    parser.add_argument("--out", help="output folder (replaced atomically)")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--eval-sequences", type=int, help="held-out eval sequences per domain (steer: evals, "
                                                           "dynamic loading, reference losses)")
    parser.add_argument("--test-sequences", type=int, help="held-out test sequences per domain, for final numbers "
                                                           "only (default: as many as --eval-sequences)")
    parser.add_argument("--prune-tokens", type=int, help="token budget of the pruning split, over all domains")
    parser.add_argument("--continue-tokens", type=int, help="token budget of the continued-pretraining split")
    parser.add_argument("--domain", action="append", metavar="NAME=PATH",
                        help="input of a domain (jsonl / text / .gz / .zst / folder); repeat to add files or domains")
    parser.add_argument("--redpajama", metavar="DIR", help="RedPajama-Data-1T root: its 7 domain folders")
    parser.add_argument("--proportions", action="append", metavar="NAME=P",
                        help="domain proportion (all domains, sum 1); default: RedPajama's for its 7 domains, "
                             "else equal")
    parser.add_argument("--workers", type=int, help="tokenizer processes, all on one domain at a time (the output is "
                                                    "the same for any number); default: usable CPUs")
    parser.add_argument("--shard-size", type=int, help=f"bytes per MDS shard file (default {SHARD_SIZE:,}, streaming's "
                                                       f"default): the unit a node downloads from object storage")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out built with other arguments")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)  # argparse exits 2 with 'error: ...' on malformed flags
    return run_entry(_build_from_args, args)


def _proportions(values: list[str]) -> dict[str, float]:
    proportions = {}
    for name, value in _pairs(values, "--proportions"):
        try:
            proportions[name] = float(value)
        except ValueError:
            raise ConfigError(f"--proportions {name}={value}: not a number") from None
    return proportions


def _build_from_args(args) -> int:
    if all(v is None for v in (args.tokenizer, args.gguf_file, args.domain, args.redpajama)):
        # the embedded default (`make shards`), with any sizes given, e.g. `--out data/shards-big --continue-tokens N`
        sizes = {"out": args.out, "seq_len": args.seq_len, "eval_sequences": args.eval_sequences,
                 "test_sequences": args.test_sequences, "prune_tokens": args.prune_tokens,
                 "continue_tokens": args.continue_tokens, "shard_size": args.shard_size}
        given = {k: v for k, v in sizes.items() if v is not None}
        if args.proportions:
            given["proportions"] = _proportions(args.proportions)
        build_default_shards(workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress, **given)
        return 0
    required = {"--tokenizer": args.tokenizer, "--out": args.out, "--seq-len": args.seq_len,
                "--eval-sequences": args.eval_sequences, "--prune-tokens": args.prune_tokens,
                "--continue-tokens": args.continue_tokens}
    missing = [k for k, v in required.items() if v is None]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (without --tokenizer, --gguf-file, --domain and --redpajama: "
                          f"the embedded default, with any sizes given)")
    domains: dict[str, list[str]] = {}
    if args.redpajama:
        domains.update(redpajama_domains(args.redpajama))
    seen_rp = set(domains)
    for name, path in _pairs(args.domain, "--domain"):
        if name in seen_rp:
            raise ConfigError(f"--domain {name} is also a --redpajama domain; rename it")
        domains.setdefault(name, []).append(path)
    if not domains:
        raise ConfigError("no domains: pass --domain name=path (repeatable) or --redpajama DIR")
    proportions = _proportions(args.proportions) if args.proportions else None
    build_shards(args.out, args.tokenizer, domains, seq_len=args.seq_len, eval_sequences=args.eval_sequences,
                 prune_tokens=args.prune_tokens, continue_tokens=args.continue_tokens, proportions=proportions,
                 workers=args.workers, overwrite=args.overwrite, gguf_file=args.gguf_file,
                 progress=not args.no_progress, shard_size=args.shard_size, test_sequences=args.test_sequences)
    return 0


if __name__ == "__main__":
    from llmshearing.data_prep.shards import main as _main  # so pool workers unpickle functions of llmshearing.data_prep.shards

    sys.exit(_main())
