"""Start and drive a real ``swtpm socket`` for interoperability tests.

Usage::

    with swtpm_socket(state_dir, extra_args=["--key", f"file={k},mode=aes-256-cbc"]) as tpm:
        tpm.tpm2("nvread", "0x1500016", "-C", "o", "-s", "32")   # tpm2-tools via the swtpm TCTI
        tpm.ioctl("--save", "permanent", str(out))                 # swtpm_ioctl on the ctrl channel
        tpm.shutdown()                                             # CMD_SHUTDOWN, wait for exit

The context manager always kills the process and removes its socket directory, even when
the test fails. Sockets live in a short private directory under /tmp so that their paths
stay below the 108-byte AF_UNIX limit whatever pytest's tmp_path looks like.

Environment overrides (as in swtpm's own test suite): ``SWTPM_EXE``, ``SWTPM_IOCTL``.
Point ``SWTPM_EXE`` at another swtpm-compatible server to run the same tests against it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Transport = Literal["unix", "tcp"]

SWTPM = os.environ.get("SWTPM_EXE", "swtpm")
SWTPM_IOCTL = os.environ.get("SWTPM_IOCTL", "swtpm_ioctl")
LOCALHOST = "127.0.0.1"


class SwtpmPeerError(RuntimeError):
    """The peer did not start or a tool failed; the message carries the peer's log tail."""


@dataclass
class Endpoint:
    """Where a channel listens: a unix socket path or a localhost TCP port."""

    kind: Transport
    path: Path | None = None
    port: int | None = None

    def swtpm_arg(self) -> str:
        if self.kind == "unix":
            return f"type=unixio,path={self.path}"
        return f"type=tcp,port={self.port},bindaddr={LOCALHOST}"

    def connect(self, timeout: float = 2.0) -> socket.socket:
        if self.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = str(self.path)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (LOCALHOST, int(self.port or 0))
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock


