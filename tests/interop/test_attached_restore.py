"""``snapshot restore --tpmstate``: a snapshot of another manager's vTPM written back.

A real ``swtpm socket`` stands in for libvirt's or Proxmox's: NV data is written,
the vTPM snapshotted, the NV changed, swtpm stopped, the snapshot written into its
state location (a dir, a linear file, a dir encrypted with a passphrase on a
descriptor as libvirt runs it), and the real swtpm started again reads the
snapshot's NV back. While swtpm runs, and with a wrong key, nothing is written.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from instance_helpers import AttachedHome, Home, home_at
from swtpm_peer import SWTPM, SwtpmPeer, swtpm_socket

from vtpmctl.store.blob import FLAG_ENCRYPTED, parse_header

NV = "0x1500016"
BEFORE, AFTER = b"snapshot", b"changed!"
AES256 = "mode=aes-256-cbc"
LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o640)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    with home_at(tmp_path / "h") as h:
        yield AttachedHome(h.path)


def _nv_write(tpm: SwtpmPeer, data: bytes, define: bool = False) -> None:
    if define:
        tpm.tpm2("nvdefine", NV, "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite")
    tpm.tpm2("nvwrite", NV, "-C", "o", "-i", "-", input=data)


def _nv_read(tpm: SwtpmPeer) -> bytes:
    return tpm.tpm2("nvread", NV, "-C", "o", "-s", "8").stdout


def _one_line(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode != 0, res.stdout
    assert res.stderr.count("\n") == 1, res.stderr
    for word in words:
        assert word in res.stderr, res.stderr


def _dir(state: Path, tpmstate: str) -> Path | None:
    """swtpm_socket's own dir= (a linear file's swtpm gets a private one, overridden)."""
    return None if tpmstate.startswith("backend-uri=") else state


def _round_trip(
    home: Home,
    state: Path,
    tpmstate: str,
    extra: list[str] | None = None,
    key: tuple[str, ...] = (),
    exe: str | None = None,
) -> tuple[str, bytes]:
    """NV = BEFORE, snapshot, NV = AFTER, refused while running, swtpm stopped.

    Returns the vTPM's name and the state's bytes once swtpm stopped.
    """
    args = ["--tpmstate", tpmstate, *(extra or [])]
    with swtpm_socket(_dir(state, tpmstate), extra_args=args, exe=exe) as tpm:
        _nv_write(tpm, BEFORE, define=True)
        name = f"swtpm-{tpm.proc.pid}"
        home.run("snapshot", "create", name, *key)
        _nv_write(tpm, AFTER)
        _one_line(
            home.run("snapshot", "restore", name, "1", "--tpmstate", tpmstate, *key, check=False),
            "shut the VM down first",
        )
        tpm.shutdown()
    return name, _bytes(state)


def _tss() -> tuple[int, int] | None:
    """libvirt's swtpm user, when this test may give files to it."""
    try:
        tss = pwd.getpwnam("tss")
    except KeyError:
        return None
    return (tss.pw_uid, tss.pw_gid) if os.geteuid() == 0 else None


def _bytes(state: Path) -> bytes:
    files = sorted(state.iterdir()) if state.is_dir() else [state]
    return b"".join(f.name.encode() + f.read_bytes() for f in files if f.name != ".lock")


def _reads_back(
    state: Path, tpmstate: str, extra: list[str] | None = None, exe: str | None = None
) -> None:
    args = ["--tpmstate", tpmstate, *(extra or [])]
    with swtpm_socket(_dir(state, tpmstate), extra_args=args, exe=exe) as tpm:
        assert _nv_read(tpm) == BEFORE


