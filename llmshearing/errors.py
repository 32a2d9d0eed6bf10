"""Errors meant for the user, and how every entry point turns them into one line and an exit code."""
from __future__ import annotations

import errno
import signal
import sys

# OS errors that are the machine's or the user's, not a bug: reported in one line, exit 1.
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
               errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


class ConfigError(ValueError):
    """A configuration or input that cannot work. The message names the key and how to fix it."""


def user_message(e: ConfigError) -> str:
    """The message of a ConfigError, also when a DataLoader worker raised it: torch re-raises it in the main
    process as ConfigError("Caught ConfigError in DataLoader worker process N.\nOriginal Traceback ..."), whose
    last line holds the original message; that line alone is the user's, the same as without workers."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith(("llmshearing.errors.ConfigError: ", "ConfigError: ")) else last
    return text


def _quiet_broken_pipes() -> None:
    """After a stop signal the dataloader workers are gone while multiprocessing's resource-sharer thread (which
    hands them file descriptors) may still be answering one: its BrokenPipeError is the workers' exit, not a bug,
    and would print a thread traceback after the one line. Other thread exceptions keep theirs."""
    import threading

    previous = threading.excepthook

    def hook(args):
        if not issubclass(args.exc_type, (BrokenPipeError, ConnectionResetError, EOFError)):
            previous(args)

    threading.excepthook = hook


def run_entry(main, *args) -> int:
    """Run an entry point's body: a ConfigError exits 2, an OS error of the user's making (full disk, read-only
    folder, a path that vanished) exits 1, Ctrl-C exits 130; each with one line on stderr and no traceback.
    Anything else is a bug and keeps its traceback."""
    try:
        return main(*args)
    except ConfigError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        where = f": '{e.filename}'" if e.filename else " while writing an output (a full disk or a file size limit?)"
        print(f"error: {e.strerror or e}{where}; nothing was replaced and no partial output is left (outputs are "
              f"written atomically)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _quiet_broken_pipes()
        print("interrupted (Ctrl-C); nothing was replaced (outputs are written atomically)", file=sys.stderr)
        return 130
    except SystemExit as e:  # Composer turns SIGINT / SIGTERM into sys.exit(128 + signal) once it is imported
        if e.code not in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            raise
        _quiet_broken_pipes()
        print(f"interrupted ({signal.Signals(e.code - 128).name}) before a checkpoint could be saved; nothing was "
              f"replaced (outputs are written atomically)", file=sys.stderr)
        return e.code
