"""The command server runs console-script commands as the process itself would have.

Each test runs the real console script against a real command server (started by
the first call, as on any host) and compares with the same command run by the
console script itself (``VTPMCTL_COMMAND_SERVER=0``): output, exit code, files,
descriptors, signals. A fake is used only for what a real peer cannot do: a
control socket that records who connected, or never answers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.interop.instance_helpers import VTPMCTL, Home, home_at
from tests.interop.swtpm_peer import SwtpmPeer
from vtpmctl import cmdclient

SERVER_OFF = {cmdclient.ENV: "0"}


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    with home_at(tmp_path / "home") as h:
        yield h


def _address(env: dict[str, str]) -> bytes:
    """The server's address for a console script run with ``env``."""
    code = "from vtpmctl import cmdclient; print(cmdclient.address(cmdclient.identity()).hex())"
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return bytes.fromhex(out.stdout.strip())


def _server_pid(env: dict[str, str], timeout: float = 20.0) -> int:
    """Start the server as a first command does and wait until it listens; its pid."""
    address = _address(env)
    subprocess.run([*VTPMCTL, "list"], env=env, capture_output=True, check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            try:
                s.connect(address)
            except OSError:
                time.sleep(0.05)
                continue
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            return int.from_bytes(creds[:4], "little")
    raise AssertionError("no command server came up")


class Recorder:
    """A control socket that records each client's pid, then hangs up or never answers."""

    def __init__(self, path: Path, answer: bool) -> None:
        self.pids: list[int] = []
        self.status: list[str] = []  # each client's /proc/PID/status while it is connected
        self.nice: list[int] = []
        self.closed = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            self.pids.append(int.from_bytes(creds[:4], "little"))
            try:
                self.status.append(Path(f"/proc/{self.pids[-1]}/status").read_text())
                stat = Path(f"/proc/{self.pids[-1]}/stat").read_text()
                self.nice.append(int(stat.rsplit(")", 1)[1].split()[16]))
            except OSError:
                self.status.append("")
                self.nice.append(0)
            if self.answer:
                conn.close()
                continue
            conn.settimeout(60)
            try:
                while conn.recv(4096):  # until the client is gone
                    pass
            except OSError:
                pass
            conn.close()
            self.closed.set()


def test_a_command_runs_in_a_child_of_the_server(home: Home, tmp_path: Path) -> None:
    server = _server_pid(home.env)
    rec = Recorder(tmp_path / "ctrl", answer=True)
    started = []
    for extra in ({}, SERVER_OFF):
        proc = subprocess.Popen(
            [*VTPMCTL, "caps", f"unix:{tmp_path / 'ctrl'}"],
            env={**home.env, **extra},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert proc.wait(30) != 0  # the socket hangs up without an answer
        started.append(proc.pid)
    # Served, whoever connected is not the process we started; unserved, it is.
    assert rec.pids[0] != started[0]
    assert rec.pids[1] == started[1]
    assert Path(f"/proc/{server}").exists()


@pytest.mark.parametrize(
    "extra",
    [SERVER_OFF, {"INVOCATION_ID": "0123"}, {"NOTIFY_SOCKET": "/nonexistent"}],
    ids=["turned off", "in a systemd unit", "with a notify socket"],
)
def test_some_commands_stay_in_their_own_process(
    extra: dict[str, str], home: Home, tmp_path: Path
) -> None:
    _server_pid(home.env)
    rec = Recorder(tmp_path / "ctrl", answer=True)
    proc = subprocess.Popen(
        [*VTPMCTL, "caps", f"unix:{tmp_path / 'ctrl'}"],
        env={**home.env, **extra},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proc.wait(30)
    assert rec.pids == [proc.pid]


def test_nice_and_taskset_hold_for_a_served_command(home: Home, tmp_path: Path) -> None:
    """A caller's niceness and CPU affinity pick (and start) a server that has them."""
    _server_pid(home.env)  # one without them is there
    rec = Recorder(tmp_path / "ctrl", answer=True)
    cpu = min(os.sched_getaffinity(0))
    wrap = ["nice", "-n", "7", "taskset", "-c", str(cpu)]
    for _ in range(100):  # the first call starts that server and runs the command itself
        proc = subprocess.Popen(
            [*wrap, *VTPMCTL, "caps", f"unix:{tmp_path / 'ctrl'}"],
            env=home.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proc.wait(60)
        if rec.pids[-1] != proc.pid:
            break
        time.sleep(0.1)
    assert rec.pids[-1] != proc.pid, "never served"
    status = rec.status[-1]
    assert f"Cpus_allowed_list:\t{cpu}\n" in status
    assert rec.nice[-1] == 7


def test_start_foreground_becomes_the_daemon_itself(home: Home) -> None:
    home.run("create", "fg", "--no-ek")
    _server_pid(home.env)
    proc = subprocess.Popen(
        [*VTPMCTL, "start", "--foreground", "fg"],
        env=home.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            code, st = home.status("fg")
            if code == 0:
                break
            time.sleep(0.05)
        assert st["pid"] == proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def _children_of(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry))
    return out


def test_a_spare_forked_ahead_runs_the_next_command(home: Home, tmp_path: Path) -> None:
    server = _server_pid(home.env)
    rec = Recorder(tmp_path / "ctrl", answer=True)
    for _ in range(3):
        deadline = time.monotonic() + 10
        while not (spares := _children_of(server)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert spares  # the spare (and any command of an earlier test still ending)
        subprocess.run(
            [*VTPMCTL, "caps", f"unix:{tmp_path / 'ctrl'}"], env=home.env, capture_output=True
        )
        assert rec.pids[-1] in spares


def test_the_server_is_a_child_of_nothing_we_started(home: Home) -> None:
    server = _server_pid(home.env)
    cmdline = Path(f"/proc/{server}/cmdline").read_bytes().split(b"\0")
    assert b"_cmdserver" in cmdline
    status = Path(f"/proc/{server}/status").read_text()
    assert "\nUid:\t0\t" in status or f"\nUid:\t{os.getuid()}\t" in status
    # It holds nothing of the command that started it: only its own listener.
    fds = set()
    for fd in os.listdir(f"/proc/{server}/fd"):
        with contextlib.suppress(OSError):  # one closed while we look
            fds.add(os.readlink(f"/proc/{server}/fd/{fd}"))
    held = [f for f in fds if f.startswith("pipe:") or (f.startswith("/") and f != "/dev/null")]
    assert not held, fds


def _both(
    args: list[str], env: dict[str, str], cwd: Path, stdin: bytes = b""
) -> list[tuple[int, str, str]]:
    out = []
    for extra in ({}, SERVER_OFF):
        proc = subprocess.run(
            [*VTPMCTL, *args],
            env={**env, **extra},
            cwd=cwd,
            input=stdin,
            capture_output=True,
            timeout=60,
        )
        out.append((proc.returncode, proc.stdout.decode(), proc.stderr.decode()))
    return out


PARITY: list[tuple[str, Callable[[Path, SwtpmPeer], list[str]]]] = [
    ("caps of a swtpm", lambda tmp, peer: ["caps", f"unix:{peer.ctrl.path}"]),
    ("info of a swtpm", lambda tmp, peer: ["info", f"unix:{peer.ctrl.path}"]),
    ("ctl of a swtpm", lambda tmp, peer: ["ctl", f"unix:{peer.ctrl.path}", "established"]),
    ("caps of nothing", lambda tmp, peer: ["caps", f"unix:{tmp / 'none'}"]),
    ("an unknown instance", lambda tmp, peer: ["status", "nosuch"]),
    ("a bad option (typer's usage error)", lambda tmp, peer: ["status", "--bogus"]),
    ("a bad ctl action", lambda tmp, peer: ["ctl", f"unix:{peer.ctrl.path}", "bogus"]),
    ("list --json of an empty store", lambda tmp, peer: ["list", "--json"]),
    ("help of a command", lambda tmp, peer: ["caps", "--help"]),
    ("--debug and --timeout first", lambda tmp, peer: ["--debug", "--timeout", "5", "status", "x"]),
]


@pytest.mark.parametrize("case", PARITY, ids=[c[0] for c in PARITY])
def test_served_and_unserved_commands_say_the_same(
    case: tuple[str, Callable[[Path, SwtpmPeer], list[str]]],
    home: Home,
    tmp_path: Path,
    swtpm_server: Callable[..., SwtpmPeer],
) -> None:
    peer = swtpm_server(flags="not-need-init,startup-clear")
    _server_pid(home.env)
    served, unserved = _both(case[1](tmp_path, peer), home.env, tmp_path)
    assert served == unserved


def test_cwd_stdin_and_inherited_descriptors_are_the_callers(home: Home, tmp_path: Path) -> None:
    home.run("create", "p1", "--no-ek")
    _server_pid(home.env)
    work = tmp_path / "work"
    work.mkdir()
    # A relative output path lands in the caller's directory.
    subprocess.run(
        [*VTPMCTL, "migrate", "export", "p1", "-o", "p1.bundle"], env=home.env, cwd=work, check=True
    )
    assert (work / "p1.bundle").stat().st_size > 0
    # A descriptor the caller passes is there under its number.
    with open(work / "p1.bundle", "rb") as bundle:
        fd = bundle.fileno()
        subprocess.run(
            [*VTPMCTL, "migrate", "import", f"/dev/fd/{fd}", "--name", "p2"],
            env=home.env,
            pass_fds=(fd,),
            check=True,
            capture_output=True,
        )
    assert "p2" in home.run("list").stdout
    # stdin is the caller's: `rm` without --yes refuses on a pipe, as without the server.
    served, unserved = _both(["rm", "p2"], home.env, work, stdin=b"y\n")
    assert served == unserved
    assert served[0] != 0 and "--yes" in served[2]


def test_closed_stdout_is_closed_for_the_command(home: Home, tmp_path: Path) -> None:
    _server_pid(home.env)
    results = []
    for extra in ({}, SERVER_OFF):
        proc = subprocess.run(
            ["sh", "-c", 'exec "$0" list >&-', *VTPMCTL],
            env={**home.env, **extra},
            capture_output=True,
            text=True,
        )
        results.append((proc.returncode, proc.stderr))
    assert results[0] == results[1]
    assert results[0][0] != 0 and "stdout is closed" in results[0][1]


@pytest.mark.parametrize(
    ("sig", "expect"),
    [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130), (signal.SIGKILL, -signal.SIGKILL)],
    ids=["SIGTERM", "SIGINT", "SIGKILL"],
)
def test_a_signal_to_the_command_reaches_what_runs_it(
    sig: signal.Signals, expect: int, home: Home, tmp_path: Path
) -> None:
    _server_pid(home.env)
    rec = Recorder(tmp_path / "hang", answer=False)
    proc = subprocess.Popen(
        [*VTPMCTL, "--timeout", "60", "caps", f"unix:{tmp_path / 'hang'}"],
        env=home.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not rec.pids and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rec.pids and rec.pids[0] != proc.pid  # the server's child is the one waiting
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    if sig == signal.SIGINT:
        from vtpmctl.errors import EXIT_INTERRUPTED

        expect = EXIT_INTERRUPTED
        assert b"interrupted" in err
    assert proc.returncode == expect
    # The command's own process is gone too: its connection closed.
    assert rec.closed.wait(10)


def test_other_users_and_bad_requests_get_nothing(home: Home) -> None:
    server = _server_pid(home.env)
    address = _address(home.env)
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX,socket.SOCK_SEQPACKET)\n"
        f"s.connect({address!r})\n"
        "try:\n"
        "    s.send(b'vtpmctl-command/1\\0x'); s.settimeout(10); print(repr(s.recv(64)))\n"
        "except OSError:\n"
        "    print(repr(b''))\n"
    )
    other = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        + [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert other.stdout.strip() == "b''", other.stderr  # hung up on, without a word
    ours = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert ours.stdout.strip() == repr(cmdclient.REFUSED), ours.stderr
    # Still serving.
    assert _server_pid(home.env) == server


def test_changed_code_is_never_run_by_an_old_server(tmp_path: Path) -> None:
    """A server whose source files changed on disk refuses, exits, and the command runs."""
    tree = tmp_path / "tree"
    shutil.copytree(
        Path(cmdclient.__file__).parent,
        tree / "vtpmctl",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "VTPMCTL_HOME": str(tmp_path / "home"),
    }
    server = _server_pid(env)
    source = tree / "vtpmctl" / "commands" / "query.py"
    source.write_text(source.read_text() + "\n# changed\n")
    proc = subprocess.run([*VTPMCTL, "list"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 10
    while Path(f"/proc/{server}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    status = Path(f"/proc/{server}/stat")
    assert not status.exists() or status.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    # The refused command started a server of the new code for the next one.
    assert _server_pid(env) != server


def test_a_server_gone_before_a_child_took_the_command_runs_it_here(home: Home) -> None:
    """Nothing ran (no child said it took the command): the console script runs it."""
    env = {**home.env, "PYTHONVTPMCTLTEST": "a server that hangs up"}  # its own identity
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as fake:
        fake.bind(_address(env))
        fake.listen(4)

        def hang_up() -> None:
            conn, _ = fake.accept()
            _, fds, _, _ = socket.recv_fds(conn, 1 << 18, 253)
            for fd in fds:  # the caller's stdio among them: keep none open
                os.close(fd)
            conn.close()

        threading.Thread(target=hang_up, daemon=True).start()
        proc = subprocess.run(
            [*VTPMCTL, "list", "--json"], env=env, capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 0, proc.stderr
    assert '"instances"' in proc.stdout


def test_the_served_side_imports_next_to_nothing(home: Home) -> None:
    """What the console script imports when the server runs its command: the client
    module and C modules, none of the code the command itself needs."""
    _server_pid(home.env)
    main = "import sys; from vtpmctl.cli import main; sys.exit(main())"
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", main, "status", "nosuch"],
            env=home.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    ours = {n for n in names if n.startswith("vtpmctl")}
    assert ours == {"vtpmctl", "vtpmctl.cli", "vtpmctl.cmdclient"}, ours
    heavy = {"enum", "typing", "json", "signal", "pathlib", "dataclasses", "zlib", "struct"}
    assert not names & heavy, names
    assert "no instance named nosuch" in done.stderr
