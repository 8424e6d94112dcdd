"""Daemons forked by the zygote: separate TPMs, recognised by status and stop, exec fallback.

The zygote (``python -m vtpmctl _zygote``) imports the daemon's code and maps
libtpms but never makes a TPM, so the TPMs of two daemons it forked must not
share a random generator; a forked daemon shows the command line an exec'd
one has, and ``status`` and ``stop`` know both.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from instance_helpers import VTPMCTL, DataClient, Home, home_at, processes_serving

from vtpmctl.engine import tpm2 as t
from vtpmctl.usecases.supervisor import runs_daemon, runs_zygote, serves


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    with home_at(tmp_path / "h") as h:
        yield h


def _cmdline(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def _random(home: Home, name: str) -> bytes:
    home.run("ctl", name, "init")
    data = home.registry().paths(name).data_socket
    with DataClient(data) as client:
        assert client.transact(t.build_startup(t.SU_CLEAR))[6:10] == b"\0\0\0\0"
        return t.parse_get_random(client.transact(t.build_get_random(32)))


def test_forked_daemons_have_their_own_tpms(home: Home) -> None:
    for name in ("z1", "z2"):
        home.run("create", name, "--no-ek")
        home.run("start", name)
    pids = [home.status(name)[1]["pid"] for name in ("z1", "z2")]
    parents = {_ppid(pid) for pid in pids}
    assert len(parents) == 1, "both daemons come from one zygote"
    (zygote,) = parents
    assert runs_zygote(_cmdline(zygote))
    for pid, name in zip(pids, ("z1", "z2"), strict=True):
        state_dir = home.registry().paths(name).state_dir
        args = [a for a in _cmdline(pid) if a]  # the rest of the zygote's room is NULs
        assert runs_daemon(args) and os.fsencode(state_dir) in args
        assert b"--state" in args and b"--ctrl" in args
        assert serves(pid, state_dir)
        assert processes_serving(state_dir) == [pid]
    # A daemon of one instance is not the daemon of the other.
    assert not serves(pids[0], home.registry().paths("z2").state_dir)
    assert not serves(zygote, home.registry().paths("z1").state_dir)
    # Each TPM seeded its own generator after the fork.
    assert _random(home, "z1") != _random(home, "z2")
    for name, pid in zip(("z1", "z2"), pids, strict=True):
        assert f"stopped {name} (pid {pid})" in home.run("stop", name).stdout
        assert not os.path.exists(f"/proc/{pid}/cmdline") or _cmdline(pid) == [b""]
        assert home.status(name)[0] == 3


def test_exec_fallback_when_the_zygote_is_off(home: Home) -> None:
    home.run("create", "x", "--no-ek")
    env = dict(home.env, VTPMCTL_ZYGOTE="0")
    subprocess.run([*VTPMCTL, "start", "x"], env=env, check=True, capture_output=True)
    pid = home.status("x")[1]["pid"]
    assert runs_daemon(_cmdline(pid)) and not runs_zygote(_cmdline(_ppid(pid)))
    assert serves(pid, home.registry().paths("x").state_dir)
    home.run("stop", "x")  # the same stop knows an exec'd daemon
    assert home.status("x")[0] == 3


def test_forked_daemon_under_a_low_open_files_limit(home: Home) -> None:
    """The daemon takes its starter's limits; ``ulimit -n 256`` must not stop it."""
    import resource

    home.run("create", "lim", "--no-ek")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    subprocess.run(
        [*VTPMCTL, "start", "lim"],
        env=home.env,
        check=True,
        capture_output=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    )
    pid = home.status("lim")[1]["pid"]
    assert runs_zygote(_cmdline(_ppid(pid))), "forked, not the exec fallback"
    with open(f"/proc/{pid}/limits") as f:
        assert any(line.startswith("Max open files") and " 256 " in line for line in f)
    assert len(_random(home, "lim")) == 32
    home.run("stop", "lim")


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_encrypted_and_plain_daemons_share_one_zygote_without_cryptography(home: Home) -> None:
    """AES-CBC of encrypted states goes through the libcrypto libtpms maps: a daemon
    that encrypts maps nothing more, so it comes from the same zygote as a plain one."""
    home.run("create", "plain", "--no-ek")
    home.run("create", "sealed", "--no-ek", "--encrypt")
    for name in ("plain", "sealed"):
        home.run("start", name)
    pids = [home.status(name)[1]["pid"] for name in ("plain", "sealed")]
    assert len({_ppid(pid) for pid in pids}) == 1
    for pid in pids:
        maps = _maps(pid)
        assert "libcrypto.so" in maps and "/cryptography/" not in maps
    assert len(_random(home, "sealed")) == 32
    home.run("stop", "sealed")  # writes its encrypted state, which the next start reads
    home.run("start", "sealed")
    assert "/cryptography/" not in _maps(home.status("sealed")[1]["pid"])
    assert len(_random(home, "sealed")) == 32
    for name in ("plain", "sealed"):
        home.run("stop", name)


def test_a_forked_daemon_imports_nothing(home: Home) -> None:
    """Every module a daemon imports after the fork is loaded into pages of its own:
    with Python printing each import (PYTHONPROFILEIMPORTTIME, which reaches the
    zygote and so the daemon, whose stderr is the instance's log), the log of a
    daemon that started, served TPM commands and control commands and stopped
    shows none."""
    env = dict(home.env, PYTHONPROFILEIMPORTTIME="1")

    def run(*args: str) -> None:
        subprocess.run([*VTPMCTL, *args], env=env, check=True, capture_output=True, timeout=60)

    run("create", "q", "--no-ek")
    run("start", "q")
    pid = home.status("q")[1]["pid"]
    assert runs_zygote(_cmdline(_ppid(pid)))
    assert len(_random(home, "q")) == 32
    run("caps", "q")
    run("stop", "q")
    log = home.registry().paths("q").log_file.read_text()
    assert "serving" in log and "stopped" in log
    assert "import time:" not in log, log
