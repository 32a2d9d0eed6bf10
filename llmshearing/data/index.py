"""A split folder's index.json (mosaicml-streaming's MDS index), read and checked: below both the local layout
(`data.layout`) and the remote cache (`data.remote`), which both read it."""
from __future__ import annotations

import json
import os

from llmshearing.errors import ConfigError

MANIFEST = "manifest.json"  # at the shard root: domains, splits, seq_len (data.layout.read_manifest)


def read_index(path: str, shown: str | None = None) -> dict:
    """The parsed index.json of the split folder `path`, checked to be an MDS index (streaming's reader fails on a
    damaged one with a JSONDecodeError or KeyError traceback). `shown` names the file in errors (a remote's URL)."""
    index = os.path.join(path, "index.json")
    shown = shown or index
    if not os.path.exists(index):
        raise ConfigError(f"shards at '{path}' are missing (no index.json); rebuild the shards")
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"'{shown}' is not valid json ({e}); the shards are damaged: restore the file or rebuild "
                          f"the shards") from None
    shards = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("raw_data"), dict) and isinstance(s["raw_data"].get("basename"), str)
            and isinstance(s["raw_data"].get("bytes"), int) for s in shards):
        raise ConfigError(f"'{shown}' is not an MDS index (no list of 'shards' with their 'raw_data'); the shards "
                          f"are damaged: restore the file or rebuild the shards")
    return data
