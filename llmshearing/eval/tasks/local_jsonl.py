"""Dataset loader for lm-eval task yamls in this folder (`custom_dataset: !function local_jsonl.load`).

lm-eval's `dataset_path: json` resolves `data_files` against the working directory; this loader resolves
them against this folder instead, so a shipped task works wherever `llmshearing eval` is run. It reads the
files directly (no HF hub, no datasets cache).
"""
from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load(data_files: dict[str, str] | None = None, **_):
    """{split: datasets.Dataset} for `data_files` = {split: jsonl path, relative to this folder or absolute}.

    lm-eval passes the task's metadata as keyword arguments too; they are ignored.
    """
    import datasets  # heavy: datasets

    if not data_files:
        raise ValueError("local_jsonl.load needs dataset_kwargs.data_files: {split: file.jsonl}")
    splits = {}
    for split, path in data_files.items():
        path = os.path.join(HERE, path)  # an absolute path stays as it is
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
