"""Atomic writes: a reader sees the old complete output or the new complete output, never half of one."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile

from llmshearing.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_created(path: str, mode: int) -> None:
    """mkdtemp/mkstemp create 0700/0600; give the final output the permissions a plain create would."""
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces `path` by rename.

    On error the temporary directory is removed and `path` is untouched. An existing `path` is
    refused unless `overwrite`, in which case it is moved aside first and deleted only after the
    new directory is in place.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"'{path}' exists; pass overwrite (--overwrite) to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        _as_created(tmp, 0o777)
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
    """Yield a temporary file beside `path`; on success it is fsynced and renamed over `path`.

    A kill at any moment leaves either the old file or the new one (plus, at worst, a `.<name>.tmp-*`
    leftover that nothing reads); on error the temporary file is removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    try:
        _as_created(tmp, 0o666)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def append_jsonl(path: str, row: dict) -> None:
    """One json line appended (the run logs: pruning_log.jsonl, domain_weights.jsonl, ...)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path: str, last_per: str | None = None) -> list[dict]:
    """The rows of a json-lines log ([] when it does not exist). With `last_per`, only the last row for each
    value of that key, in key order: a resumed run logs again from its checkpoint, and the later row wins."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if last_per is None:
        return rows
    last = {row[last_per]: row for row in rows}
    return [last[k] for k in sorted(last)]


def truncate_jsonl(path: str, keep) -> None:
    """Keep the rows of a json-lines log for which `keep(row)` holds (atomically): a run resumed from a
    checkpoint drops the rows the interrupted run wrote after that checkpoint, so logs are not doubled."""
    if not os.path.exists(path):
        return
    rows, torn = [], False
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a run killed while appending
                torn = True
    kept = [r for r in rows if keep(r)]
    if torn or len(kept) != len(rows):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def disk_full(e: BaseException, path: str) -> ConfigError | None:
    """The one-line error of a write that ran out of space (ENOSPC, a quota, a file-size limit), else None.
    safetensors reports the OS error inside its own message."""
    from safetensors import SafetensorError  # only here: io.py stays stdlib-only for the light entry points

    codes = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    text = str(e)
    if isinstance(e, OSError) and e.errno in codes or isinstance(e, SafetensorError) and any(
            s in text for s in ("StorageFull", "No space left", "FileTooLarge", "File too large", "QuotaExceeded")):
        return ConfigError(f"writing '{path}' failed ({text.splitlines()[0][:160]}): the disk or quota is full; "
                           f"nothing was written: free space or give another folder")
    return None
