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

import json
import os
import sys
from typing import TYPE_CHECKING, Any

from vtpmctl import errors
from vtpmctl.errors import VtpmctlError

if TYPE_CHECKING:
    from collections.abc import Callable

# entry point name -> the module whose ``main(argv)`` runs it
ENTRY_POINTS = {
    "_daemon": "vtpmctl.device.server.daemon",
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


def child_env() -> dict[str, str]:
    """This environment, minus systemd's notify socket, importing this same vtpmctl."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)  # a child must not talk to our service manager
    package_root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


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