def test_restore_into_a_stopped_swtpm_state_dir(home: Home, tmp_path: Path) -> None:
    state = tmp_path / "tpm2"
    tpmstate = f"dir={state}"
    name, _ = _round_trip(home, state, tpmstate)
    permall = state / "tpm2-00.permall"
    permall.chmod(0o604)  # a mode of the manager's own is kept, and its owner
    owner = _tss() or (os.geteuid(), os.getegid())
    os.chown(permall, *owner)
    (state / "tpm2-00.volatilestate").write_bytes(b"stale")
    holder = subprocess.Popen(  # .lock held by a process that is no swtpm
        [sys.executable, "-c", LOCK_HOLDER, str(state / ".lock")], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        _one_line(
            home.run("snapshot", "restore", name, "1", "--tpmstate", tpmstate, check=False),
            f"locked by pid {holder.pid}",
            "shut the VM down first",
        )
    finally:
        holder.kill()
        holder.wait()
    out = home.json("snapshot", "restore", name, "1", "--tpmstate", tpmstate)
    assert out["restored"]["id"] == 1 and out["safety_snapshot"]["id"] == 2, out
    assert out["volatile_removed"] == ["volatile"] and out["encrypted"] is False, out
    st = permall.stat()
    assert stat.S_IMODE(st.st_mode) == 0o604 and (st.st_uid, st.st_gid) == owner
    assert not (state / "tpm2-00.volatilestate").exists()
    text = home.run("snapshot", "restore", name, "1", "--tpmstate", tpmstate).stdout
    assert "volatile state is not written" in text and "reboot" in text, text
    _reads_back(state, tpmstate)


def _linear(home: Home, state: Path) -> None:
    tpmstate = f"backend-uri=file://{state}"
    name, _ = _round_trip(home, state, tpmstate)
    with open(state, "rb") as held:  # any process that has it open is its user
        _one_line(
            home.run("snapshot", "restore", name, "1", "--tpmstate", tpmstate, check=False),
            f"is open in pid {os.getpid()}",
            "shut the VM down first",
        )
        assert held.fileno() >= 0
    home.run("snapshot", "restore", name, "1", "--tpmstate", tpmstate)
    _reads_back(state, tpmstate)


def test_restore_into_a_stopped_swtpm_linear_file(home: Home, tmp_path: Path) -> None:
    _linear(home, tmp_path / "vm-103-disk-1.raw")


def test_restore_into_a_stopped_swtpm_block_device(home: Home, loop_device: str) -> None:
    """Proxmox's volume on LVM or Ceph: the device keeps its size, written in place."""
    _linear(home, Path(loop_device))


def test_restore_into_an_encrypted_state_dir_needs_its_key(home: Home, tmp_path: Path) -> None:
    """libvirt's <encryption secret=…>: swtpm reads the passphrase from a descriptor."""
    secret, wrong = tmp_path / "secret", tmp_path / "wrong"
    for path, data in ((secret, b"a libvirt secret's value"), (wrong, b"not the secret")):
        path.write_bytes(data)
        path.chmod(0o600)
    launcher = tmp_path / "swtpm"  # as libvirt: the passphrase on fd 3
    launcher.write_text(f'#!/bin/sh\nexec 3<{secret}\nexec {SWTPM} "$@"\n')
    launcher.chmod(0o700)
    state = tmp_path / "tpm2"
    tpmstate = f"dir={state}"
    extra = ["--key", f"pwdfd=3,{AES256}"]
    key = ("--key", f"pwdfile={secret},{AES256}")
    name, stopped = _round_trip(home, state, tpmstate, extra, key, exe=str(launcher))
    restore = ("snapshot", "restore", name, "1", "--tpmstate", tpmstate)
    _one_line(home.run(*restore, check=False), "encrypted", "--key")
    _one_line(home.run(*restore, "--key", f"pwdfile={wrong},{AES256}", check=False), "nothing")
    assert _bytes(state) == stopped
    out = home.json(*restore, *key)
    assert out["encrypted"] is True, out
    assert parse_header((state / "tpm2-00.permall").read_bytes()).flags & FLAG_ENCRYPTED
    _reads_back(state, tpmstate, extra, exe=str(launcher))
