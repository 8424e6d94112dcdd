"""Shared pieces of the benchmarks: start swtpm and vtpmctl servers side by
side, build the C round-trip client, read a process's RSS.

Every wait here is bounded in time, every loop in count.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent
GETRANDOM16 = bytes.fromhex("80010000000c0000017b0010")
GET_CAPABILITY = b"\0\0\0\1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


class BenchError(Exception):
    """The benchmark cannot run; the message says why."""


def vtpmctl_server_argv(kind: str) -> list[str]:
    """How to start vtpmctl's server: ``serve`` (the CLI) or ``daemon`` (its entry point)."""
    if kind == "daemon":
        return [sys.executable, "-m", "vtpmctl", "_daemon"]
    exe = Path(sys.executable).parent / "vtpmctl"
    if not exe.exists():
        found = shutil.which("vtpmctl")
        if found is None:
            raise BenchError("no vtpmctl executable; run scripts/setup")
        exe = Path(found)
    return [str(exe), "serve"]


def server_kind_default() -> str:
    """``serve`` when this checkout's CLI has it, else the daemon module."""
    try:
        argv = vtpmctl_server_argv("serve")
        done = subprocess.run([*argv, "--help"], capture_output=True, timeout=30, check=False)
    except (BenchError, subprocess.TimeoutExpired, OSError):
        return "daemon"
    return "serve" if done.returncode == 0 else "daemon"


