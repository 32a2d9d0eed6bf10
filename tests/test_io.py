"""Atomic outputs: all or nothing, never a silent overwrite, and ordinary permissions."""
import os
import stat

import pytest

from llmshearing.io import atomic_directory, atomic_write_text


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_get_the_permissions_of_a_plain_create(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_directory(str(tmp_path / "out")) as tmp:
            atomic_write_text(os.path.join(tmp, "a.json"), "{}")
        assert mode(tmp_path / "out") == 0o755  # mkdtemp alone would leave 0700: unreadable for a team
        assert mode(tmp_path / "out" / "a.json") == 0o644
    finally:
        os.umask(umask)


def test_a_failed_write_leaves_the_old_output_and_no_temporary(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(str(out)) as tmp:
        atomic_write_text(os.path.join(tmp, "v"), "1")
    with pytest.raises(RuntimeError):
        with atomic_directory(str(out), overwrite=True) as tmp:
            atomic_write_text(os.path.join(tmp, "v"), "2")
            raise RuntimeError("killed mid-write")
    assert (out / "v").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["out"]
    with pytest.raises(FileExistsError, match="exists; pass overwrite"):
        with atomic_directory(str(out)):
            pass
