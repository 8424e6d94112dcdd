"""Files vtpmctl writes never go through a link another user planted.

Root exporting into, or logging into, a shared world-writable directory must
not overwrite whatever a local user points a symbolic link (or a hard link)
at: the last component of every path vtpmctl writes is never followed, and a
FIFO or device is written only when the path names it directly.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from instance_helpers import VTPMCTL, Home, home_at

NOBODY = 65534
PRECIOUS = b"precious bytes that belong to root\n"


def vt(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*VTPMCTL, *args], capture_output=True, timeout=60, stdin=subprocess.DEVNULL, env=env
    )


def one_line_error(result: subprocess.CompletedProcess[bytes], *needles: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == 1, (result.returncode, err, result.stdout[:200])
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A directory like /tmp: world-writable and sticky."""
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o1777)
    return d


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    v.write_bytes(PRECIOUS)
    v.chmod(0o644)
    return v


def plant(link: Path, target: Path) -> Path:
    """What a local user does in a shared directory: a link of theirs to root's file."""
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)
    return link


def untouched(victim: Path) -> None:
    assert victim.read_bytes() == PRECIOUS
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    with home_at(tmp_path / "h") as h:
        yield h


# ---------------------------------------------------------------- state export


def test_state_export_refuses_a_planted_link(
    vtpm_server: Callable[..., Any], shared: Path, victim: Path
) -> None:
    server = vtpm_server(flags="not-need-init")
    target = f"unix:{server.ctrl.path}"
    link = plant(shared / "out.blob", victim)
    one_line_error(vt("state", "export", target, "-o", str(link)), "symbolic link")
    untouched(victim)
    assert link.is_symlink()


def test_state_export_writes_a_device_only_when_named_directly(
    vtpm_server: Callable[..., Any], shared: Path
) -> None:
    server = vtpm_server(flags="not-need-init")
    target = f"unix:{server.ctrl.path}"
    link = plant(shared / "null", Path(os.devnull))
    one_line_error(vt("state", "export", target, "-o", str(link)), "symbolic link")
    result = vt("state", "export", target, "-o", os.devnull)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- migrate export


def test_migrate_export_refuses_a_planted_link(home: Home, shared: Path, victim: Path) -> None:
    home.run("create", "m", "--no-ek")
    link = plant(shared / "m.bundle", victim)
    one_line_error(vt("migrate", "export", "m", "-o", str(link), env=home.env), "symbolic link")
    untouched(victim)
    assert link.is_symlink()


def test_migrate_export_into_a_fifo_named_directly(home: Home, tmp_path: Path) -> None:
    """A FIFO is written into, not replaced by a regular file."""
    home.run("create", "m", "--no-ek")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = vt("migrate", "export", "m", "-o", str(fifo), env=home.env)
    reader.join(20)
    assert result.returncode == 0, result.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert got and got[0][257:262] == b"ustar"  # a tar came through the pipe


# ---------------------------------------------------------------- serve's own files


def test_serve_log_file_refuses_a_planted_link(tmp_path: Path, shared: Path, victim: Path) -> None:
    link = plant(shared / "vtpm.log", victim)
    result = subprocess.run(
        [
            *VTPMCTL,
            "serve",
            "--state",
            str(tmp_path / "state"),
            "--ctrl",
            f"unix:{tmp_path}/ctrl",
            "--log-file",
            str(link),
            "--flags",
            "not-need-init",
        ],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "symbolic link" in result.stderr.decode()
    untouched(victim)


def test_serve_log_file_refuses_a_hard_link_or_a_foreign_file(
    tmp_path: Path, shared: Path, victim: Path
) -> None:
    hard = shared / "hard.log"
    os.link(victim, hard)
    foreign = shared / "foreign.log"
    foreign.write_bytes(b"")
    os.chown(foreign, NOBODY, NOBODY)
    for log, needle in ((hard, "hard links"), (foreign, f"uid {NOBODY}")):
        result = subprocess.run(
            [
                *VTPMCTL,
                "serve",
                "--state",
                str(tmp_path / "state"),
                "--ctrl",
                f"unix:{tmp_path}/ctrl",
                "--log-file",
                str(log),
            ],
            capture_output=True,
            timeout=30,
        )
        assert result.returncode != 0
        assert needle in result.stderr.decode(), result.stderr
    untouched(victim)
    assert foreign.read_bytes() == b""


def test_serve_pid_file_replaces_a_planted_link(
    vtpm_server: Callable[..., Any], shared: Path, victim: Path
) -> None:
    link = plant(shared / "vtpm.pid", victim)
    server = vtpm_server(flags="not-need-init", extra_args=["--pid-file", str(link)])
    untouched(victim)
    assert not link.is_symlink() and link.read_text().strip() == str(server.proc.pid)


# ---------------------------------------------------------------- named instances


def test_start_and_create_never_log_through_a_link(home: Home, victim: Path) -> None:
    roots = home.registry().roots
    roots.logs.mkdir(parents=True, mode=0o700)
    plant(roots.logs / "a.log", victim)
    one_line_error(vt("create", "a", "--no-ek", env=home.env), "symbolic link")
    untouched(victim)
    (roots.logs / "a.log").unlink(missing_ok=True)  # the failed create may have removed it
    home.run("create", "a", "--no-ek")
    (roots.logs / "a.log").unlink()
    plant(roots.logs / "a.log", victim)
    one_line_error(vt("start", "a", env=home.env), "symbolic link")
    untouched(victim)
    assert home.status("a")[0] == 3


# ---------------------------------------------------------------- names CUSE cannot take


@pytest.fixture
def short_home() -> Iterator[Home]:
    """A store whose socket paths leave room for 64-character names."""
    base = Path(tempfile.mkdtemp(prefix="h", dir="/tmp"))
    try:
        with home_at(base) as h:
            yield h
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_cuse_instance_name_fits_the_device_name(short_home: Home, tmp_path: Path) -> None:
    """CUSE takes 63 characters after vtpm-: a longer name is refused before anything is made."""
    home = short_home
    long = "n" * 64
    one_line_error(vt("create", long, "--no-ek", "--transport", "cuse", env=home.env), "63")
    assert not home.registry().paths(long).base.exists()
    home.run("create", "m", "--no-ek")
    bundle = tmp_path / "m.bundle"
    home.run("migrate", "export", "m", "-o", str(bundle))
    one_line_error(
        vt("migrate", "import", str(bundle), "--name", long, "--transport", "cuse", env=home.env),
        "63",
    )
    assert not home.registry().paths(long).base.exists()
    home.run("create", "n" * 63, "--no-ek", "--transport", "cuse")
    home.run("create", long, "--no-ek")  # a socket instance may have the full 64