@dataclass
class Server:
    """One running TPM server with a control and a data unix socket."""

    name: str
    argv: list[str]
    workdir: Path
    ctrl: str = ""
    data: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.log = self.workdir / f"{self.name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode}: "
                    f"{self.log.read_text(errors='replace')[-2000:]}"
                )
            if os.path.exists(self.data) and _caps_ok(self.ctrl):
                return
            time.sleep(0.02)
        self.stop()
        raise BenchError(f"{self.name} did not answer within {START_TIMEOUT} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)


def _caps_ok(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(path)
            sock.sendall(GET_CAPABILITY)
            reply = _recv_exact(sock, 8)
    except OSError:
        return False
    return reply[:4] == b"\0\0\0\0"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    for _ in range(n):  # at most one byte per recv
        if len(out) >= n:
            break
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise OSError("peer closed")
        out += chunk
    if len(out) < n:
        raise OSError("short reply")
    return bytes(out)


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def make_servers(
    workdir: Path, cpu: int | None, vtpmctl_kind: str, flags: str = "not-need-init,startup-clear"
) -> dict[str, Server]:
    """swtpm and vtpmctl, each with a fresh state dir, not yet started."""
    if shutil.which("swtpm") is None:
        raise BenchError("swtpm is not installed (apt-get install swtpm)")
    out: dict[str, Server] = {}
    for name in ("swtpm", "vtpmctl"):
        state = workdir / f"{name}-state"
        state.mkdir()
        ctrl, data = str(workdir / f"{name}.ctrl"), str(workdir / f"{name}.data")
        if name == "swtpm":
            argv = [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={state}",
                "--ctrl",
                f"type=unixio,path={ctrl}",
                "--server",
                f"type=unixio,path={data}",
                "--flags",
                flags,
            ]
        else:
            argv = [
                *vtpmctl_server_argv(vtpmctl_kind),
                "--state",
                str(state),
                "--ctrl",
                f"unix:{ctrl}",
                "--data",
                f"unix:{data}",
                "--flags",
                flags,
            ]
        out[name] = Server(name, pinned(argv, cpu), workdir, ctrl, data)
    return out


@contextlib.contextmanager
def running(servers: dict[str, Server]) -> Iterator[dict[str, Server]]:
    try:
        for srv in servers.values():
            srv.start()
        yield servers
    finally:
        for srv in servers.values():
            srv.stop()


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    # Short paths: unix socket paths must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def timed_run(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds from start to exit; raises when the command fails."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {done.stderr.decode(errors='replace')}")
    return took


def command_server_ready(vtpmctl: str, env: dict[str, str], timeout: float = 20.0) -> bool:
    """Have the console script start its command server and wait until it listens.

    False when it is turned off (VTPMCTL_COMMAND_SERVER=0), when the tree has
    none, or when it did not come up: the commands then run in their own process.
    """
    if env.get("VTPMCTL_COMMAND_SERVER") == "0":
        return False
    code = "from vtpmctl import cmdclient; print(cmdclient.address(cmdclient.identity()).hex())"
    python = str(Path(vtpmctl).with_name("python"))
    found = subprocess.run(
        [python, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    if found.returncode != 0:
        return False
    address = bytes.fromhex(found.stdout.strip())
    subprocess.run([vtpmctl, "list"], env=env, capture_output=True, timeout=120, check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            try:
                probe.connect(address)
                return True
            except OSError:
                time.sleep(0.05)
    return False


def exit_main(main: Callable[[], int], name: str) -> NoReturn:
    """Run a benchmark's main; one line on stderr and status 1 when it cannot run."""
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(1)


# ---------------------------------------------------------------- clients


class TpmData:
    """Raw TPM commands on a vTPM's data socket."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))

    def transact(self, cmd: bytes) -> bytes:
        self.sock.sendall(cmd)
        head = b""
        while len(head) < 10:
            chunk = self.sock.recv(10 - len(head))
            if not chunk:
                raise BenchError("the TPM closed the data connection")
            head += chunk
        body = b""
        size = int.from_bytes(head[2:6], "big")
        while len(body) < size - 10:
            chunk = self.sock.recv(size - 10 - len(body))
            if not chunk:
                raise BenchError("the TPM closed the data connection")
            body += chunk
        return head + body

    def close(self) -> None:
        self.sock.close()


def _random_2k(_n: int) -> bytes:
    return os.urandom(2048)


def fill_nv(
    data_socket: Path, limit: int | None, content: Callable[[int], bytes] = _random_2k
) -> int:
    """Define and write 2 KiB indexes until the TPM has no NV space left.

    ``content(n)`` is index n's data: random by default, so nothing compresses.
    """
    from vtpmctl.engine import tpm2 as t

    nv_attrs = t.NvAttr.OWNERWRITE | t.NvAttr.OWNERREAD | t.NvAttr.NO_DA
    tpm = TpmData(data_socket)
    try:
        t.startup(tpm.transact)
        n = 0
        while limit is None or n < limit:
            index = 0x01600000 + n
            try:
                t.nv_define_space(
                    tpm.transact, t.NvPublic(index, t.Alg.SHA256, nv_attrs, b"", 2048)
                )
            except t.TpmError as exc:
                if exc.base == t.RC.NV_SPACE:
                    break
                raise
            t.nv_write(tpm.transact, index, content(n), auth_handle=t.RH_OWNER)
            n += 1
        return n
    finally:
        tpm.close()


def build_c_client(outdir: Path) -> Path | None:
    """Compile rtclient.c with the system cc; None when there is no compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    exe = outdir / "rtclient"
    done = subprocess.run(
        [cc, "-O2", "-o", str(exe), str(HERE / "rtclient.c")],
        capture_output=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        print(f"cc failed, using the Python client: {done.stderr.decode()[-500:]}", file=sys.stderr)
        return None
    return exe


@dataclass
class RoundTrips:
    count: int
    seconds: float
    p50_ns: int
    p99_ns: int
    server_cpu_ns: float = 0.0  # filled in by the caller when it watches the server

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def run_client(
    client: Path | None,
    mode: str,
    path: str,
    count: int,
    warmup: int,
    cpu: int | None,
    timeout: float = 300.0,
) -> RoundTrips:
    """``count`` round trips of ``mode`` (data: GetRandom(16), ctrl: GET_CAPABILITY)."""
    if client is None:
        argv = [sys.executable, str(HERE / "benchlib.py"), mode, path, str(count), str(warmup)]
    else:
        argv = [str(client), mode, path, str(count), str(warmup)]
    done = subprocess.run(pinned(argv, cpu), capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise BenchError(
            f"client {mode} on {path} failed ({done.returncode}): "
            f"{done.stderr.decode(errors='replace')[-1000:]}"
        )
    n, secs, p50, p99 = done.stdout.split()
    return RoundTrips(int(n), float(secs), int(p50), int(p99))


def python_round_trips(mode: str, path: str, count: int, warmup: int) -> RoundTrips:
    """The same loop as rtclient.c in Python (preallocated request, recv_into)."""
    req = GETRANDOM16 if mode == "data" else GET_CAPABILITY
    want = 28 if mode == "data" else 8
    rc_at = 6 if mode == "data" else 0  # where the 4-byte result code sits
    buf = bytearray(4096)
    view = memoryview(buf)
    lat: list[int] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        send, recv_into = sock.sendall, sock.recv_into
        now = time.perf_counter_ns
        start = prev = now()
        for i in range(warmup + count):
            if i == warmup:
                start = prev = now()
            send(req)
            got = recv_into(view)
            while got < want:
                more = recv_into(view[got:])
                if not more:
                    raise BenchError("server closed the connection")
                got += more
            if buf[rc_at : rc_at + 4] != b"\0\0\0\0":
                raise BenchError(f"bad reply {bytes(buf[:got]).hex()}")
            if i >= warmup:
                t = now()
                lat.append(t - prev)
                prev = t
    lat.sort()
    return RoundTrips(count, (prev - start) / 1e9, lat[count // 2], lat[count * 99 // 100])


def vm_rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_ns(pid: int) -> int:
    """CPU time of all threads of a process so far, in ns (/proc/PID/task/*/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread may end meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs, {model}, Python {sys.version.split()[0]}"


def _main(argv: list[str]) -> int:
    """Python fallback client, same arguments and output as rtclient.c."""
    if len(argv) != 4 or argv[0] not in ("data", "ctrl"):
        print("usage: benchlib.py data|ctrl PATH COUNT WARMUP", file=sys.stderr)
        return 2
    try:
        res = python_round_trips(argv[0], argv[1], int(argv[2]), int(argv[3]))
    except (OSError, BenchError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(res.count, f"{res.seconds:.9f}", res.p50_ns, res.p99_ns)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
