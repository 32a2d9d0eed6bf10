"""Checkpoints that survive a kill at any moment.

Composer 0.32 writes a monolithic checkpoint straight into its final name and replaces the
`latest-rank0.pt` symlink by remove-then-create, so a kill mid-write leaves a truncated
`ep0-baN-rank0.pt`, and a kill between the two steps leaves no `latest` link, after which
autoresume silently starts the run from scratch. Here:

* `install_atomic_writes()` makes Composer write every monolithic checkpoint to a temporary file
  in the same folder, fsync it, and rename it into place (a rename is atomic on POSIX), so a
  checkpoint file either is complete or does not exist;
* `repair_latest(folder)` (called before autoresume) re-points a missing or dangling `latest`
  link, or one at a damaged checkpoint (set aside with a warning), at the newest complete checkpoint;
* `save_now(state, folder)` writes a checkpoint outside the save interval (SIGTERM, non-finite
  loss) under Composer's default names, so autoresume and `load_path` pick it up like any other.
"""
from __future__ import annotations

import glob
import os
import re
import sys

from llmshearing.checks import checkpoint_problem
from llmshearing.errors import ConfigError

CHECKPOINT_NAME = "ep{epoch}-ba{batch}-rank{rank}.pt"  # Composer's default save_filename
LATEST_NAME = "latest-rank{rank}.pt"  # Composer's default save_latest_filename
_CHECKPOINT = re.compile(r"ep(\d+)-ba(\d+)-rank(\d+)\.pt")
_SHARDED_NAME = "ep{epoch}-ba{batch}"  # Composer's default sharded_ckpt_prefix_dir: a folder per checkpoint
_SHARDED = re.compile(r"ep(\d+)-ba(\d+)")


def checkpoints(folder: str, rank: int = 0, complete: bool = True) -> list[str]:
    """Checkpoints of `rank` in `folder`, oldest first (by batch): monolithic `ep*-ba*-rank<rank>.pt` files and
    (for rank 0) sharded `ep*-ba*/` folders; with `complete`, only whole ones (`_complete`)."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if os.path.islink(path):
            continue
        m, s = _CHECKPOINT.fullmatch(name), _SHARDED.fullmatch(name)
        if (m and int(m.group(3)) == rank) or (s and rank == 0 and os.path.isdir(path)):
            found.append((int((m or s).group(2)), path))
    return [p for _, p in sorted(found) if not complete or _complete(p)]


def batch_of(checkpoint: str) -> int:
    """The batch a checkpoint of Composer's default names was saved after (from its name)."""
    name = os.path.basename(checkpoint.rstrip(os.sep))
    m = _CHECKPOINT.fullmatch(name) or _SHARDED.fullmatch(name)
    return int(m.group(2)) if m else -1


def point_latest(folder: str, checkpoint: str, rank: int = 0) -> None:
    """Atomically (re)point `latest-rank<rank>.pt` at `checkpoint` (a relative link, like Composer's)."""
    link = os.path.join(folder, LATEST_NAME.format(rank=rank))
    tmp = f"{link}.{os.getpid()}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.relpath(checkpoint, folder), tmp)
    os.replace(tmp, link)


def _complete(path: str) -> bool:
    """A whole checkpoint: a zip file whose directory reads, or a sharded folder holding every rank's file."""
    return checkpoint_problem(path) is None


