"""The processes vtpmctl starts: their stable command lines, environment, and one runner.

Every child runs as ``python -m vtpmctl NAME`` (``vtpmctl/__main__.py``
maps NAME to its module), never under a module path, so that moving a module
never changes a process's command line.

The short-lived children (``_manufacture``, ``_inspect``) load libtpms so
that the CLI never does. They speak one protocol: ``run_child`` writes one
JSON request to the child's stdin; ``serve_child`` (in the child) answers
with one JSON object on stdout, ``{"answer": {...}}`` or ``{"error":
{"class", "branch", "message"}}``, and the parent raises ``ChildError`` with
the child's error class, the exit code of its branch of the error tree and
its one-line message. stderr is the child's log (libtpms' messages), never
parsed for errors. The daemon is long-lived and reports differently (see
``vtpmctl.device.server.daemon``).

Imports only ``vtpmctl.errors``: every layer may start a child.
"""

from __future__ import annotations

import contextlib
import os
import sys

from vtpmctl import errors
from vtpmctl.errors import VtpmctlError

# Off `typing` at run time: the zygote, and so every daemon, would carry it
# (0.4 MiB; docs/architecture.md, "The zygote").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

# entry point name -> the module whose ``main(argv)`` runs it
ENTRY_POINTS = {
    "_daemon": "vtpmctl.device.server.daemon",
    "_zygote": "vtpmctl.device.server.zygote",
    "_cmdserver": "vtpmctl.cmdserver",
    "_manufacture": "vtpmctl.engine.manufacture",
    "_inspect": "vtpmctl.engine.inspect",
    "_libtpms_version": "vtpmctl.engine.libtpms",
    "_swtpm_setup": "vtpmctl.engine.setup",
}


def entry_argv(name: str) -> list[str]:
    """The command line that runs entry point ``name`` with this interpreter."""
    if name not in ENTRY_POINTS:
        raise ValueError(f"unknown entry point {name!r}")
    return [sys.executable, "-m", "vtpmctl", name]


def package_root() -> str:
    """The directory this vtpmctl is imported from (what a child must import too)."""
    return os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def child_env() -> dict[str, str]:
    """This environment, minus systemd's notify socket, importing this same vtpmctl.

    ``python -m`` imports from the current directory first: a command run inside
    another checkout (or a directory another user can write) would give its
    children that code. PYTHONSAFEPATH (Python 3.11) keeps them to the code we name.
    """
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)  # a child must not talk to our service manager
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root(), env.get("PYTHONPATH")]))
    env["PYTHONSAFEPATH"] = "1"
    return env


# ---------------------------------------------------------------- the zygote
#
# Daemons are forked by a pre-imported parent, ``python -m vtpmctl _zygote``
# (``vtpmctl.device.server.zygote``), which has imported the daemon's code and
# mapped libtpms but never made a TPM: a fork of it costs about a millisecond
# instead of an interpreter start and the daemon's imports, and its daemons share
# the pages of what it imported. One zygote per user and installation, on an
# abstract unix socket (no file to clean up); each side checks the other's uid.

DAEMON_ENTRY = "_daemon"
ZYGOTE_ENTRY = "_zygote"
ZYGOTE_START_TIMEOUT = 20.0
ZYGOTE_REPLY_TIMEOUT = 10.0
ZYGOTE_MAX_MESSAGE = 1 << 18  # bytes of a request (argv and environment)
# Bytes of command line a forked daemon can show: the zygote is started with this
# much room, which each daemon fills with the command line an exec would have had.
ZYGOTE_TITLE_ROOM = 4096
ZYGOTE_MAX_FDS = 8  # descriptors with a request: stderr, the ready pipe, key pipes
ZYGOTE_PROTOCOL = "vtpmctl-zygote-1"  # a request's first field; a new layout, a new name


