"""Helpers for tests of named instances: the CLI in a private VTPMCTL_HOME, raw TPM I/O.

``Home`` runs ``vtpmctl`` as a user would (a subprocess with its own VTPMCTL_HOME) and, at
the end of the test, kills whatever daemons it left running, by the pid that holds each
state lock. ``DataClient`` speaks TPM commands on a data socket with no TSS in between,
so loops of thousands of commands stay fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtpmctl.device.protocol import Cmd
from vtpmctl.engine import tpm2 as t
from vtpmctl.store.instances import Registry
from vtpmctl.store.paths import store_roots
from vtpmctl.usecases.supervisor import serves

VTPMCTL = [str(Path(sys.executable).with_name("vtpmctl"))]  # the console script


@dataclass
class Home:
    """One private vtpmctl store (VTPMCTL_HOME) and the CLI pointed at it."""

    path: Path

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ, VTPMCTL_HOME=str(self.path))
        env.pop("NOTIFY_SOCKET", None)
        return env

    def run(
        self, *args: str, check: bool = True, timeout: float = 60.0, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*VTPMCTL, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input="" if input is None else input.decode(),
            check=False,
        )  # never a tty
        if check and result.returncode != 0:
            raise AssertionError(
                f"vtpmctl {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def json(self, *args: str, check: bool = True) -> dict[str, Any]:
        result = self.run(*args, "--json", check=check)
        data = json.loads(result.stdout)
        assert isinstance(data, dict)
        return data

    def status(self, name: str) -> tuple[int, dict[str, Any]]:
        result = self.run("status", name, "--json", check=False)
        return result.returncode, json.loads(result.stdout)

    def registry(self) -> Registry:
        return Registry(store_roots({"VTPMCTL_HOME": str(self.path)}))

    def tpm2(
        self, name: str, tool: str, *args: str, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """tpm2-tools through the endpoints that `status --json` reports."""
        _, st = self.status(name)
        data = st["endpoints"]["data"]
        assert data.startswith("unix:")
        assert st["endpoints"]["ctrl"] == f"{data}.ctrl"  # what the swtpm TCTI assumes
        env = dict(os.environ, TPM2TOOLS_TCTI=f"swtpm:path={data[5:]}")
        result = subprocess.run(
            [f"tpm2_{tool}", *args],
            env=env,
            capture_output=True,
            input=input,
            timeout=30,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"tpm2_{tool} {' '.join(args)} exited {result.returncode}: "
                f"{result.stderr.decode(errors='replace')}"
            )
        return result

    def daemon_pids(self) -> list[int]:
        reg = self.registry()
        pids = []
        for name in reg.names():
            holder = reg.get(name).statedir().holder_pid()
            if holder is not None:
                pids.append(holder)
        return pids

    def kill_all(self) -> None:
        for pid in self.daemon_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.daemon_pids() and time.monotonic() < deadline:
            time.sleep(0.02)


@dataclass
class AttachedHome(Home):
    """A private store that also sees host-wide attached vTPMs."""

    @property
    def env(self) -> dict[str, str]:
        return dict(super().env, VTPMCTL_ATTACHED="1")


@contextlib.contextmanager
def home_at(path: Path) -> Iterator[Home]:
    home = Home(path)
    try:
        yield home
    finally:
        home.kill_all()


def processes_serving(state_dir: Path) -> list[int]:
    """Every vtpmctl daemon serving this state dir, exec'd or forked by the zygote."""
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and serves(int(entry), state_dir)
    ]


class DataClient:
    """Raw TPM commands on a data socket: one request, one whole response."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> DataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("TPM closed the data connection")
            out += chunk
        return out

    def transact(self, cmd: bytes) -> bytes:
        self.sock.sendall(cmd)
        head = self._read(10)
        size = int.from_bytes(head[2:6], "big")
        return head + self._read(size - 10)


def rc(resp: bytes) -> int:
    return int.from_bytes(resp[6:10], "big")


NV_INDEX = 0x01500016
NV_ATTRS = t.NvAttr.OWNERWRITE | t.NvAttr.OWNERREAD | t.NvAttr.NO_DA


def nv_define(transact: t.Transact, index: int = NV_INDEX, size: int = 8) -> None:
    t.nv_define_space(transact, t.NvPublic(index, t.Alg.SHA256, NV_ATTRS, b"", size))


def nv_write_cmd(value: bytes, index: int = NV_INDEX) -> bytes:
    return t.build_nv_write(index, value, auth_handle=t.RH_OWNER)


def nv_read(transact: t.Transact, size: int = 8, index: int = NV_INDEX) -> bytes:
    return t.parse_nv_read(transact(t.build_nv_read(index, size, auth_handle=t.RH_OWNER)))


# ---------------------------------------------------------------- as QEMU does


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def _control(ctrl: socket.socket, request: bytes) -> int:
    ctrl.sendall(request)
    return int.from_bytes(_recv_exact(ctrl, 4), "big")


def pcrs_after_resume(ctrl_path: Path) -> dict[int, bytes]:
    """Be the next VM run: a data channel by CMD_SET_DATAFD, CMD_INIT, TPM2_Startup(SU_STATE),
    PCR_Read; then CMD_SHUTDOWN as QEMU sends at its exit. {pcr: sha256 digest}."""
    ours, theirs = socket.socketpair()
    with ours, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ctrl:
        ctrl.settimeout(10)
        ours.settimeout(10)
        ctrl.connect(str(ctrl_path))
        socket.send_fds(ctrl, [struct.pack(">I", Cmd.SET_DATAFD)], [theirs.fileno()])
        theirs.close()
        assert int.from_bytes(_recv_exact(ctrl, 4), "big") == 0
        assert _control(ctrl, struct.pack(">II", Cmd.INIT, 0)) == 0

        def transact(cmd: bytes) -> bytes:
            ours.sendall(cmd)
            head = _recv_exact(ours, 10)
            return head + _recv_exact(ours, int.from_bytes(head[2:6], "big") - 10)

        resp = transact(t.build_startup(t.SU_STATE))
        rc = int.from_bytes(resp[6:10], "big")
        assert rc == 0, f"TPM2_Startup(SU_STATE) failed: 0x{rc:x} (no orderly shutdown saved)"
        pcrs = t.pcr_read(transact, {t.Alg.SHA256: range(8)})[t.Alg.SHA256]
        assert _control(ctrl, struct.pack(">I", Cmd.SHUTDOWN)) == 0
    return pcrs
