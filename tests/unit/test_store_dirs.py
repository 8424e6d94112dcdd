"""Store directories get explicit modes whatever the umask, and foreign ones are refused."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vtpmctl.errors import StoreError
from vtpmctl.store.dirs import UnsafeDirError, check_dir, ensure_dir

NOBODY = 65534


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_dirs_have_explicit_modes_under_umask_000(tmp_path: Path, umask_000: None) -> None:
    leaf = tmp_path / "a" / "b" / "c"
    ensure_dir(leaf, 0o700, parent_mode=0o755)
    assert mode(leaf) == 0o700
    assert mode(leaf.parent) == 0o755 and mode(leaf.parent.parent) == 0o755
    ensure_dir(tmp_path / "p" / "q", 0o700, parent_mode=0o700)
    assert mode(tmp_path / "p") == 0o700


def test_foreign_or_writable_dirs_are_refused_with_the_fix(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, NOBODY, NOBODY)
    with pytest.raises(UnsafeDirError, match=f"uid {NOBODY}.*chown"):
        ensure_dir(foreign, 0o700)
    writable = tmp_path / "writable"
    writable.mkdir()
    writable.chmod(0o777)
    with pytest.raises(StoreError, match="writable by group or others.*chmod go-w"):
        check_dir(writable)
    link = tmp_path / "link"
    link.symlink_to(foreign)
    with pytest.raises(UnsafeDirError, match=f"uid {NOBODY}"):
        check_dir(link)
    ok = tmp_path / "ok"
    ok.mkdir(mode=0o755)
    check_dir(ok)
    ensure_dir(ok, 0o700)  # an existing safe dir is used as it is
    assert mode(ok) == 0o755
    check_dir(tmp_path / "absent")  # nothing to refuse
