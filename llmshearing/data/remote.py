"""Shards kept in object storage (or on a shared filesystem) and read through a per-node cache.

`data.remote` is a shard folder made by `data_prep.shards` and copied as it is (`s3://`, `gs://`, `oci://`, any
scheme mosaicml-streaming downloads from, or a plain path such as an NFS mount); `data.local` is this node's cache.
At start the manifest and the index.json of every split the run reads are fetched (a few KB). A shard file is
fetched on the first read of one of its samples, by streaming's own code (`Stream.prepare_shard`: its downloader,
decompression and hash check), under an flock in the cache, so that the ranks and dataloader workers of a node
download each file once. Only the reader changes: samples, order, resume and dynamic loading are those of
local shards (llmshearing.data.mixture draws the sample ids; this module only finds the bytes).
"""
from __future__ import annotations

import contextlib
import fcntl
import filecmp
import json
import os
import sys
import time

from llmshearing.checks import writable_output
from llmshearing.data.index import MANIFEST, read_index
from llmshearing.errors import ConfigError

MARKER = "llmshearing_cache.json"  # which remote a cache holds: one cache never mixes two remotes
DOWNLOADS = "downloads.jsonl"  # one line per file fetched into the cache (file, bytes, pid): what this node pulled
DOWNLOAD_TIMEOUT = 600.0  # seconds for one shard file (64 MB at ~1 Mbit/s still fits)
DOWNLOAD_RETRIES = 2


def join(remote: str, *parts: str) -> str:
    """A path under `remote`, for URIs (`s3://b/x`) and plain paths alike."""
    return "/".join([remote.rstrip("/"), *parts]) if "://" in remote else os.path.join(remote, *parts)


@contextlib.contextmanager
def _locked(local: str, rel: str):
    """An exclusive flock per cached file, held by one process of the node while it fetches the file. Lock files
    live under <cache>/.locks, apart from the data."""
    path = os.path.join(local, ".locks", rel + ".lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _download(remote: str, rel: str, dest: str) -> None:
    """Copy remote/rel to dest with streaming's downloader for the remote's scheme (no lock: callers hold it)."""
    from streaming.base.storage.download import CloudDownloader  # heavy: streaming

    url = join(remote, rel)
    try:
        CloudDownloader.get(remote if "://" in remote else None).download(url, dest, DOWNLOAD_TIMEOUT)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - missing file, no credentials, unreachable host, unknown scheme, ...
        raise ConfigError(f"data.remote: cannot fetch '{url}' ({type(e).__name__}: {e}); check the URI, that the "
                          f"shards were uploaded there as made by data_prep.shards, and your credentials") from None


def _logged(local: str, rel: str) -> None:
    line = json.dumps({"file": rel, "bytes": os.path.getsize(os.path.join(local, rel)), "pid": os.getpid(),
                       "time": round(time.time(), 3)}) + "\n"
    fd = os.open(os.path.join(local, DOWNLOADS), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())  # one small O_APPEND write: lines of concurrent processes do not interleave
    finally:
        os.close(fd)


def fetch(remote: str, local: str, rel: str) -> str:
    """remote/rel in the cache (fetched once per node); its local path."""
    dest = os.path.join(local, rel)
    if not os.path.exists(dest):
        with _locked(local, rel):
            if not os.path.exists(dest):
                _download(remote, rel, dest)
                _logged(local, rel)
    return dest


def normalise(remote: str) -> str:
    """One spelling per remote, so that `s3://b/x/` and `s3://b/x` (or `shards/` and `shards`) are one remote and
    one cache: no trailing slash; a plain path normalised."""
    if "://" in remote:
        scheme, rest = remote.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}" if rest.strip("/") else remote
    return os.path.normpath(remote)


CONFIG_KEYS = ("data.shards", "data.remote", "data.local")  # how a run's config names the three; the CLIs' --flags


