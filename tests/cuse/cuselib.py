"""Helpers for the CUSE suite: served devices, raw device I/O, the real clients.

Test modules import this as ``cuselib`` (a plain module, so it never clashes
with another directory's conftest).

Everything here runs in the CUSE VM (tests/cuse/run.sh), where Python is
30-60 times slower than on the host: servers are started once per module,
most checks run in this process, and every wait is generous.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vtpmctl.device.client.control import ControlClient
from vtpmctl.device.client.ioctl import DeviceTransport
from vtpmctl.device.protocol import MESSAGES, Cmd, decode_ioctl_response, encode_ioctl_request

CUSE = "/dev/cuse"
VENV_BIN = Path(sys.executable).parent
VTPMCTL = str(VENV_BIN / "vtpmctl")
# A server start takes seconds in the guest, and minutes when the host is busy
# (the guest's CPUs are emulated).
START_TIMEOUT = 600.0
TOOL_TIMEOUT = 600.0

needs_cuse = [
    pytest.mark.cuse,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(
        not os.path.exists(CUSE), reason="no /dev/cuse here; run tests/cuse/run.sh (a VM with CUSE)"
    ),
    pytest.mark.skipif(
        os.path.exists(CUSE) and not os.access(CUSE, os.R_OK | os.W_OK),
        reason="/dev/cuse needs root",
    ),
]


def run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = TOOL_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run a tool; on failure the assertion shows its output."""
    result = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check:
        assert result.returncode == 0, (
            f"{' '.join(argv)} exited {result.returncode}\n"
            f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
        )
    return result


def is_chardev(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


@dataclass
class Served:
    """One `vtpmctl serve` process and what it serves."""

    argv: list[str]
    state: Path
    log: Path
    proc: subprocess.Popen[bytes]
    device: str | None = None  # /dev/vtpm-NAME
    ctrl: str | None = None  # unix socket paths for a socket server
    data: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"server did not exit within {timeout:g} s\n{self.log_text()[-3000:]}"
            ) from None

    def stop(self, timeout: float = 120.0) -> int:
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    # -- the clients

    def client(self) -> ControlClient:
        """The in-process control client (opens the device: one opener at a time)."""
        assert self.device is not None
        return ControlClient(DeviceTransport(self.device, timeout=TOOL_TIMEOUT))

    def swtpm_ioctl(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        if self.device is not None:
            argv = ["swtpm_ioctl", *args, self.device]
        else:
            argv = ["swtpm_ioctl", "--unix", str(self.ctrl), *args]
        return run(argv, check=check, env=None if env is None else dict(os.environ, **env))

    def tpm2(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        tcti = f"device:{self.device}" if self.device else f"swtpm:path={self.data}"
        return run([f"tpm2_{tool}", *args], check=check, env=dict(os.environ, TPM2TOOLS_TCTI=tcti))

    def vtpmctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([VTPMCTL, *args], check=check)

    @property
    def target(self) -> str:
        return self.device if self.device is not None else f"unix:{self.ctrl}"


def _wait_until(ready: Callable[[], bool], served: Served, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if not served.running:
            raise AssertionError(
                f"{what}: the server exited with {served.proc.returncode}\n"
                f"{served.log_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            served.stop()
            raise AssertionError(
                f"{what}: not ready after {START_TIMEOUT:g} s\n{served.log_text()[-3000:]}"
            )
        time.sleep(0.05)


# The daemon entry point is what `vtpmctl serve` runs, without the command line's
# start-up (typer costs tens of seconds in the guest); tests of the command
# itself ask for it with cli=True.
DAEMON = [sys.executable, "-m", "vtpmctl", "_daemon"]


def serve_cuse(name: str, state: Path, *extra: str, cli: bool = False) -> Served:
    """`vtpmctl serve --cuse NAME`; returns once /dev/vtpm-NAME exists."""
    device = f"/dev/vtpm-{name}"
    assert not os.path.exists(device), f"{device} exists before the test"
    state.mkdir(parents=True, exist_ok=True)
    log = state.parent / f"{state.name}.log"
    argv = [*([VTPMCTL, "serve"] if cli else DAEMON), "--state", str(state), "--cuse", name, *extra]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    served = Served(argv, state, log, proc, device=device)
    _wait_until(lambda: is_chardev(device), served, f"serve --cuse {name}")
    return served


def serve_socket(state: Path, run_dir: Path, *extra: str) -> Served:
    """The socket frontend (sockets in the guest's /tmp: they cannot live on 9p)."""
    state.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = str(run_dir / "tpm")
    ctrl = data + ".ctrl"  # what the tss2 swtpm TCTI expects
    log = state.parent / f"{state.name}.log"
    argv = [
        *DAEMON,
        "--state",
        str(state),
        "--ctrl",
        f"unix:{ctrl}",
        "--data",
        f"unix:{data}",
        *extra,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    served = Served(argv, state, log, proc, ctrl=ctrl, data=data)
    _wait_until(lambda: os.path.exists(ctrl) and os.path.exists(data), served, "serve --ctrl")
    return served


@contextlib.contextmanager
def served_cuse(name: str, state: Path, *extra: str, cli: bool = False) -> Iterator[Served]:
    """A module's device; stopped with SIGTERM at the end, and the node must go."""
    served = serve_cuse(name, state, *extra, cli=cli)
    try:
        yield served
    finally:
        if served.running:
            assert served.stop() == 0, served.log_text()[-3000:]
        assert not os.path.exists(served.device or ""), "device node left behind"


# ---------------------------------------------------------------- raw device I/O


@contextlib.contextmanager
def opened(path: str, flags: int = os.O_RDWR) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def read_response(fd: int, timeout: float = TOOL_TIMEOUT) -> bytes:
    """One TPM response, in as many reads as the device hands out."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    data = b""
    while len(data) < 10 or len(data) < int.from_bytes(data[2:6], "big"):
        if not poller.poll(timeout * 1000):
            raise AssertionError("no response within the timeout")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"end of file after {len(data)} bytes")
        data += chunk
    return data


def transact_fd(fd: int) -> Callable[[bytes], bytes]:
    def transact(cmd: bytes) -> bytes:
        assert os.write(fd, cmd) == len(cmd)
        return read_response(fd)

    return transact


def ioctl_errno(fd: int, request: int) -> int:
    """The errno of one ioctl (0: it succeeded).

    The buffer is never smaller than the size the number encodes (the kernel
    copies that much back), and over 1024 bytes so fcntl passes it directly.
    """
    import fcntl

    buf = bytearray(max(1025, (request >> 16) & 0x3FFF))
    try:
        fcntl.ioctl(fd, request, buf, True)
    except OSError as exc:
        return exc.errno or -1
    return 0


def rc_of(response: bytes) -> int:
    return int.from_bytes(response[6:10], "big")


def ctl(
    fd: int, cmd: Cmd, fields: dict[str, int] | None = None, data: bytes = b""
) -> dict[str, int]:
    """One PTM ioctl on an open device, encoded by the protocol table."""
    import fcntl

    buf = encode_ioctl_request(cmd, fields, data)
    fcntl.ioctl(fd, MESSAGES[cmd].ioctl, buf, True)
    return decode_ioctl_response(cmd, buf)
