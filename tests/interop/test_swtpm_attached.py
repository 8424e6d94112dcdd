"""vTPMs that vtpmctl's ``swtpm`` runs for another manager, seen (never taken over) by vtpmctl.

The swtpm is started with the command lines Proxmox VE (linear file backend, on a
plain file and on a loop block device) and libvirt (a state dir encrypted with a
passphrase on a descriptor) use, daemonized, as the managers run them. vtpmctl's
store is a private ``$VTPMCTL_HOME`` with ``VTPMCTL_ATTACHED=1``, so it lists every
swtpm on the machine: each test looks for its own by pid.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.interop.instance_helpers import VTPMCTL

ROOT = Path(__file__).resolve().parents[2]
SWTPM_IOCTL = shutil.which("swtpm_ioctl", path="/usr/bin")
pytestmark = pytest.mark.skipif(SWTPM_IOCTL is None, reason="needs swtpm_ioctl 0.7.1")
SECRET = b"a libvirt secret's value"
EK_HANDLES = {"0x81010001", "0x81010016"}


def _env(home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), VTPMCTL_ATTACHED="1")
    if home is not None:
        env["VTPMCTL_HOME"] = str(home)
    return env


def _pipe(data: bytes) -> int:
    """A descriptor to read ``data`` from, as libvirt hands its secrets over."""
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return r


def _run(
    argv: list[str], home: Path | None = None, secret_fds: int = 0
) -> tuple[subprocess.CompletedProcess[str], list[int]]:
    """Run ``argv`` with SECRET on ``secret_fds`` pipes, whose numbers replace {0}, {1}."""
    fds = [_pipe(SECRET) for _ in range(secret_fds)]
    try:
        res = subprocess.run(
            [a.format(*fds) for a in argv],
            capture_output=True,
            text=True,
            env=_env(home),
            timeout=60,
            pass_fds=fds,
        )
    finally:
        for fd in fds:
            os.close(fd)
    return res, fds


def vtpmctl(home: Path, *args: str, key_fd: bool = False) -> subprocess.CompletedProcess[str]:
    return _run([*VTPMCTL, *args], home, secret_fds=1 if key_fd else 0)[0]


def _setup(launchers: Path, tpmstate: str, *extra: str) -> None:
    res, _ = _run(
        [
            str(launchers / "swtpm_setup"),
            "--tpm2",
            "--tpmstate",
            tpmstate,
            "--createek",
            "--create-ek-cert",
            "--create-platform-cert",
            "--lock-nvram",
            "--not-overwrite",
            *extra,
        ],
        secret_fds=1 if extra else 0,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _start(launchers: Path, run_dir: Path, tpmstate: str, *extra: str) -> tuple[int, Path]:
    """The daemonized swtpm (its pid) and its control socket."""
    ctrl, pid_file = run_dir / "ctrl.sock", run_dir / "swtpm.pid"
    res, _ = _run(
        [
            str(launchers / "swtpm"),
            "socket",
            "--tpmstate",
            tpmstate,
            "--ctrl",
            f"type=unixio,path={ctrl},mode=0600",
            "--pid",
            f"file={pid_file}",
            "--terminate",
            "--daemon",
            "--log",
            f"file={run_dir / 'swtpm.log'},level=1,prefix=[id=101]",
            "--tpm2",
            *extra,
        ],
        secret_fds=2 if extra else 0,
    )
    assert res.returncode == 0, res.stderr
    return int(pid_file.read_text()), ctrl


def _stop(pid: int, ctrl: Path) -> None:
    """CMD_SHUTDOWN through the real swtpm_ioctl, as the manager would; kill if need be."""
    subprocess.run([SWTPM_IOCTL or "swtpm_ioctl", "--unix", str(ctrl), "-s"], timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def _listed(home: Path, pid: int) -> dict[str, Any] | None:
    res = vtpmctl(home, "list", "--json")
    assert res.returncode == 0, res.stderr
    found = [i for i in json.loads(res.stdout)["instances"] if i["pid"] == pid]
    return found[0] if found else None


def _one_line(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1, res.stderr
    for word in words:
        assert word in res.stderr, res.stderr


def _reads(
    home: Path, run_dir: Path, name: str, source: str, *key: str, key_fd: bool = False
) -> None:
    """snapshot create, verify, migrate export and ek export work; nothing is written back."""
    res = vtpmctl(home, "snapshot", "create", name, "--json", *key, key_fd=key_fd)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["source"] == source, res.stdout
    res = vtpmctl(home, "verify", name, "--json", *key, key_fd=key_fd)
    assert json.loads(res.stdout)["ok"], res.stdout
    bundle = run_dir / "vtpm.bundle"
    res = vtpmctl(home, "migrate", "export", name, "--allow-running", "-o", str(bundle), *key,
                  key_fd=key_fd)  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = vtpmctl(home, "ek", "export", name, "--json", *key, key_fd=key_fd)
    assert res.returncode == 0, res.stderr
    eks = json.loads(res.stdout)
    assert {e["handle"] for e in eks["eks"]} == EK_HANDLES, eks
    assert all(e["certificate_pem"] for e in eks["eks"]) and eks["locked"], eks
    # never taken over: no state written back, no start, stop or rm
    _one_line(vtpmctl(home, "snapshot", "restore", name, "1"), "never")
    _one_line(vtpmctl(home, "migrate", "import", str(bundle)), "never", "--name")
    res = vtpmctl(home, "migrate", "import", str(bundle), "--name", "copy", "--json")
    assert res.returncode == 0, res.stderr  # a vTPM of vtpmctl's own, from the manager's
    _one_line(vtpmctl(home, "stop", name), "does not stop")
    _one_line(vtpmctl(home, "start", name), "does not start")
    _one_line(vtpmctl(home, "ctl", name, "shutdown"), "does not change it", "unix:")
    _one_line(vtpmctl(home, "state", "import", name, str(bundle)), "does not change it")
    _one_line(vtpmctl(home, "key", "rotate", name, "--new-key-file", str(bundle)), "never")


def _proxmox(launchers: Path, run_dir: Path, state: str) -> None:
    """swtpm_setup and swtpm with qemu-server's command lines, then vtpmctl reads it."""
    tpmstate = f"backend-uri=file://{state}"
    _setup(launchers, f"file://{state}")
    pid, ctrl = _start(launchers, run_dir, f"{tpmstate},mode=0600")
    home = run_dir / "home"
    try:
        found = _listed(home, pid)
        assert found is not None
        assert found["state"] == "running" and found["state_dir"] == state, found
        user = pwd.getpwuid(os.geteuid()).pw_name
        assert found["owner"] == user or found["owner"].endswith(f"({user})"), found
        # QEMU's firmware would initialise the TPM: then it is read through the admin endpoint
        subprocess.run([SWTPM_IOCTL or "swtpm_ioctl", "--unix", str(ctrl), "-i"], check=True)
        _reads(home, run_dir, found["name"], "control channel")
    finally:
        _stop(pid, ctrl)
    assert _listed(home, pid) is None  # gone with its process