@dataclass
class SwtpmPeer:
    """A running swtpm: its process, directories, endpoints and tool helpers."""

    proc: subprocess.Popen[bytes]
    state_dir: Path
    run_dir: Path
    ctrl: Endpoint
    data: Endpoint
    tpm2_mode: bool
    log_path: Path
    argv: list[str] = field(default_factory=list)

    @property
    def ioctl_target(self) -> list[str]:
        """swtpm_ioctl's arguments that select this peer's control channel."""
        if self.ctrl.kind == "unix":
            return ["--unix", str(self.ctrl.path)]
        return ["--tcp", f"{LOCALHOST}:{self.ctrl.port}"]

    @property
    def tcti(self) -> str:
        """The tss2 swtpm TCTI string (data at PATH / PORT, control at PATH.ctrl / PORT+1)."""
        if self.data.kind == "unix":
            if self.ctrl.kind != "unix" or self.ctrl.path != Path(f"{self.data.path}.ctrl"):
                raise SwtpmPeerError("the swtpm TCTI needs the ctrl socket at DATA.ctrl")
            return f"swtpm:path={self.data.path}"
        if self.ctrl.kind != "tcp" or self.ctrl.port != int(self.data.port or 0) + 1:
            raise SwtpmPeerError("the swtpm TCTI needs the ctrl port at data port + 1")
        return f"swtpm:host={LOCALHOST},port={self.data.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _fail(self, what: str, result: subprocess.CompletedProcess[bytes] | None = None) -> None:
        detail = ""
        if result is not None:
            detail = (
                f"\nexit {result.returncode}\nstdout: {result.stdout[-2000:]!r}"
                f"\nstderr: {result.stderr.decode(errors='replace')[-2000:]}"
            )
        raise SwtpmPeerError(f"{what} failed{detail}\n--- swtpm log ---\n{self.log_text()[-3000:]}")

    def ioctl(
        self, *args: str, check: bool = True, timeout: float = 10.0
    ) -> subprocess.CompletedProcess[bytes]:
        """Run swtpm_ioctl against this peer; with check, a non-zero exit raises."""
        result = subprocess.run(
            [SWTPM_IOCTL, *self.ioctl_target, *args],
            capture_output=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            self._fail(f"swtpm_ioctl {' '.join(args)}", result)
        return result

    def tpm2(
        self,
        tool: str,
        *args: str,
        check: bool = True,
        input: bytes | None = None,
        timeout: float = 20.0,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``tpm2_<tool>`` (tpm2-tools) through the swtpm TCTI; stdout is bytes."""
        env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti)
        result = subprocess.run(
            [f"tpm2_{tool}", *args], capture_output=True, env=env, input=input, timeout=timeout
        )
        if check and result.returncode != 0:
            self._fail(f"tpm2_{tool} {' '.join(args)}", result)
        return result

    def wait_exit(self, timeout: float = 5.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._fail(f"waiting {timeout}s for swtpm to exit")
            raise  # unreachable; keeps type checkers content

    def shutdown(self, timeout: float = 5.0) -> int:
        """CMD_SHUTDOWN (swtpm_ioctl -s) and wait: the clean way, state is written."""
        self.ioctl("-s")
        return self.wait_exit(timeout)

    def reinit(self) -> None:
        """CMD_INIT after a state load; a TPM 2 then still needs TPM2_Startup."""
        self.ioctl("-i")

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


def free_tcp_port_pair() -> int:
    """A port P with P and P+1 free now (the swtpm TCTI wants ctrl at data port + 1)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind((LOCALHOST, 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind((LOCALHOST, port + 1))
                except OSError:
                    continue
                return port
    raise SwtpmPeerError("no free pair of consecutive TCP ports")


def probe_ctrl(ctrl: Endpoint) -> bool:
    """CMD_GET_CAPABILITY answered: swtpm is in its main loop with both channels open."""
    try:
        with ctrl.connect(timeout=1.0) as sock:
            sock.sendall(b"\x00\x00\x00\x01")
            reply = b""
            while len(reply) < 8:
                chunk = sock.recv(8 - len(reply))
                if not chunk:
                    return False
                reply += chunk
            return True
    except OSError:
        return False


@contextlib.contextmanager
def swtpm_socket(
    state_dir: Path | None = None,
    *,
    tpm2: bool = True,
    ctrl: Transport = "unix",
    data: Transport = "unix",
    flags: str | None = "not-need-init,startup-clear",
    extra_args: Sequence[str] = (),
    log_level: int = 2,
    startup_timeout: float = 10.0,
    exe: str | None = None,
) -> Iterator[SwtpmPeer]:
    """Run ``swtpm socket`` until the block ends; yields a ready SwtpmPeer.

    ``state_dir`` is created if needed and left in place (default: a private one that is
    removed). With ``tcp``, data and ctrl get ports P and P+1 (the tss2 TCTI convention);
    with ``unix``, the sockets are RUN/tpm and RUN/tpm.ctrl. ``flags=None`` omits
    ``--flags`` (then swtpm waits for CMD_INIT). Extra arguments go last, e.g.
    ``["--key", "file=K,mode=aes-256-cbc,format=hex"]`` or ``["--migration", "incoming"]``.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="swtpm-", dir="/tmp"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        if state_dir is None:
            state_dir = run_dir / "state"
        state_dir.mkdir(parents=True, exist_ok=True)
        if data == "unix":
            data_ep = Endpoint("unix", path=run_dir / "tpm")
            ctrl_ep = (
                Endpoint("unix", path=run_dir / "tpm.ctrl")
                if ctrl == "unix"
                else Endpoint("tcp", port=free_tcp_port_pair())
            )
        else:
            port = free_tcp_port_pair()
            data_ep = Endpoint("tcp", port=port)
            ctrl_ep = (
                Endpoint("tcp", port=port + 1)
                if ctrl == "tcp"
                else Endpoint("unix", path=run_dir / "tpm.ctrl")
            )
        log_path = run_dir / "swtpm.log"
        argv = [exe or SWTPM, "socket"]
        if tpm2:
            argv.append("--tpm2")
        argv += [
            "--tpmstate", f"dir={state_dir}",
            "--ctrl", ctrl_ep.swtpm_arg(),
            "--server", data_ep.swtpm_arg(),
            "--log", f"file={log_path},level={log_level}",
        ]  # fmt: skip
        if flags:
            argv += ["--flags", flags]
        argv += list(extra_args)
        with open(run_dir / "swtpm.out", "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        peer = SwtpmPeer(proc, state_dir, run_dir, ctrl_ep, data_ep, tpm2, log_path, argv)
        deadline = time.monotonic() + startup_timeout
        while not probe_ctrl(ctrl_ep):
            if proc.poll() is not None or time.monotonic() > deadline:
                output = (run_dir / "swtpm.out").read_text(errors="replace")
                raise SwtpmPeerError(
                    f"swtpm did not come up (exit {proc.poll()}): {' '.join(argv)}\n"
                    f"{output[-2000:]}\n--- log ---\n{peer.log_text()[-2000:]}"
                )
            time.sleep(0.01)
        yield peer
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        shutil.rmtree(run_dir, ignore_errors=True)
