"""Fixtures shared by the interoperability tests.

``vtpm_server`` starts our server (a factory; every server it started is stopped at the end
of the test), ``swtpm_server`` does the same for a real ``swtpm socket`` through
``swtpm_peer.swtpm_socket``. Both factories take the same arguments and return objects with
the same helpers (``ioctl_target``, ``ioctl()``, ``tpm2()``, ``tcti``, ``shutdown()``, ``ctrl``,
``data``), so a test can run one scenario against either.

``s3`` is one real S3-compatible server (SeaweedFS, ``s3_server.S3Server``)
started once per session, on first use, and stopped at the end; ``s3_bucket``
is a fresh empty bucket on it for each test.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from s3_server import S3Server
from s3_server import s3_server as _s3_server
from swtpm_peer import (
    LOCALHOST,
    SWTPM_IOCTL,
    Endpoint,
    SwtpmPeer,
    Transport,
    free_tcp_port_pair,
    probe_ctrl,
    swtpm_socket,
)

# How our server is launched. VTPMCTL_SERVE overrides it (a command line, e.g.
# "python -m vtpmctl _daemon", which takes the same options).
SERVE_COMMAND = shlex.split(os.environ.get("VTPMCTL_SERVE", "")) or [
    str(Path(sys.executable).with_name("vtpmctl")),
    "serve",
]


class ServerStartError(RuntimeError):
    """Our server did not come up; carries its exit status and output."""


def endpoint_spec(ep: Endpoint) -> str:
    """Our server's ``--ctrl``/``--data`` spelling of an endpoint."""
    if ep.kind == "unix":
        return f"unix:{ep.path}"
    return f"tcp:{LOCALHOST}:{ep.port}"


@dataclass
class VtpmServer:
    """One of our servers: process, state dir, endpoints and the same helpers as SwtpmPeer."""

    state_dir: Path
    run_dir: Path
    tpm2_mode: bool
    ctrl_kind: Transport
    data_kind: Transport | None
    options: list[str]  # --flags, --key-file, ... as given
    pass_fds: tuple[int, ...] = ()  # descriptors the server inherits (--key fd=N)
    ctrl: Endpoint = field(init=False)
    data: Endpoint | None = field(init=False)
    proc: subprocess.Popen[bytes] = field(init=False)
    argv: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.run_dir / "server.log"
        self.pid_file = self.run_dir / "server.pid"
        self.spawn()

    def spawn(self) -> None:
        """Start the process (again: with new TCP ports after a port clash)."""
        self.ctrl, self.data = _endpoints(self.run_dir, self.ctrl_kind, self.data_kind)
        self.argv = [
            *SERVE_COMMAND,
            "--state",
            str(self.state_dir),
            "--ctrl",
            endpoint_spec(self.ctrl),
            "--tpm",
            "2" if self.tpm2_mode else "1.2",
            "--pid-file",
            str(self.pid_file),
        ]
        if self.data is not None:
            self.argv += ["--data", endpoint_spec(self.data)]
        self.argv += self.options
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2],
                pass_fds=self.pass_fds,
            )

    @property
    def ioctl_target(self) -> list[str]:
        if self.ctrl.kind == "unix":
            return ["--unix", str(self.ctrl.path)]
        return ["--tcp", f"{LOCALHOST}:{self.ctrl.port}"]

    @property
    def tcti(self) -> str:
        assert self.data is not None, "started without a data channel"
        if self.data.kind == "unix":
            assert self.ctrl.path == Path(f"{self.data.path}.ctrl")
            return f"swtpm:path={self.data.path}"
        assert self.ctrl.port == int(self.data.port or 0) + 1
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
        raise AssertionError(
            f"{what} failed{detail}\n--- server log ---\n{self.log_text()[-3000:]}"
        )

    def ioctl(
        self, *args: str, check: bool = True, timeout: float = 10.0
    ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            [SWTPM_IOCTL, *self.ioctl_target, *args], capture_output=True, timeout=timeout
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
        env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti)
        result = subprocess.run(
            [f"tpm2_{tool}", *args], capture_output=True, env=env, input=input, timeout=timeout
        )
        if check and result.returncode != 0:
            self._fail(f"tpm2_{tool} {' '.join(args)}", result)
        return result

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._fail(f"waiting {timeout}s for the server to exit")
            raise

    def shutdown(self, timeout: float = 10.0) -> int:
        self.ioctl("-s")
        return self.wait_exit(timeout)

    def terminate(self, timeout: float = 10.0) -> int:
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def reinit(self) -> None:
        self.ioctl("-i")

    def wait_ready(self, timeout: float = 10.0) -> VtpmServer:
        """Until the control channel answers; ServerStartError if the process ends first."""
        deadline = time.monotonic() + timeout
        clashes = 0
        while not probe_ctrl(self.ctrl):
            if (
                self.proc.poll() is not None
                and "Address already in use" in self.log_text()
                and clashes < 3
            ):
                clashes += 1  # another test took the "free" port before we bound it
                self.spawn()
                continue
            if self.proc.poll() is not None or time.monotonic() > deadline:
                status, log = self.proc.poll(), self.log_text()
                stop_vtpm(self)  # removes the run dir
                raise ServerStartError(
                    f"server did not come up (exit {status}): {' '.join(self.argv)}\n{log[-3000:]}"
                )
            time.sleep(0.01)
        return self


