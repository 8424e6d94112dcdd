"""A user's runtime root is judged by vtpmctl itself, without platformdirs' warnings."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from vtpmctl.store.paths import store_roots

USER = 1000


def roots_quietly(env: dict[str, str]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would be two lines on every command
        return store_roots(env, euid=USER).runtime


def runtime_dir(tmp_path: Path, uid: int = USER, mode: int = 0o700) -> Path:
    d = tmp_path / f"xdg-{uid}-{mode:o}"
    d.mkdir()
    d.chmod(mode)
    os.chown(d, uid, uid)
    return d


def test_no_xdg_runtime_dir_falls_back_without_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    runtime = roots_quietly({"HOME": str(tmp_path)})
    state = store_roots({"HOME": str(tmp_path)}, euid=USER).state
    if not Path(f"/run/user/{USER}").is_dir():
        assert runtime == state / "run"


def test_a_private_xdg_runtime_dir_of_the_user_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = runtime_dir(tmp_path)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(good))
    assert roots_quietly({"XDG_RUNTIME_DIR": str(good)}) == good / "vtpmctl"


@pytest.mark.parametrize(("uid", "mode"), [(USER + 1, 0o700), (USER, 0o755)])
def test_a_foreign_or_open_xdg_runtime_dir_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uid: int, mode: int
) -> None:
    bad = runtime_dir(tmp_path, uid, mode)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(bad))
    monkeypatch.setenv("HOME", str(tmp_path))
    runtime = roots_quietly({"XDG_RUNTIME_DIR": str(bad), "HOME": str(tmp_path)})
    assert not runtime.is_relative_to(bad)
