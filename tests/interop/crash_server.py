"""Runs vtpmctl command lines in forked children, one of them killed at a chosen step.

Started once per test (``python crash_server.py``, vtpmctl imported up front), it
reads one JSON request per line: the command line, its VTPMCTL_HOME, and ``crash_at``.
The child counts every call of os.fsync, os.rename, os.replace and os.unlink (each
durable step of a write, rename or removal) and ends with ``os._exit(137)`` at call
number ``crash_at``, as if a signal had landed there: that call never happens. With
``crash_at`` 0 the command runs to its end and leaves the names of the calls, in order,
in a file beside its output. Forking is safe here: this process never loads libtpms
(daemons and the state inspector are processes of their own).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import vtpmctl.commands.key
import vtpmctl.commands.lifecycle
import vtpmctl.commands.snapshot
import vtpmctl.commands.verify
import vtpmctl.usecases.snapshot_ops  # noqa: F401  (imported before the forks)
from vtpmctl.cli import build_app, run

STEPS = ("fsync", "rename", "replace", "unlink")
CRASH_STATUS = 137


def _child(req: dict[str, Any]) -> None:
    os.environ["VTPMCTL_HOME"] = req["home"]
    for fd, suffix in ((1, ".out"), (2, ".err")):
        out = os.open(req["out"] + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, fd)
        os.close(out)
    trace: list[str] = []
    crash_at = int(req["crash_at"])

    def hook(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            trace.append(name)
            if len(trace) == crash_at:
                os._exit(CRASH_STATUS)
            return fn(*args, **kwargs)

        return step

    for name in STEPS:
        setattr(os, name, hook(name, getattr(os, name)))
    code = run(list(req["argv"]))
    sys.stdout.flush()
    sys.stderr.flush()
    with open(req["out"] + ".trace", "w") as f:
        json.dump(trace, f)
    os._exit(code)


def main() -> None:
    build_app()  # typer and every command module, once
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                _child(req)
            finally:
                os._exit(99)
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
