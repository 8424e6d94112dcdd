"""A full disk: every command says "no space left on device writing FILE", leaves nothing
stale behind (no sockets, temp files or half instances) and prints no traceback.

The store is on a small tmpfs of its own (the tests run as root), filled to the last
byte with a filler file once the instances it needs exist.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from instance_helpers import Home, home_at

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")


@pytest.fixture
def full(tmp_path: Path) -> Iterator[tuple[Home, Path]]:
    mnt = Path(f"/tmp/vtpm-full-{os.getpid()}")  # short: socket paths live under it
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        with home_at(mnt / "h") as home:
            yield home, mnt / "filler"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def fill(filler: Path) -> None:
    with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(65536))

    with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:  # the last few bytes
            f.write(b"\0")


def files(home: Home) -> list[str]:
    return sorted(str(p.relative_to(home.path)) for p in home.path.rglob("*"))


def says_disk_full(result: subprocess.CompletedProcess[str], what: str = "") -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "OSError" not in result.stderr, result.stderr
    assert "no space left on device writing " in lines[0], lines[0]
    assert what in lines[0], (what, lines[0])


def test_disk_full(full: tuple[Home, Path], tmp_path: Path) -> None:
    home, filler = full
    home.run("create", "a", "--no-ek")
    home.run("create", "b", "--no-ek")
    bundle = tmp_path / "b.bundle"
    home.run("migrate", "export", "b", "-o", str(bundle))
    key = tmp_path / "new.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    fill(filler)
    before = files(home)

    says_disk_full(home.run("create", "c", "--no-ek", check=False), "tpm2-00.permall")
    assert set(files(home)) ^ set(before) == set()
    says_disk_full(home.run("start", "a", check=False))
    assert home.status("a")[0] == 3  # stopped, no stale sockets or pid file
    foreground = home.run("start", "a", "--foreground", check=False, timeout=30)
    says_disk_full(foreground)
    assert home.status("a")[0] == 3
    says_disk_full(home.run("snapshot", "create", "b", check=False))
    says_disk_full(home.run("migrate", "import", str(bundle), "--name", "d", check=False))
    says_disk_full(home.run("key", "rotate", "b", "--new-key-file", str(key), check=False))
    assert set(files(home)) ^ set(before) == set()

    filler.unlink()  # space again: everything works as before
    home.run("start", "a")
    home.run("stop", "a")
    home.run("key", "rotate", "b", "--new-key-file", str(key))
    home.run("snapshot", "create", "b")


def test_rotation_that_runs_out_of_space_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up half-way through writing the re-encrypted files: the files
    written so far are taken back at once (not left for the next start to find)."""
    import errno

    from vtpmctl.store import instance_keys
    from vtpmctl.store.atomic import NoSpaceError, write_atomic
    from vtpmctl.store.keys import generate_key

    with home_at(tmp_path / "h") as home:
        home.run("create", "r", "--no-ek", "--encrypt")
        inst = home.registry().get("r")
        before = files(home)

        def full_at_rotate(path: Path, *args: object, **kwargs: object) -> None:
            if path.name.endswith(instance_keys.ROTATE_SUFFIX):
                raise NoSpaceError(errno.ENOSPC, path)
            write_atomic(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(instance_keys, "write_atomic", full_at_rotate)
        sd = inst.statedir()
        assert sd.lock(0)
        try:
            with pytest.raises(NoSpaceError, match="no space left on device writing"):
                instance_keys.rotate(inst, generate_key(), "key-file")
        finally:
            sd.unlock()
        assert set(files(home)) ^ set(before) == set()
        monkeypatch.undo()
        home.run("start", "r")  # the old key still opens it
        home.run("stop", "r")
