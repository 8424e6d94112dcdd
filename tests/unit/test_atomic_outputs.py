"""store.atomic's outputs and logs never follow a last-component link."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vtpmctl.store.atomic import open_log, open_output, write_output


def test_write_output_refuses_a_link_and_leaves_its_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "out"
    link.symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        write_output(link, b"blob")
    assert victim.read_bytes() == b"keep" and link.is_symlink()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "new")
    with pytest.raises(OSError, match="symbolic link"):
        write_output(dangling, b"blob")
    assert not (tmp_path / "new").exists()


def test_write_output_replaces_a_file_and_writes_into_a_device(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_bytes(b"old")
    out.chmod(0o644)
    write_output(out, b"new")
    assert out.read_bytes() == b"new" and stat.S_IMODE(out.stat().st_mode) == 0o600
    write_output(Path(os.devnull), b"x")
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert open_output(tmp_path / "absent") is None
    with pytest.raises(IsADirectoryError):
        open_output(tmp_path)


def test_open_log_refuses_links_and_foreign_files(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "a.log"
    link.symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        open_log(link)
    hard = tmp_path / "b.log"
    os.link(victim, hard)
    with pytest.raises(OSError, match="hard links"):
        open_log(hard)
    assert victim.read_bytes() == b"keep"
    fd = open_log(tmp_path / "c.log")
    try:
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
    finally:
        os.close(fd)