def shards_root(shards: str | None, remote: str | None, local: str | None, keys=CONFIG_KEYS) -> str | None:
    """The folder the manifest and indexes are read from: `shards`, or `local` made the cache of `remote`
    (`prepare_cache`); None when neither is given. `keys` name the three in errors."""
    k_shards, k_remote, k_local = keys
    if shards is not None and remote is not None:
        raise ConfigError(f"give the shards either as {k_shards}=<folder> or as {k_remote}=<uri or folder> with "
                          f"{k_local}=<cache folder> (not both)")
    if remote is not None:
        if not local:
            raise ConfigError(f"{k_remote}='{remote}' needs {k_local}=<cache folder on this node> (each node "
                              f"downloads the shard files it reads there once, shared by its ranks)")
        prepare_cache(remote, local, keys)
        return local
    if local is not None:
        raise ConfigError(f"{k_local}='{local}' is the cache of {k_remote}, which is not set; to read a local "
                          f"folder use {k_shards}")
    return shards


def prepare_cache(remote: str, local: str, keys=CONFIG_KEYS) -> None:
    """Make `local` the cache of `remote`: checks the two differ and that the cache is not another remote's, and
    fetches the manifest. The node's first process (LOCAL_RANK 0) also compares the remote's manifest with a
    cached one it did not just fetch, so shards rebuilt at the remote are not read mixed with stale cached files."""
    k_shards, k_remote, k_local = keys
    remote = normalise(remote)
    if "://" in local:
        raise ConfigError(f"{k_local}='{local}' must be a folder on this node (the cache), not a URI")
    if "://" not in remote and not os.path.isdir(remote):
        raise ConfigError(f"{k_remote}='{remote}' is not a folder (a shard folder made by data_prep.shards, or an "
                          f"s3:// / gs:// / oci:// URI)")
    if "://" not in remote and os.path.realpath(remote) == os.path.realpath(local):
        raise ConfigError(f"{k_local} is {k_remote} ('{local}'); to read shards in place use {k_shards}={local} "
                          f"and no {k_remote} / {k_local}")
    writable_output(local, k_local)
    if not os.path.isdir(os.path.join(local, ".locks")):  # .locks: another rank is setting this cache up right now
        _check_cache_folder(local, k_local)  # before anything is written into it (a foreign folder has no .locks)
    os.makedirs(local, exist_ok=True)
    with _locked(local, MARKER):
        marker = os.path.join(local, MARKER)
        _check_cache_folder(local, k_local)  # again under the lock: another process may have filled it meanwhile
        if os.path.exists(marker):
            with open(marker) as f:
                held = json.load(f).get("remote")
            if not isinstance(held, str) or normalise(held) != remote:
                raise ConfigError(f"{k_local} '{local}' is the cache of another remote ('{held}'); give this remote "
                                  f"its own cache folder")
        cached_before = os.path.exists(os.path.join(local, MANIFEST))
        cached = fetch(remote, local, MANIFEST)
        if not os.path.exists(marker):  # only once the remote answered: a typo does not claim the cache
            with open(marker + ".tmp", "w") as f:
                json.dump({"remote": remote}, f)
            os.replace(marker + ".tmp", marker)
    if cached_before and os.environ.get("LOCAL_RANK", "0") == "0":  # just fetched: fresh by construction
        with _locked(local, MANIFEST):
            fresh = cached + ".check"
            if os.path.exists(fresh):
                os.remove(fresh)
            _download(remote, MANIFEST, fresh)
            same = filecmp.cmp(fresh, cached, shallow=False)
            os.remove(fresh)
        if not same:
            raise ConfigError(f"the shards at {k_remote} '{remote}' changed since the cache '{local}' was filled; "
                              f"delete the cache folder (or give a new data.local) so nothing stale is read")


def _check_cache_folder(local: str, k_local: str) -> None:
    """A cache folder is the project's only if it is new, empty or carries the cache marker: the cache writes
    files into it and tells the user to delete it when the remote changes, so a model or shard folder given by
    mistake must be refused before the first file lands in it."""
    if not os.path.isdir(local) or os.path.exists(os.path.join(local, MARKER)):
        return
    foreign = sorted(n for n in os.listdir(local) if n != ".locks")  # .locks: a cache being set up right now
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ConfigError(f"{k_local} '{local}' is not empty ({shown}) and is not a shard cache (no {MARKER}); "
                          f"the cache writes files into it, so give a new or empty folder")


