"""Checkpoints that survive a kill at any moment.

Composer 0.32 writes a monolithic checkpoint straight into its final name and replaces the
`latest-rank0.pt` symlink by remove-then-create, so a kill mid-write leaves a truncated
`ep0-baN-rank0.pt`, and a kill between the two steps leaves no `latest` link, after which
autoresume silently starts the run from scratch. Here:

* `install_atomic_writes()` makes Composer write every monolithic checkpoint to a temporary file
  in the same folder, fsync it, and rename it into place (a rename is atomic on POSIX), so a
  checkpoint file either is complete or does not exist;
* `repair_latest(folder)` (called before autoresume) re-points a missing or dangling `latest`
  link at the newest complete checkpoint;
* `save_now(state, folder)` writes a checkpoint outside the save interval (SIGTERM, non-finite
  loss) under Composer's default names, so autoresume and `load_path` pick it up like any other.
"""
from __future__ import annotations

import glob
import os
import re

CHECKPOINT_NAME = "ep{epoch}-ba{batch}-rank{rank}.pt"  # Composer's default save_filename
LATEST_NAME = "latest-rank{rank}.pt"  # Composer's default save_latest_filename
_CHECKPOINT = re.compile(r"ep(\d+)-ba(\d+)-rank(\d+)\.pt")


def _atomic_write_checkpoint_file(state_dict, filename: str) -> None:
    import torch

    from llmshearing.io import atomic_file

    with atomic_file(filename, "wb") as f:
        torch.save(state_dict, f)


def install_atomic_writes() -> None:
    """Route Composer's plain `.pt` checkpoint writes through `_atomic_write_checkpoint_file`.

    Composer has no hook for this, so the module-level writer is replaced (pinned Composer 0.32.1;
    a test checks the replacement is in force). Compressed and tar checkpoints keep Composer's writer.
    """
    from composer.utils import checkpoint

    original = getattr(checkpoint, "_write_checkpoint_file", None)
    if original is None:
        raise RuntimeError("composer.utils.checkpoint._write_checkpoint_file is gone: this Composer version "
                           "is not the pinned one; checkpoints would not be written atomically")
    if getattr(original, "_llmshearing_atomic", False):
        return

    def write(state_dict, filename: str) -> None:
        if filename.endswith(".pt"):
            _atomic_write_checkpoint_file(state_dict, filename)
        else:
            original(state_dict, filename)

    write._llmshearing_atomic = True
    checkpoint._write_checkpoint_file = write


def checkpoints(folder: str, rank: int = 0) -> list[str]:
    """Complete checkpoints of `rank` in `folder`, oldest first (by batch)."""
    found = []
    for path in glob.glob(os.path.join(folder, f"ep*-ba*-rank{rank}.pt")):
        m = _CHECKPOINT.fullmatch(os.path.basename(path))
        if m and not os.path.islink(path):
            found.append((int(m.group(2)), path))
    return [p for _, p in sorted(found)]


def point_latest(folder: str, checkpoint: str, rank: int = 0) -> None:
    """Atomically (re)point `latest-rank<rank>.pt` at `checkpoint` (a relative link, like Composer's)."""
    link = os.path.join(folder, LATEST_NAME.format(rank=rank))
    tmp = f"{link}.{os.getpid()}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.relpath(checkpoint, folder), tmp)
    os.replace(tmp, link)


def repair_latest(folder: str, rank: int = 0) -> str | None:
    """Make `latest-rank<rank>.pt` point at the newest checkpoint when it is missing or dangling, and
    remove leftovers of interrupted writes. Returns the checkpoint autoresume will load, if any."""
    if not os.path.isdir(folder):
        return None
    for partial in glob.glob(os.path.join(folder, ".ep*-ba*-rank*.pt.tmp-*")):
        os.remove(partial)
    link = os.path.join(folder, LATEST_NAME.format(rank=rank))
    if os.path.exists(link):  # follows the link: it exists and points at a file
        return os.path.realpath(link)
    found = checkpoints(folder, rank)
    if not found:
        return None
    point_latest(folder, found[-1], rank)
    return found[-1]


def save_now(state, folder: str) -> str:
    """Checkpoint `state` now (all ranks must call it) and point `latest` at it; returns rank 0's file."""
    from composer.utils import checkpoint, dist

    install_atomic_writes()
    saved = checkpoint.save_checkpoint(state, os.path.join(folder, CHECKPOINT_NAME))
    rank = dist.get_global_rank()
    if saved:
        point_latest(folder, saved, rank)
    path = os.path.join(folder, CHECKPOINT_NAME.format(epoch=int(state.timestamp.epoch),
                                                       batch=int(state.timestamp.batch), rank=0))
    dist.barrier()
    return path