class ZygoteRequest:
    """What ``fork_daemon`` asks the zygote for, with its one encoding (both ends).

    Not json: the zygote would carry json, and with it re, into every daemon.
    A request is one datagram of fields, each ending in a NUL (so no field holds
    one): the protocol name, then argv, env, the umask, rlimits, the fd numbers
    and the identity, each list or dict as its length and then its items (a dict
    item is a key and its value, an rlimit its name, soft and hard limits).
    Text is UTF-8 with surrogatepass: every str comes back exactly as it was sent,
    as with json, including the surrogates os.fsdecode makes of bytes that are
    not UTF-8, whatever the locale of either end.
    """

    __slots__ = ("argv", "env", "fds", "identity", "rlimits", "umask")

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        umask: int,
        rlimits: dict[str, tuple[int, int]],
        fds: list[int],
        identity: dict[str, str],
    ) -> None:
        self.argv = argv
        self.env = env
        self.umask = umask
        self.rlimits = rlimits
        self.fds = fds
        self.identity = identity

    def encode(self) -> bytes:
        """The datagram; ValueError if a str holds a NUL (an exec would refuse it too)."""
        out: list[str | int] = [ZYGOTE_PROTOCOL, len(self.argv), *self.argv, len(self.env)]
        for key, value in self.env.items():
            out += [key, value]
        out += [self.umask, len(self.rlimits)]
        for name, (soft, hard) in self.rlimits.items():
            out += [name, soft, hard]
        out += [len(self.fds), *self.fds, len(self.identity)]
        for key, value in self.identity.items():
            out += [key, value]
        fields = [
            str(f).encode() if isinstance(f, int) else f.encode("utf-8", "surrogatepass")
            for f in out
        ]
        if any(b"\0" in f for f in fields):
            raise ValueError("a NUL in the daemon's arguments or environment")
        return b"".join(f + b"\0" for f in fields)

    @classmethod
    def decode(cls, data: bytes) -> ZygoteRequest:
        """The request in ``data``; ValueError if it is not one, whole and well formed."""
        fields = _Fields(data)
        if fields.text() != ZYGOTE_PROTOCOL:
            raise ValueError("not a zygote request")
        argv = [fields.text() for _ in range(fields.count())]
        env = fields.pairs()
        umask = fields.number()
        rlimits: dict[str, tuple[int, int]] = {}
        for _ in range(fields.count()):
            name = fields.text()
            rlimits[name] = (fields.number(), fields.number())
        fds = [fields.number() for _ in range(fields.count())]
        identity = fields.pairs()
        fields.end()
        return cls(argv, env, umask, rlimits, fds, identity)


