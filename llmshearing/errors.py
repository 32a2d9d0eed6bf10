"""Errors meant for the user, and how every entry point turns them into one line and an exit code."""
from __future__ import annotations

import errno
import signal
import sys
import threading

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


_PIPE_ERRORS = (BrokenPipeError, ConnectionResetError, EOFError)


def _from_gone_workers(exc_type, tb) -> bool:
    """A thread's exception that is only the dataloader workers' exit: a pipe error, or anything raised in
    multiprocessing's resource-sharer thread (its accept() fails once the worker that asked is gone)."""
    return (_raised_in(tb, "multiprocessing/resource_sharer.py", "multiprocessing/connection.py")
            or exc_type is not None and issubclass(exc_type, _PIPE_ERRORS))


def _raised_in(tb, *files: str) -> bool:
    """Whether the traceback passes through a file whose path ends with one of `files`."""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(files):
            return True
        tb = tb.tb_next
    return False


def _quiet_gone_workers() -> None:
    """Installed when an entry point starts (idempotent): multiprocessing's resource-sharer thread hands file
    descriptors to dataloader workers, and a worker that dies during the handshake (Ctrl-C / SIGTERM reach the whole
    process group, so the workers can go before the main thread even sees the signal) makes that thread print a
    connection-error traceback through sys.excepthook. That error is only the workers' exit: the main process reports
    a worker that really failed on its own. Other errors of that thread, and every other thread's, keep theirs."""
    if getattr(sys.excepthook, "_llmshearing_quiet", False):
        return
    previous_sys_hook = sys.excepthook

    def sys_hook(exc_type, exc, tb):
        gone = (threading.current_thread() is not threading.main_thread()
                and _raised_in(tb, "multiprocessing/resource_sharer.py")
                and exc_type is not None and issubclass(exc_type, _PIPE_ERRORS))
        if not gone:
            previous_sys_hook(exc_type, exc, tb)

    sys_hook._llmshearing_quiet = True
    sys.excepthook = sys_hook


def _quiet_broken_pipes() -> None:
    """After a stop signal the dataloader workers are gone: a pipe error in any thread is their exit, not a bug,
    and would print a traceback after the one line. Other thread exceptions keep theirs."""
    previous_thread_hook, previous_sys_hook = threading.excepthook, sys.excepthook

    def thread_hook(args):
        if not _from_gone_workers(args.exc_type, args.exc_traceback):
            previous_thread_hook(args)

    def sys_hook(exc_type, exc, tb):  # threads that report through sys.excepthook, as the resource sharer does
        if threading.current_thread() is threading.main_thread() or not _from_gone_workers(exc_type, tb):
            previous_sys_hook(exc_type, exc, tb)

    threading.excepthook, sys.excepthook = thread_hook, sys_hook


def run_entry(main, *args) -> int:
    """Run an entry point's body: a ConfigError exits 2, an OS error of the user's making (full disk, read-only
    folder, a path that vanished) exits 1, Ctrl-C exits 130; each with one line on stderr and no traceback.
    Anything else is a bug and keeps its traceback."""
    _quiet_gone_workers()
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
