"""QEMU and QMP for the acceptance tests: start a VM whose TPM is our server.

No guest OS: QEMU's SeaBIOS finds the TPM, sends TPM2_Startup (TPM_Startup on 1.2) and
extends PCRs 0-7, then stops at "No bootable device." on the ISA debug console (port
0x402), which tells the tests that the firmware has finished talking to the TPM.

Usage::

    vm = launch_qemu(run_dir, server.ctrl.path, device="tpm-crb")
    vm.execute("cont")
    vm.wait_firmware()
    vm.quit()                      # QEMU sends CMD_SHUTDOWN; the server exits

``kill()`` always ends the process; the test fixture calls it on teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QEMU = os.environ.get("QEMU_EXE", "qemu-system-x86_64")
FIRMWARE_DONE = b"No bootable device."

_BASE_ARGS = [
    "-machine", "q35", "-accel", "tcg", "-m", "128",
    "-nographic", "-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none",
]  # fmt: skip


class QmpError(RuntimeError):
    """QMP answered with an error, closed the connection or timed out."""


class Qmp:
    """A minimal QMP client: one command at a time, events kept in ``events``."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.events: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError:
            self._sock.close()
            raise
        self._file = self._sock.makefile("rwb")
        try:
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmpError(f"unexpected QMP greeting {greeting!r}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline()
        except TimeoutError:
            raise QmpError("QMP timed out") from None
        if not line:
            raise QmpError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; returns its ``return`` value, raises QmpError on ``error``."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._file.write(json.dumps(request).encode() + b"\n")
        self._file.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise QmpError(f"{command}: {msg['error'].get('desc', msg['error'])}")
            elif "return" in msg:
                return msg["return"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self._sock.close()


@dataclass
class QemuVm:
    """One QEMU process, its QMP connection and its logs."""

    proc: subprocess.Popen[bytes]
    run_dir: Path
    argv: list[str]
    qmp_path: Path
    stderr_path: Path
    bios_log: Path
    _qmp: Qmp | None = field(default=None, repr=False)

    @property
    def qmp(self) -> Qmp:
        assert self._qmp is not None, "QMP is not connected"
        return self._qmp

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def describe(self) -> str:
        """QEMU's command line, exit status, stderr and the firmware log, for failures."""

        def tail(path: Path, n: int = 3000) -> str:
            try:
                return path.read_text(errors="replace")[-n:]
            except FileNotFoundError:
                return "(none)"

        return (
            f"qemu: {' '.join(self.argv)}\nexit status: {self.proc.poll()}\n"
            f"--- qemu stderr ---\n{tail(self.stderr_path)}\n"
            f"--- firmware log (tail) ---\n{tail(self.bios_log, 1500)}"
        )

    def firmware_log(self) -> bytes:
        try:
            return self.bios_log.read_bytes()
        except FileNotFoundError:
            return b""

    def wait_firmware(self, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until the firmware has reached the boot stage ``count`` times."""
        deadline = time.monotonic() + timeout
        while self.firmware_log().count(FIRMWARE_DONE) < count:
            if not self.running:
                raise AssertionError(f"QEMU exited during boot\n{self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"firmware did not finish (boot {count}) in {timeout}s\n{self.describe()}"
                )
            time.sleep(0.05)

    def execute(self, command: str, **arguments: Any) -> Any:
        """A QMP command; a failure carries QEMU's stderr and the firmware log."""
        try:
            return self.qmp.execute(command, **arguments)
        except QmpError as exc:
            raise QmpError(f"{exc}\n{self.describe()}") from None

    def status(self) -> str:
        return str(self.execute("query-status")["status"])

    def wait_migration(self, timeout: float = 30.0) -> dict[str, Any]:
        """Poll ``query-migrate`` until completed; fails on failed/cancelled/timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise AssertionError(f"migration {status}: {info}\n{self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"migration still {status} after {timeout}s\n{self.describe()}"
                )
            time.sleep(0.05)

    def quit(self, timeout: float = 15.0) -> int:
        """QMP ``quit`` and wait for QEMU to exit; returns its exit status."""
        with contextlib.suppress(QmpError, OSError):
            self.qmp.execute("quit")
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"QEMU did not quit within {timeout}s\n{self.describe()}"
            ) from None
        self.qmp.close()
        return rc

    def wait_exit(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"QEMU still running after {timeout}s\n{self.describe()}"
            ) from None

    def kill(self) -> None:
        """End the process whatever state it is in (teardown)."""
        if self._qmp is not None:
            self._qmp.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def qemu_argv(
    run_dir: Path,
    ctrl_path: Path | str | None,
    *,
    device: str = "tpm-tis",
    incoming: str | None = None,
) -> list[str]:
    """QEMU paused (``-S``) with QMP, debug console and the TPM on ``ctrl_path``."""
    argv = [
        QEMU,
        *_BASE_ARGS,
        "-S",
        "-qmp",
        f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
        "-chardev",
        f"file,id=dbg,path={run_dir / 'firmware.log'}",
        "-device",
        "isa-debugcon,iobase=0x402,chardev=dbg",
    ]
    if ctrl_path is not None:
        argv += [
            "-chardev",
            f"socket,id=chrtpm,path={ctrl_path}",
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            f"{device},tpmdev=tpm0",
        ]
    if incoming is not None:
        argv += ["-incoming", incoming]
    return argv


def launch_qemu(
    run_dir: Path,
    ctrl_path: Path | str | None,
    *,
    device: str = "tpm-tis",
    incoming: str | None = None,
    connect: bool = True,
    timeout: float = 15.0,
) -> QemuVm:
    """Start QEMU paused; with ``connect``, return once QMP is ready.

    Files go to ``run_dir`` (keep it short: the QMP socket path must fit in 108 bytes).
    If QEMU exits before QMP is up, the returned VM has no QMP and ``running`` is False.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = qemu_argv(run_dir, ctrl_path, device=device, incoming=incoming)
    stderr_path = run_dir / "qemu.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    vm = QemuVm(proc, run_dir, argv, run_dir / "qmp.sock", stderr_path, run_dir / "firmware.log")
    if not connect:
        return vm
    deadline = time.monotonic() + timeout
    try:
        while vm._qmp is None:
            if proc.poll() is not None:
                return vm
            if vm.qmp_path.exists():
                with contextlib.suppress(OSError, QmpError):
                    vm._qmp = Qmp(vm.qmp_path)
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"QMP did not come up in {timeout}s\n{vm.describe()}")
            time.sleep(0.02)
    except BaseException:
        vm.kill()
        raise
    return vm


_PCR_LINE = re.compile(rb"^\s*(\d+)\s*:\s*0x([0-9A-Fa-f]+)\s*$", re.M)


def parse_pcrread(output: bytes) -> dict[int, bytes]:
    """``tpm2_pcrread`` text output (one bank) -> {index: digest}."""
    return {int(m.group(1)): bytes.fromhex(m.group(2).decode()) for m in _PCR_LINE.finditer(output)}
