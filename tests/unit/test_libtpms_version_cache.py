"""An export names the installed libtpms without a child process each time.

The version a child reported is kept with what decides which file the
loader maps; any change to those makes the next call ask a child again.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vtpmctl import childproc
from vtpmctl.usecases import migrate


def _no_child(*args: object, **kwargs: object) -> object:
    raise AssertionError("a child was started")


def test_a_cached_version_is_used_while_the_library_is_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = tmp_path / "libtpms.so.0.9.9"
    lib.write_bytes(b"ELF")
    migrate._cache_version(tmp_path, str(lib), "9.9.9")
    monkeypatch.setattr(childproc, "run_child", _no_child)
    assert migrate.libtpms_version(tmp_path) == "9.9.9"


@pytest.mark.parametrize("change", ["library", "ld_library_path", "gone"])
def test_a_changed_library_is_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    lib = tmp_path / "libtpms.so.0.9.9"
    lib.write_bytes(b"ELF")
    migrate._cache_version(tmp_path, str(lib), "9.9.9")
    if change == "library":  # an upgrade replaces the file
        lib.unlink()
        lib.write_bytes(b"ELF2")
        os.utime(lib, ns=(1, 1))
    elif change == "ld_library_path":
        monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    else:
        lib.unlink()
    assert migrate._cached_version(tmp_path) is None


def test_the_real_version_is_cached(tmp_path: Path) -> None:
    first = migrate.libtpms_version(tmp_path)
    assert first is not None and first.count(".") == 2
    assert migrate._cached_version(tmp_path) == first