def fetch_index(remote: str, local: str, domain: str, split: str) -> None:
    """The split's index.json in the cache, parsed and checked. A cached copy that does not parse, or (checked by the
    node's first process) differs from the remote's, is fetched again: a damaged copy must not outlive the repair
    of the remote. A damaged index at the remote is an error naming its URL."""
    rel = os.path.join(domain, split, "index.json")
    cached_before = os.path.exists(os.path.join(local, rel))
    dest = fetch(remote, local, rel)
    folder, shown = os.path.dirname(dest), join(remote, domain, split, "index.json")
    try:
        read_index(folder, shown)
        if not cached_before or os.environ.get("LOCAL_RANK", "0") != "0":
            return
    except ConfigError:
        if not cached_before:
            raise  # just fetched: the remote's own copy is damaged
    with _locked(local, rel):  # refresh: fetch the remote's copy beside it and swap it in if it differs
        fresh = dest + ".check"
        _download(remote, rel, fresh)
        same = os.path.exists(dest) and filecmp.cmp(fresh, dest, shallow=False)
        if same:
            os.remove(fresh)
        else:
            os.replace(fresh, dest)
            print(f"note: the cached '{dest}' was damaged or differed from the remote's; fetched it again",
                  file=sys.stderr, flush=True)
    read_index(folder, shown)


def open_cached_split(remote: str, local: str, domain: str, split: str):
    """A random-access reader of one split whose shard files are fetched on first use."""
    from streaming import LocalDataset, Stream  # heavy: streaming

    class CachedSplit(LocalDataset):
        def __init__(self):
            rel = os.path.join(domain, split)
            super().__init__(local=os.path.join(local, rel))
            hashes = sorted(self.shards[0].file_pairs[0][0].hashes) if self.shards else []
            self.rel, self.ready = rel, set()
            # validate_hash: the index's first hash algorithm, when the shards were written with hashes
            self.stream = Stream(remote=join(remote, domain, split), local=os.path.join(local, rel),
                                 download_retry=DOWNLOAD_RETRIES, download_timeout=DOWNLOAD_TIMEOUT,
                                 validate_hash=hashes[0] if hashes else None, keep_zip=False)

        def get_item(self, sample_id: int):
            shard_id, index = self.spanner[sample_id]
            if shard_id not in self.ready:
                self._ensure(self.shards[shard_id])
                self.ready.add(shard_id)
            return self.shards[shard_id][index]

        def _ensure(self, shard) -> None:
            raw = shard.file_pairs[0][0]
            path = os.path.join(local, self.rel, raw.basename)
            present = lambda: os.path.isfile(path) and os.path.getsize(path) == raw.bytes  # noqa: E731
            if present():
                return
            with _locked(local, os.path.join(self.rel, raw.basename)):
                if present():  # another process of the node fetched it while this one waited
                    return
                if os.path.isfile(path):
                    os.remove(path)  # a torn or stale copy: fetch it again
                try:
                    self.stream.prepare_shard(shard)
                except ValueError as e:  # streaming's hash check (it leaves the bad copy in place: removed)
                    if os.path.isfile(path):
                        os.remove(path)
                    raise ConfigError(f"shard '{join(remote, self.rel, raw.basename)}' failed its hash check "
                                      f"({e}); the remote copy is damaged: rebuild or re-upload the shards") from None
                except Exception as e:  # noqa: BLE001
                    raise ConfigError(f"data.remote: cannot fetch shard '{join(remote, self.rel, raw.basename)}' "
                                      f"({type(e).__name__}: {e})") from None
                size = os.path.getsize(path) if os.path.isfile(path) else None
                if size != raw.bytes:
                    if size is not None:
                        os.remove(path)
                    raise ConfigError(f"shard '{join(remote, self.rel, raw.basename)}' is {size} bytes but its "
                                      f"index.json says {raw.bytes}: truncated or overwritten at the remote")
                _logged(local, os.path.join(self.rel, raw.basename))

    return CachedSplit()
