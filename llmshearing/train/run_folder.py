"""A run folder belongs to one run: one process tree writes it at a time (a lock), and it stays bound to the
model, pruning target and data it was started with (its run_config.yaml), so a rerun or an autoresume with
another of those refuses instead of mixing two runs' checkpoints and logs."""
from __future__ import annotations

import fcntl
import os
import sys

from llmshearing.checks import writable_output, load_structured
from llmshearing.errors import ConfigError
from llmshearing.checkpoint_files import batch_of, checkpoints
from llmshearing.train.config import identity, note_objective_change

LOCK_NAME = ".lock"
CONFIG_NAME = "run_config.yaml"
_held: dict[str, int] = {}  # folder -> open file descriptor of its lock, for the life of the process
_made: dict[str, str] = {}  # folder -> the topmost folder that lock() created for it (removed again if left empty)
_checked: set[str] = set()  # folders whose reuse was checked in this process (the warning is printed once)


def lock(folder: str) -> bool:
    """Take the folder's lock (an flock, released by the OS when the process ends, however it ends); a second
    run on the same folder refuses, naming the PID that holds it. Idempotent within a process: True when this
    call took it."""
    folder = os.path.realpath(folder)
    if folder in _held:
        return False
    top = folder
    while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
        top = os.path.dirname(top)
    made = top if not os.path.exists(top) else None
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
    if made:
        _made[folder] = made
    return True


def unlock(folder: str) -> None:
    """Release the lock; a folder that lock() created and that holds nothing but the lock (a run refused after
    taking it) is removed again, so a refusal leaves nothing behind."""
    folder = os.path.realpath(folder)
    fd = _held.pop(folder, None)
    made = _made.pop(folder, None)
    _checked.discard(folder)
    if fd is None:
        return
    if made and os.listdir(folder) == [LOCK_NAME]:
        os.remove(os.path.join(folder, LOCK_NAME))
        path = folder
        while True:  # the folder and the parents lock() made for it, while empty
            try:
                os.rmdir(path)
            except OSError:
                break
            if path == made:
                break
            path = os.path.dirname(path)
    os.close(fd)  # closing the descriptor releases the flock


def claim(folder: str, cfg) -> None:
    """Rank 0 of a run takes the run folder before any slow start-up work (a second launch refuses in seconds, not
    after the first has ended) and checks that starting here replaces nothing it must not (`check_reuse`)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    writable_output(folder, "save_folder")
    lock(folder)
    if cfg.save_overwrite:  # the rest waits for check_binding, whose "another run" is the better message
        check_reuse(folder, cfg)


def _planned(duration) -> int | None:
    """The batches of a max_duration given in batches ('60ba'), else None."""
    text = str(duration)
    return int(text[:-2]) if text.endswith("ba") and text[:-2].isdigit() else None


def check_reuse(folder: str, cfg) -> None:
    """A folder holding this run's checkpoints is continued (autoresume / load_path) or, with save_overwrite,
    started over; a finished run (a checkpoint at its max_duration) is never replaced. Reads file names only."""
    real = os.path.realpath(folder)
    found = checkpoints(folder)
    if cfg.autoresume and found and _planned(cfg.max_duration) is not None and \
            batch_of(found[-1]) >= _planned(cfg.max_duration):  # Composer: a ValueError traceback
        raise ConfigError(f"save_folder '{folder}' holds a finished run (a checkpoint at batch {batch_of(found[-1])}, "
                          f"max_duration {cfg.max_duration}): autoresume has nothing to train; give a larger "
                          f"max_duration to train it further, or export it with `llmshearing export "
                          f"{found[-1]} <folder>`")
    if real in _checked or not checkpoints(folder, complete=False) or cfg.autoresume or cfg.load_path:
        return
    if not cfg.save_overwrite:
        raise ConfigError(f"save_folder '{folder}' already holds checkpoints of a run; continue it with "
                          f"autoresume=true, start over with save_overwrite=true, or give another save_folder")
    newest, duration = (batch_of(found[-1]) if found else -1), cfg.max_duration
    config = os.path.join(folder, CONFIG_NAME)
    if os.path.exists(config):
        old = load_structured(config, f"save_folder '{folder}'")
        duration = old.get("max_duration", duration) if isinstance(old, dict) else duration
    planned = _planned(duration)
    if planned is not None and newest >= planned:
        raise ConfigError(f"save_folder '{folder}' holds a finished run (a checkpoint at batch {newest}, its "
                          f"max_duration {duration}); save_overwrite=true would replace its checkpoints and logs: give "
                          f"this run another save_folder, delete that folder to start over, or train it further "
                          f"with autoresume=true and a larger max_duration")
    _checked.add(real)
    print(f"warning: save_overwrite=true: starting over in save_folder '{folder}', replacing the checkpoints and "
          f"logs of the unfinished run there (newest checkpoint: batch {newest})", file=sys.stderr, flush=True)


def check_binding(folder: str, cfg) -> None:
    """Refuse to run in a folder that holds another run (a different model, target or data), and refuse to
    silently start over in a folder that holds this run's checkpoints without autoresume / load_path /
    save_overwrite. Nothing is written here."""
    path = os.path.join(folder, CONFIG_NAME)
    if os.path.exists(path):
        old = load_structured(path, f"save_folder '{folder}'")
        if not isinstance(old, dict):
            raise ConfigError(f"save_folder '{folder}' holds a {CONFIG_NAME} that is not a run config; give another "
                              f"save_folder")
        before, now = identity(old), identity(cfg)
        differ = {k: (before[k], now[k]) for k in before if before[k] != now[k]}
        if differ:
            lines = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
            raise ConfigError(f"save_folder '{folder}' belongs to another run ({lines}); its checkpoints and logs are "
                              f"kept: give this run another save_folder")
        if cfg.autoresume and checkpoints(folder):
            note_objective_change(old, cfg, f"the run resumed from save_folder '{folder}'")
    check_reuse(folder, cfg)