def repair_latest(folder: str, rank: int = 0) -> str | None:
    """Make `latest-rank<rank>.pt` point at the newest complete checkpoint when it is missing, dangling, or points
    at a checkpoint that is not whole (a sharded save that never finished, a rank's file lost, a file overwritten
    or truncated), and remove leftovers of interrupted writes. A damaged checkpoint is renamed `<name>.damaged`
    (kept, never loaded) with a warning; when no complete checkpoint is left the run refuses, naming it, rather
    than silently starting over. Returns the checkpoint autoresume will load, if any."""
    if not os.path.isdir(folder):
        return None
    for partial in glob.glob(os.path.join(folder, ".ep*-ba*-rank*.pt.tmp-*")):
        os.remove(partial)
    link = os.path.join(folder, LATEST_NAME.format(rank=rank))
    target = os.path.realpath(link)
    found = checkpoints(folder, rank)
    if os.path.exists(link):
        problem = checkpoint_problem(target)
        if problem is None:
            return target
        name = os.path.basename(target)
        ours = os.path.dirname(target) == os.path.realpath(folder) and (_CHECKPOINT.fullmatch(name) or
                                                                         _SHARDED.fullmatch(name))
        if "no .metadata" not in problem:  # a sharded save cut short is no damage: the link is re-pointed
            bad = target if os.path.islink(link) and ours else link  # a file, not Composer's link: itself
            damaged = f"'{bad}' is {problem}"
            if not found:
                raise ConfigError(f"autoresume: checkpoint {damaged}, and save_folder '{folder}' holds no earlier "
                                  f"complete checkpoint; restore it from a copy, or start over with autoresume=false "
                                  f"and save_overwrite=true")
            aside, n = bad + ".damaged", 1
            while os.path.lexists(aside):  # the same checkpoint name damaged before: keep both for a look
                aside, n = f"{bad}.damaged-{n}", n + 1
            os.replace(bad, aside)  # kept for a look, never loaded
            print(f"warning: autoresume: checkpoint {damaged}; set aside as '{os.path.basename(aside)}', "
                  f"resuming from the newest complete checkpoint '{found[-1]}'", file=sys.stderr, flush=True)
    if not found:
        if os.path.lexists(link):
            os.remove(link)  # an unfinished sharded save: autoresume must not try to load it
        return None
    point_latest(folder, found[-1], rank)
    return found[-1]


def save_now(state, folder: str) -> str:
    """Checkpoint `state` now (all ranks must call it) and point `latest` at it; returns the checkpoint (rank 0's
    file, or the sharded folder)."""
    from composer.utils import checkpoint, dist  # heavy: composer

    from llmshearing.compat import install_atomic_writes  # heavy: torch

    install_atomic_writes()
    saved = checkpoint.save_checkpoint(state, os.path.join(folder, CHECKPOINT_NAME))
    rank = dist.get_global_rank()
    name = CHECKPOINT_NAME.format(epoch=int(state.timestamp.epoch), batch=int(state.timestamp.batch), rank=0)
    path = os.path.join(folder, name)
    if state.fsdp_sharded_state_dict_enabled:
        path = os.path.join(folder, _SHARDED_NAME.format(epoch=int(state.timestamp.epoch),
                                                         batch=int(state.timestamp.batch)))
        if rank == 0:
            point_latest(folder, path, 0)
    elif saved:
        point_latest(folder, saved, rank)
    dist.barrier()
    return path


def embedded_config(state: dict) -> str | None:
    """The resolved run config (yaml) that RunGuard saves in every checkpoint; None in older checkpoints."""
    callbacks = state.get("callbacks") or {}
    return (callbacks.get("RunGuard") or {}).get("run_config") if isinstance(callbacks, dict) else None


def unreadable(checkpoint: str, e: Exception) -> ConfigError:
    return ConfigError(f"checkpoint '{checkpoint}' cannot be read ({type(e).__name__}: {e}); use an earlier "
                       f"checkpoint")


def read_tensor(reader, name: str):
    """One model tensor of an open checkpoint; a damaged or foreign checkpoint is a one-line ConfigError."""
    try:
        return reader.tensor(name)
    except KeyError:
        raise ConfigError(f"checkpoint '{reader.path}' has no tensor '{name}': it does not fit the model of its run "
                          f"config; pass the run's own --config") from None
    except Exception as e:  # noqa: BLE001
        raise unreadable(reader.path, e) from None