class _Fields:
    """The NUL-terminated fields of a datagram, read in order; ValueError past the end."""

    __slots__ = ("_at", "_items")

    def __init__(self, data: bytes) -> None:
        if not data.endswith(b"\0"):
            raise ValueError("a truncated message")
        self._items = data[:-1].split(b"\0")
        self._at = 0

    def _next(self) -> bytes:
        if self._at >= len(self._items):
            raise ValueError("a truncated message")
        self._at += 1
        return self._items[self._at - 1]

    def text(self) -> str:
        return self._next().decode("utf-8", "surrogatepass")

    def number(self) -> int:
        """A decimal integer, optionally negative (RLIM_INFINITY is -1), ASCII digits only."""
        field = self._next()
        digits = field[1:] if field.startswith(b"-") else field
        if not digits.isdigit() or len(digits) > 20:  # bytes.isdigit: ASCII only
            raise ValueError("not a number")
        return int(field)

    def count(self) -> int:
        """A length: no more than the fields left, so a bad one fails at once."""
        n = self.number()
        if not 0 <= n <= len(self._items) - self._at:
            raise ValueError("a bad length")
        return n

    def pairs(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for _ in range(self.count()):
            key = self.text()
            if key in out:
                raise ValueError("a key given twice")
            out[key] = self.text()
        return out

    def end(self) -> None:
        if self._at != len(self._items):
            raise ValueError("fields after the end of the message")


# The zygote's answers. Formatted with %, never built from objects: whatever the
# zygote writes while a new daemon still shares its pages becomes that daemon's copy.
ZYGOTE_REFUSED = b"error\0bad request\0"
ZYGOTE_STALE = b"error\0stale\0"


def zygote_reply(pid: int) -> bytes:
    """The zygote's answer to a request it served: the daemon's pid."""
    return b"pid\0%d\0" % pid


def decode_zygote_reply(data: bytes) -> int | None:
    """The daemon's pid in the zygote's answer; None for a refusal or anything else."""
    try:
        fields = _Fields(data)
        if fields.text() != "pid":
            return None
        pid = fields.number()
        fields.end()
    except ValueError:
        return None
    return pid if pid > 0 else None


def zygote_identity() -> dict[str, str]:
    """What a zygote must share with its client, so that its daemons are what an exec
    would have made: the interpreter and the code, and where the daemon lands (the
    cgroup, e.g. a systemd unit's, and the mount namespace) with which groups."""

    def read(path: str) -> str:
        try:
            with open(path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    try:
        mnt = os.readlink("/proc/self/ns/mnt")
    except OSError:
        mnt = ""
    return {
        "python": sys.executable,
        "root": package_root(),
        "cgroup": read("/proc/self/cgroup"),
        "mnt": mnt,
        "groups": " ".join(map(str, [os.getgid(), *sorted(os.getgroups())])),
    }


def zygote_address(identity: dict[str, str]) -> bytes:
    """The zygote's abstract socket name for this user and this identity."""
    import zlib

    key = zlib.crc32("\0".join(identity.values()).encode(errors="replace"))
    return f"\0vtpmctl-zygote-{os.getuid()}-{key:08x}".encode()


def peer_uid(sock: Any) -> int:
    """The uid of the process at the other end of a connected unix socket."""
    return _peer_credentials(sock)[1]


def peer_pid(sock: Any) -> int:
    """The pid of the process at the other end of a connected unix socket."""
    return _peer_credentials(sock)[0]


def _peer_credentials(sock: Any) -> tuple[int, int, int]:
    import _socket
    import struct

    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return int(pid), int(uid), int(gid)


# ---------------------------------------------------------------- pre-imported parents
#
# The zygote and the command server fork children from code they imported once;
# both must notice when that code changes on disk, and both reap their children.

Sources = tuple[tuple[str, int, int, int], ...]  # (path, inode, mtime, size)


def package_sources() -> list[str]:
    """Every source file of this vtpmctl, imported or not (a child may import any)."""
    out = []
    for where, _, names in os.walk(os.path.dirname(os.path.realpath(__file__))):
        out += [os.path.join(where, n) for n in names if n.endswith(".py")]
    return sorted(out)


def source_stamps(paths: list[str]) -> Sources:
    """What changes when a file is edited or replaced (an upgrade): inode, mtime, size."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((path, 0, 0, 0))
            continue
        out.append((path, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def stale(stamps: Sources) -> bool:
    """A file stamped earlier has changed on disk, or is gone.

    It reads only the tuples it is given: walking ``sys.modules`` again would
    write to each module's page, which every child forked before must copy.
    """
    return source_stamps([path for path, *_ in stamps]) != stamps


def set_environ(env: dict[str, str]) -> None:
    """Make ``os.environ`` exactly ``env``, changing only the entries that differ.

    A forked child's starter's environment is most often its parent's own:
    clearing and refilling ``os.environ`` freed and remade every entry, objects
    the parent shares with its children, and so copied about 0.4 MiB of pages
    into each (measured on the zygote's daemons).
    """
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


class IdleClock:
    """When a pre-imported parent that has nothing to do should exit."""

    def __init__(self, limit: float) -> None:
        import time

        self._now = time.monotonic
        self.limit = limit
        self.since = self._now()

    def touch(self) -> None:
        """Something happened: a request, or a child's end."""
        self.since = self._now()

    def remaining(self, busy: bool) -> float | None:
        """Seconds still to wait; None once idle for ``limit`` and not ``busy``."""
        left = self.limit - (self._now() - self.since)
        if left > 0:
            return left
        if not busy:
            return None
        self.touch()
        return self.limit


def reaped() -> Iterator[tuple[int, int]]:
    """(pid, wait status) of each child that has ended, without waiting for any."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


# ---------------------------------------------------------------- the command server
#
# Console-script calls can be run by a child of ``python -m vtpmctl _cmdserver``
# (``vtpmctl.cmdserver``) instead of by the process the caller started; that
# process (``vtpmctl.cmdclient``) waits for the child. Code that looks for
# other processes (who uses a state dir) must not count either as "another".

CMDSERVER_ENTRY = "_cmdserver"
_serving = [0]  # the client's pid, in a child of the command server


def serve_for(client_pid: int) -> None:
    """Record that this process runs the command of process ``client_pid``."""
    _serving[0] = client_pid


def own_pids() -> frozenset[int]:
    """This process, and the console-script process it runs a command for."""
    return frozenset(p for p in (os.getpid(), _serving[0]) if p > 0)


def fits_title_room(args: list[str]) -> bool:
    """A forked daemon can show ``args`` as its command line in the zygote's room."""
    return sum(len(os.fsencode(a)) + 1 for a in args) <= ZYGOTE_TITLE_ROOM


def fork_daemon(
    args: list[str],
    env: dict[str, str],
    stderr_fd: int,
    ready_fd: int,
    pass_fds: list[int] | None = None,
) -> int | None:
    """Have the zygote fork a daemon running ``_daemon args``; its pid, or None.

    None means no zygote could be used (none could be started, it runs other
    code, or it is not ours): the caller starts the daemon by exec instead.
    The daemon writes one byte to ``ready_fd`` once it serves, and the fd
    closes when it exits; ``stderr_fd`` becomes its stderr (the log);
    ``pass_fds`` reach it under the same numbers (what its options name).
    """
    import _socket

    if not fits_title_room([*entry_argv(DAEMON_ENTRY), *args]):
        return None  # it could not show its own command line, which status and stop read
    identity = zygote_identity()
    fds = list(pass_fds or [])
    try:
        request = ZygoteRequest(args, env, _umask(), _rlimits(), fds, identity).encode()
    except ValueError:
        return None  # a NUL: the exec says what is wrong
    if len(request) > ZYGOTE_MAX_MESSAGE:
        return None
    sock = _connect_zygote(zygote_address(identity))
    if sock is None:
        return None
    try:
        sock.settimeout(ZYGOTE_REPLY_TIMEOUT)
        sock.sendmsg(
            [request],
            [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _fds(stderr_fd, ready_fd, *fds))],
        )
        reply = sock.recv(4096)
    except (OSError, ValueError):
        return None
    finally:
        sock.close()
    return decode_zygote_reply(reply)


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _fds(*fds: int) -> bytes:
    import array

    return array.array("i", fds).tobytes()


# The limits a daemon takes from its starter (the zygote's may be other ones).
RLIMITS = ("CORE", "CPU", "DATA", "FSIZE", "MEMLOCK", "NOFILE", "NPROC", "STACK", "AS")


def _rlimits() -> dict[str, tuple[int, int]]:
    import resource

    return {name: resource.getrlimit(getattr(resource, "RLIMIT_" + name)) for name in RLIMITS}


def _connect_zygote(address: bytes) -> Any:
    """A connection to this user's zygote, starting one if there is none; None if that fails."""
    import _socket

    for attempt in range(2):
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        try:
            sock.connect(address)
            if peer_uid(sock) != os.getuid():
                sock.close()
                return None  # someone else squats the name: never hand them our fds
            return sock
        except OSError:
            sock.close()
        if attempt == 0 and not _spawn_zygote():
            return None
    return None


def _spawn_zygote() -> bool:
    """Start the zygote detached and wait until it listens (or found another one there)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        argv = entry_argv(ZYGOTE_ENTRY)
        pid = os.posix_spawn(
            argv[0],
            [
                *argv,
                "--ready-fd",
                "3",
                "--title-room",
                "_" * ZYGOTE_TITLE_ROOM,
            ],
            child_env(),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDWR, 0),
                (os.POSIX_SPAWN_DUP2, 0, 1),
                (os.POSIX_SPAWN_DUP2, 0, 2),
                (os.POSIX_SPAWN_DUP2, w, 3),
            ],
            setsid=True,
        )
    except OSError:
        os.close(r)
        os.close(w)
        return False
    os.close(w)
    try:
        import select

        poller = select.poll()
        poller.register(r, select.POLLIN)
        answered = bool(poller.poll(int(ZYGOTE_START_TIMEOUT * 1000)))
    finally:
        os.close(r)
    if not answered:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)  # SIGKILL; the signal module costs an import
    # The zygote forks itself away from us once it listens; reap what is left here.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    return answered


MAX_LOG_LINES = 20


class ChildError(VtpmctlError):
    """A child process failed; the message is the child's one line.

    ``kind`` is the class name of the child's error ("TimeoutExpired" when it
    did not finish, "" when it gave no answer) and ``branch`` the branch of
    the error tree it belongs to, whose exit code this error takes.
    """

    def __init__(
        self, kind: str, message: str, *, branch: str = "", log: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.branch = branch
        self.message = message
        self.log = log or []
        branch_class = getattr(errors, branch, None) if branch else None
        if isinstance(branch_class, type) and issubclass(branch_class, VtpmctlError):
            self.exit_code = branch_class.exit_code


class Reply:
    """A child's answer and the last lines of its log."""

    __slots__ = ("answer", "log")

    def __init__(self, answer: dict[str, Any], log: list[str]) -> None:
        self.answer = answer
        self.log = log


def run_child(
    name: str,
    request: dict[str, Any],
    *,
    timeout: float,
    cwd: str | None = "/",
    pass_fds: tuple[int, ...] = (),
) -> Reply:
    """Run entry point ``name`` with ``request``: its answer, or ChildError.

    ``pass_fds`` are inherited by the child (a key on a pipe, never in the request).
    """
    import json  # here, not at the top: the zygote, and so every daemon, would carry it
    import subprocess

    try:
        proc = subprocess.run(
            entry_argv(name),
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=timeout,
            env=child_env(),
            cwd=cwd,
            check=False,
            pass_fds=pass_fds,
        )
    except subprocess.TimeoutExpired as exc:
        log = _log_lines(exc.stderr or b"")
        raise ChildError("TimeoutExpired", f"did not finish within {timeout:g}s", log=log) from None
    except OSError as exc:
        raise ChildError("OSError", str(exc.strerror or exc)) from None
    log = _log_lines(proc.stderr)
    try:
        reply = json.loads(proc.stdout)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        where = f"exit status {proc.returncode}" + (f": {log[-1]}" if log else "")
        raise ChildError("", f"no answer ({where})", log=log)
    error = reply.get("error")
    if isinstance(error, dict):
        raise ChildError(
            str(error.get("class", "")),
            str(error.get("message", "")),
            branch=str(error.get("branch", "")),
            log=log,
        )
    answer = reply.get("answer")
    if not isinstance(answer, dict) or proc.returncode != 0:
        raise ChildError(
            "", f"an answer of the wrong shape (exit status {proc.returncode})", log=log
        )
    return Reply(answer, log)


def _log_lines(stderr: bytes) -> list[str]:
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-MAX_LOG_LINES:]


def serve_child(handler: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """The child's side: one request from stdin, one answer or error on stdout.

    stdout carries nothing else (anything printed goes to stderr, the log);
    an exception becomes one line, never a traceback that could hold state.
    """
    import json

    answer_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    code = 0
    try:
        request = json.loads(sys.stdin.buffer.read() or b"{}")
        if not isinstance(request, dict):
            raise ValueError("the request is not a JSON object")
        reply: dict[str, Any] = {"answer": handler(request)}
    except Exception as exc:  # noqa: BLE001 - every error is answered, as one line
        reply = {
            "error": {
                "class": type(exc).__name__,
                "branch": _branch(type(exc)),
                "message": " ".join(str(exc).split()) or type(exc).__name__,
            }
        }
        code = 1
    with os.fdopen(answer_fd, "w") as out:
        out.write(json.dumps(reply) + "\n")
    return code


def _branch(cls: type[BaseException]) -> str:
    """The nearest class of the error tree (vtpmctl.errors) that ``cls`` is."""
    for klass in cls.__mro__:
        if getattr(errors, klass.__name__, None) is klass:
            return str(klass.__name__)
    return ""
