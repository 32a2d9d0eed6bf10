"""A run folder belongs to one run: one process tree writes it at a time (a lock), and it stays bound to the
model, pruning target and data it was started with (its run_config.yaml), so a rerun or an autoresume with
another of those refuses instead of mixing two runs' checkpoints and logs."""
from __future__ import annotations

import fcntl
import glob
import os
import uuid

from llmshearing.errors import ConfigError

LOCK_NAME = ".lock"
SHARED_NAME = ".shared-check"  # <name>-<token>: written by rank 0 at start, read by every rank (check_shared)
CONFIG_NAME = "run_config.yaml"
_held: dict[str, int] = {}  # folder -> open file descriptor of its lock, for the life of the process


def lock(folder: str) -> None:
    """Take the folder's lock (an flock, released by the OS when the process ends, however it ends); a second
    run on the same folder refuses, naming the PID that holds it. Idempotent within a process."""
    folder = os.path.realpath(folder)
    if folder in _held:
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"save_folder '{folder}' is in use by another run (PID {holder}); wait for it to end, "
                          f"or give this run another save_folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[folder] = fd


def unlock(folder: str) -> None:
    fd = _held.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def check_shared(folder: str) -> None:
    """Every rank sees the run folder rank 0 writes (all ranks call this once the process group exists, before
    a checkpoint is loaded). On several nodes save_folder must be one folder on a filesystem they share: each rank
    writes its own shard of a sharded checkpoint there and autoresume looks for the `latest` link there, so a
    node-local folder would leave every checkpoint incomplete and make the nodes disagree on resuming. The file
    has a new name every time, so no node can answer from a cached lookup (NFS caches names found missing)."""
    from composer.utils import dist

    from llmshearing.io import atomic_write_text

    if dist.get_world_size() == 1:
        return
    token = [uuid.uuid4().hex if dist.get_global_rank() == 0 else None]
    if dist.get_global_rank() == 0:
        for stale in glob.glob(os.path.join(folder, SHARED_NAME + "-*")):  # a run killed during its check
            os.remove(stale)
        atomic_write_text(os.path.join(folder, f"{SHARED_NAME}-{token[0]}"), token[0])
    dist.broadcast_object_list(token, src=0)
    path = os.path.join(folder, f"{SHARED_NAME}-{token[0]}")
    try:
        with open(path) as f:
            seen = f.read() == token[0]
    except OSError:
        seen = False
    nodes = dist.all_gather_object((dist.get_node_rank(), seen))
    if dist.get_global_rank() == 0:
        os.remove(path)
    apart = sorted({node for node, ok in nodes if not ok})
    if apart:
        raise ConfigError(f"save_folder '{folder}' is not the folder rank 0 writes on node(s) {apart}: give every "
                          f"node the same save_folder on a filesystem they share (NFS, Lustre, ...); sharded "
                          f"checkpoints and autoresume need it (docs/multinode.md)")


def identity(raw: dict) -> dict:
    """What a run folder is bound to, from a run config as a plain mapping (so that a run config written by an
    older version, with keys since renamed, still compares): the source model, the pruning target (as its
    resolved shape when the model config is at hand) and the data. Learning rates, durations and intervals may
    change on resume."""
    from llmshearing.model.hf import load_hf_config
    from llmshearing.pruning.shapes import resolve_target

    model, data = raw.get("model") or {}, raw.get("data") or {}
    target = (raw.get("pruning") or {}).get("target")
    if target is not None:
        try:
            target = resolve_target(target, load_hf_config(model.get("path"), model.get("gguf_file"))).as_dict()
        except Exception:  # noqa: BLE001 - the old run's model may be gone or changed: compare the spec as given
            pass
    path = lambda p: os.path.realpath(p) if isinstance(p, str) else p  # noqa: E731
    return {"model.path": path(model.get("path")), "model.gguf_file": model.get("gguf_file"), "pruning.target": target,
            "data.shards": path(data.get("shards")), "data.remote": data.get("remote"), "data.split": data.get("split", "prune"),
            "data.domains": data.get("domains")}


def check_binding(folder: str, cfg) -> None:
    """Refuse to run in a folder that holds another run (a different model, target or data), and refuse to
    silently start over in a folder that holds this run's checkpoints without autoresume / load_path /
    save_overwrite. Nothing is written here."""
    from llmshearing.checks import load_structured
    from llmshearing.train.checkpointing import checkpoints
    from llmshearing.train.config import _as_dict

    path = os.path.join(folder, CONFIG_NAME)
    if os.path.exists(path):
        old = load_structured(path, f"save_folder '{folder}'")
        if not isinstance(old, dict):
            raise ConfigError(f"save_folder '{folder}' holds a {CONFIG_NAME} that is not a run config; give another "
                              f"save_folder")
        before, now = identity(old), identity(_as_dict(cfg))
        differ = {k: (before[k], now[k]) for k in before if before[k] != now[k]}
        if differ:
            lines = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
            raise ConfigError(f"save_folder '{folder}' belongs to another run ({lines}); its checkpoints and logs are "
                              f"kept: give this run another save_folder")
    if checkpoints(folder) and not (cfg.autoresume or cfg.load_path or cfg.save_overwrite):
        raise ConfigError(f"save_folder '{folder}' already holds checkpoints of this run; continue it with "
                          f"autoresume=true, start over with save_overwrite=true, or give another save_folder")