class ServerFactory(Protocol):
    def __call__(
        self,
        state_dir: Path | None = None,
        *,
        tpm2: bool = True,
        ctrl: Transport = "unix",
        data: Transport | None = "unix",
        flags: str | None = None,
        key_file: Path | None = None,
        migration_key_file: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> Any: ...


def _endpoints(
    run_dir: Path, ctrl: Transport, data: Transport | None
) -> tuple[Endpoint, Endpoint | None]:
    """Sockets as the tss2 swtpm TCTI expects them: DATA and DATA.ctrl, or P and P+1."""
    if data is None:
        if ctrl == "unix":
            return Endpoint("unix", path=run_dir / "tpm.ctrl"), None
        return Endpoint("tcp", port=free_tcp_port_pair() + 1), None
    if data == "unix":
        data_ep = Endpoint("unix", path=run_dir / "tpm")
        ctrl_ep = (
            Endpoint("unix", path=run_dir / "tpm.ctrl")
            if ctrl == "unix"
            else Endpoint("tcp", port=free_tcp_port_pair() + 1)
        )
        return ctrl_ep, data_ep
    port = free_tcp_port_pair()
    ctrl_ep = (
        Endpoint("tcp", port=port + 1)
        if ctrl == "tcp"
        else Endpoint("unix", path=run_dir / "tpm.ctrl")
    )
    return ctrl_ep, Endpoint("tcp", port=port)


def launch_vtpm(
    state_dir: Path | None = None,
    *,
    tpm2: bool = True,
    ctrl: Transport = "unix",
    data: Transport | None = "unix",
    flags: str | None = None,
    key_file: Path | None = None,
    migration_key_file: Path | None = None,
    extra_args: Sequence[str] = (),
    wait: bool = True,
    startup_timeout: float = 10.0,
    pass_fds: Sequence[int] = (),
) -> VtpmServer:
    """Start our server; with ``wait``, return once the control channel answers
    (without, call ``wait_ready()`` before using it: lets a test start ours while it
    drives swtpm). The caller must stop it (the fixture does). If it exits before it
    answers, ServerStartError carries its output.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="vtpm-", dir="/tmp"))
    options: list[str] = []
    if flags:
        options += ["--flags", flags]
    if key_file is not None:
        options += ["--key-file", str(key_file)]
    if migration_key_file is not None:
        options += ["--migration-key-file", str(migration_key_file)]
    options += list(extra_args)
    server = VtpmServer(
        state_dir or run_dir / "state", run_dir, tpm2, ctrl, data, options, tuple(pass_fds)
    )
    if wait:
        server.wait_ready(startup_timeout)
    return server


def stop_vtpm(server: VtpmServer) -> None:
    """SIGTERM, then SIGKILL; removes the server's private socket dir."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(5)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)
    shutil.rmtree(server.run_dir, ignore_errors=True)


@pytest.fixture
def vtpm_server() -> Iterator[Callable[..., VtpmServer]]:
    """Factory: ``vtpm_server(state_dir=None, tpm2=True, ctrl="unix", data="unix", flags=None,
    key_file=None, migration_key_file=None, extra_args=(), wait=True)`` -> a VtpmServer."""
    started: list[VtpmServer] = []

    def start(*args: Any, **kwargs: Any) -> VtpmServer:
        server = launch_vtpm(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:  # signal all first: they wind down in parallel
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
    for server in started:
        stop_vtpm(server)


@pytest.fixture
def swtpm_server() -> Iterator[Callable[..., SwtpmPeer]]:
    """Factory with vtpm_server's signature for a real ``swtpm socket``.

    Key files are handed over as ``file=K,format=hex,mode=aes-256-cbc`` (hex, 256 bit).
    """
    with contextlib.ExitStack() as stack:

        def start(
            state_dir: Path | None = None,
            *,
            tpm2: bool = True,
            ctrl: Transport = "unix",
            data: Transport | None = "unix",
            flags: str | None = None,
            key_file: Path | None = None,
            migration_key_file: Path | None = None,
            extra_args: Sequence[str] = (),
        ) -> SwtpmPeer:
            extra = list(extra_args)
            if key_file is not None:
                extra += ["--key", f"file={key_file},format=hex,mode=aes-256-cbc"]
            if migration_key_file is not None:
                extra += [
                    "--migration-key",
                    f"file={migration_key_file},format=hex,mode=aes-256-cbc",
                ]
            return stack.enter_context(
                swtpm_socket(
                    state_dir,
                    tpm2=tpm2,
                    ctrl=ctrl,
                    data=data or "unix",
                    flags=flags,
                    extra_args=extra,
                )
            )

        yield start


@pytest.fixture(scope="session")
def manufactured(tmp_path_factory: pytest.TempPathFactory) -> Callable[[bool, Path], Path]:
    """``manufactured(tpm2, dir)``: ``dir`` becomes a state dir holding a permall that a real
    swtpm manufactured once per session; returns ``dir``.

    A fresh TPM 1.2 generates its EK at the first INIT (an RSA-2048 key generation, up to
    seconds); starting both servers of a comparison from the same permall avoids that cost
    and makes them byte-comparable.
    """
    made: dict[bool, bytes] = {}

    def make(tpm2: bool, state_dir: Path) -> Path:
        if tpm2 not in made:
            src = tmp_path_factory.mktemp("manufactured")
            with swtpm_socket(src, tpm2=tpm2, flags=None) as peer:
                peer.ioctl("-i")
                peer.shutdown()
            made[tpm2] = (src / ("tpm2-00.permall" if tpm2 else "tpm-00.permall")).read_bytes()
        state_dir.mkdir(parents=True, exist_ok=True)
        name = "tpm2-00.permall" if tpm2 else "tpm-00.permall"
        (state_dir / name).write_bytes(made[tpm2])
        return state_dir

    return make


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the session (do not kill it: start your own for that)."""
    with _s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3: S3Server) -> str:
    """A fresh empty bucket on the session's server."""
    return s3.make_bucket()


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A 1 MiB loop block device (root and losetup, else the test is skipped)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    backing = tmp_path / "volume.img"
    with open(backing, "wb") as f:
        f.truncate(1 << 20)
    res = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, timeout=30
    )
    if res.returncode != 0:
        pytest.skip(f"losetup failed: {res.stderr.strip()}")
    device = res.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], timeout=30, check=False)


@pytest.fixture(scope="module")
def launchers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``vtpmctl swtpm-compat install``'s swtpm, swtpm_setup and swtpm_ioctl, on this tree."""
    from vtpmctl.usecases import swtpm_compat

    directory = tmp_path_factory.mktemp("bin")
    swtpm_compat.install(directory, python=sys.executable)
    return directory


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """Short paths: sockets must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="vtpm-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
