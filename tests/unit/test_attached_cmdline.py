"""Attached vTPMs: what a running swtpm's command line says, and a linear file held by it."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from vtpmctl.store.attached import parse
from vtpmctl.store.linearfile import HeldFile, LinearFile
from vtpmctl.store.statedir import StateDirError

ME = pwd.getpwuid(os.geteuid()).pw_name
LIBVIRT = [
    "/usr/local/bin/swtpm",
    "socket",
    "--ctrl",
    "type=unixio,path=/run/libvirt/qemu/swtpm/5-web 1-swtpm.sock,mode=0600",
    "--tpmstate",
    "dir=/var/lib/libvirt/swtpm/U/tpm2,mode=0600",
    "--log",
    "file=/var/log/swtpm/libvirt/qemu/web-swtpm.log",
    "--terminate",
    "--tpm2",
    "--key",
    "pwdfd=31,mode=aes-256-cbc",
    "--migration-key",
    "pwdfd=34,mode=aes-256-cbc",
]
PROXMOX = [
    "swtpm",
    "socket",
    "--tpmstate",
    "backend-uri=file:///dev/zvol/rpool/data/vm-101-disk-1,mode=0600",
    "--ctrl",
    "type=unixio,path=/var/run/qemu-server/101.swtpm,mode=0600",
    "--pid",
    "file=/var/run/qemu-server/101.swtpm.pid",
    "--terminate",
    "--daemon",
    "--log",
    "file=/run/qemu-server/101-swtpm.log,level=1,prefix=[id=101]",
    "--tpm2",
]


def test_libvirts_line() -> None:
    found = parse(7, LIBVIRT, os.geteuid(), "libvirtd")
    assert found is not None
    assert (found.name, found.owner) == ("libvirt-web_1", f"libvirt ({ME})")
    assert found.state_dir == Path("/var/lib/libvirt/swtpm/U/tpm2") and not found.state_file
    assert found.tpm2 and found.encrypted and found.migration_key


def test_proxmoxs_linear_file() -> None:
    found = parse(8, PROXMOX, os.geteuid(), "")
    assert found is not None
    assert (found.name, found.owner) == ("pve-101", f"proxmox ({ME})")
    assert found.state_dir == Path("/dev/zvol/rpool/data/vm-101-disk-1") and found.state_file
    assert not found.encrypted


@pytest.mark.parametrize(
    ("parent", "owner"), [("", ME), ("bash", f"bash ({ME})")], ids=["daemonized", "child"]
)
def test_an_unknown_managers_owner_is_its_user(parent: str, owner: str) -> None:
    argv = [
        "swtpm",
        "socket",
        "--tpmstate",
        "backend-uri=dir:///s",
        "--ctrl",
        "type=unixio,path=/c",
    ]
    found = parse(9, argv, os.geteuid(), parent)
    assert found is not None and (found.name, found.owner) == ("swtpm-9", owner)


@pytest.mark.parametrize(
    "args",
    [
        ["--tpmstate", "dir=/s", "--ctrl", "type=tcp,port=2322"],  # reachable through QEMU only
        ["--tpmstate", "backend-uri=file://", "--ctrl", "type=unixio,path=/c"],
        ["--ctrl", "type=unixio,path=/c"],  # TPM_PATH
    ],
)
def test_swtpms_vtpmctl_cannot_reach_or_name_are_skipped(args: list[str]) -> None:
    assert parse(9, ["swtpm", "socket", *args], 0, "") is None


def test_a_held_file_is_held_while_its_process_lives(tmp_path: Path) -> None:
    path = tmp_path / "vm.raw"
    LinearFile(path).write_raw("permall", b"p" * 100)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        held = HeldFile(path, proc.pid)
        assert held.holder_pid() == proc.pid and not held.lock()
        assert held.read_raw("permall") == b"p" * 100
    finally:
        proc.kill()
        proc.wait()
    gone = HeldFile(path, proc.pid)
    assert gone.holder_pid() is None and gone.lock()


def test_a_held_file_read_while_written_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A linear file is written in place: a read is repeated until two reads agree."""
    held = HeldFile(tmp_path / "vm.raw", os.getpid())
    reads = iter([b"torn", b"new", b"new"])
    monkeypatch.setattr(LinearFile, "read_raw", lambda self, name: next(reads))
    assert held.read_raw("permall") == b"new"
    reads = iter([bytes([i]) for i in range(10)])
    with pytest.raises(StateDirError, match="kept changing"):
        held.read_raw("permall")