def test_proxmox_linear_file_is_listed_and_read(launchers: Path, run_dir: Path) -> None:
    _proxmox(launchers, run_dir, str(run_dir / "vm-101-disk-1.raw"))


def test_proxmox_block_device_is_listed_and_read(
    launchers: Path, run_dir: Path, loop_device: str
) -> None:
    _proxmox(launchers, run_dir, loop_device)


def test_libvirt_encrypted_state_needs_its_key(launchers: Path, run_dir: Path) -> None:
    """libvirt's <encryption secret=…>: the passphrase on descriptors, state and migration key."""
    state = run_dir / "tpm2"
    state.mkdir()
    _setup(launchers, str(state), "--pwdfile-fd", "{0}", "--cipher", "aes-256-cbc")
    keys = ("--key", "pwdfd={0},mode=aes-256-cbc", "--migration-key", "pwdfd={1},mode=aes-256-cbc")
    pid, ctrl = _start(launchers, run_dir, f"dir={state},mode=0600", *keys)
    home = run_dir / "home"
    try:
        found = _listed(home, pid)
        assert found is not None and found["encrypted"] and found["migration_key"], found
        name = found["name"]
        without = vtpmctl(home, "snapshot", "create", name)
        _one_line(without, "encrypted", "--key pwdfd=")
        assert json.loads(vtpmctl(home, "verify", name, "--json").stdout)["ok"] is False
        _one_line(vtpmctl(home, "ek", "export", name), "--key")
        wrong = run_dir / "wrong"
        wrong.write_bytes(b"not the secret")
        wrong.chmod(0o600)
        _one_line(
            vtpmctl(home, "snapshot", "create", name, "--key", f"pwdfile={wrong}"),
            "does not open",
        )
        # its swtpm hands its state out under the migration key: read from its files
        key = ("--key", "pwdfd={0},mode=aes-256-cbc")
        _reads(home, run_dir, name, "state file", *key, key_fd=True)
    finally:
        _stop(pid, ctrl)
