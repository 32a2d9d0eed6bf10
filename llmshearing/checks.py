"""Input and output checks shared by every entry point, run before any work starts.

Each check raises ConfigError naming the key (or flag) and the path at fault, so that bad input ends in one
clear line instead of a traceback, a hang or a silently wrong result. One home for: regular files of the
right kind (sniffed, not trusted by name), yaml/json files, outputs that can be written, model folders whose
config and weights agree, Composer checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import stat
import tempfile
import zipfile

import yaml

from llmshearing.errors import ConfigError

# The first bytes of the formats a user may hand us under any name.
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}


def regular_file(path: str, key: str) -> str:
    """`path` exists and is a regular file (not a folder, FIFO, socket or device, which would block or fail)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigError(f"{key}: '{path}' does not exist") from None
    except OSError as e:
        raise ConfigError(f"{key}: cannot read '{path}': {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
        raise ConfigError(f"{key}: '{path}' is {kind}; give a file")
    return path


def sniff(path: str) -> str:
    """The kind of a regular file from its content: gzip | bz2 | xz | zstd | zip | binary | text | empty."""
    with open(path, "rb") as f:
        head = f.read(8192)
    if not head:
        return "empty"
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    return "binary" if b"\x00" in head else "text"


def load_structured(path: str, key: str):
    """A yaml or json file (json is yaml), parsed; a parse error names the key, the file and the line."""
    regular_file(path, key)
    if sniff(path) not in ("text", "empty"):
        raise ConfigError(f"{key}: '{path}' is not a text file ({sniff(path)} content); expected yaml or json")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{key}: '{path}' is not UTF-8 text (byte {e.start}); expected yaml or json") from None
    if path.endswith(".json"):  # json's own parser: yaml 1.1 would read 1e-05 as a string
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}: '{path}' is not valid json at line {e.lineno}, column {e.colno}: "
                              f"{e.msg}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{key}: '{path}' is not valid yaml/json{where}: {getattr(e, 'problem', e)}") from None


def check_finite(value, key: str) -> None:
    """No NaN or infinity anywhere in a (nested) config value."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"'{key}' must be a finite number, got {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, f"{key}[{i}]")


# ---------------------------------------------------------------------------------------------- outputs

def writable_output(path: str, key: str, folder: bool = True) -> str:
    """`path` can be created (or replaced) as a folder / file: every existing part of it is a folder, the path
    itself, if it exists, is of the right kind, and a file can really be written in the nearest existing folder
    (a probe file, created and removed: catches read-only mounts and full quotas, and works for root)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise ConfigError(f"{key}: '{path}' exists and is a {'file' if folder else 'folder'}; give a "
                          f"{'folder' if folder else 'file'} path")
    parent = path if folder and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{key}: '{path}' cannot be created: '{parent}' is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".llmshearing-write-probe-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write in '{parent}': {e.strerror}") from None
    return path


def inside(path: str, folder: str) -> bool:
    """`path` is `folder` or lies under it (after resolving links)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# ------------------------------------------------------------------------------------------- checkpoints

def checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a whole Composer checkpoint, or None: a sharded folder must hold every rank's file, a
    checkpoint file must be a torch zip archive whose directory (written last, at its end) reads, which a file
    overwritten, truncated or of another format does not."""
    from llmshearing.compat import is_sharded_checkpoint, sharded_checkpoint_problem  # heavy: torch

    if os.path.isdir(path):
        if not is_sharded_checkpoint(path):
            return "a folder but not a sharded checkpoint (no .metadata)"
        problem = sharded_checkpoint_problem(path)
        return f"an incomplete sharded checkpoint: {problem}" if problem else None
    if not os.path.isfile(path):
        return "not a regular file"
    kind = sniff(path)
    if kind != "zip":
        return f"not a Composer checkpoint (torch checkpoints are zip archives; this is {kind} content)"
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "truncated or corrupt (its zip directory does not read)"
    return None


def check_checkpoint(path: str, key: str) -> str:
    """A Composer checkpoint: a sharded checkpoint folder, or a whole torch zip file (a text file, a truncated
    copy or another format fails here with its name, not in torch.load's traceback)."""
    real = os.path.realpath(path)
    if not os.path.exists(real):
        raise ConfigError(f"{key}: checkpoint '{path}' does not exist")
    if not os.path.isdir(real):
        regular_file(real, key)
    problem = checkpoint_problem(real)
    if problem:
        hint = ("give a checkpoint file such as <save_folder>/latest-rank0.pt" if problem.startswith("a folder")
                else "use an earlier checkpoint")
        raise ConfigError(f"{key}: checkpoint '{path}' is {problem}; {hint}")
    return real
