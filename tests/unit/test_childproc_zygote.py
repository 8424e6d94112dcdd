"""The zygote's client: which daemons it may fork (and which must be exec'd)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vtpmctl.childproc import (
    DAEMON_ENTRY,
    ZYGOTE_TITLE_ROOM,
    entry_argv,
    fits_title_room,
    fork_daemon,
)


def test_a_command_line_longer_than_the_zygotes_room_is_execd() -> None:
    """status and stop read a daemon's command line: a forked one must be able to show it."""
    base = entry_argv(DAEMON_ENTRY)
    used = sum(len(a) + 1 for a in base)
    assert fits_title_room([*base, "x" * (ZYGOTE_TITLE_ROOM - used - 1)])
    long_args = ["--state", "/" + "d" * (ZYGOTE_TITLE_ROOM - used)]
    assert not fits_title_room([*base, *long_args])
    r, w = os.pipe()
    try:
        # None before any zygote is asked: the caller execs the daemon instead.
        assert fork_daemon(long_args, {}, 2, w) is None
    finally:
        os.close(r)
        os.close(w)


def test_the_zygote_never_imports_from_the_current_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`python -m vtpmctl` puts the cwd first on sys.path: run inside another checkout,
    a zygote would fork that checkout's code. PYTHONSAFEPATH (Python 3.11) stops it."""
    from vtpmctl import childproc

    seen: list[dict[str, str]] = []

    def spawn(path: str, argv: list[str], env: dict[str, str], **_: object) -> int:
        seen.append(env)
        raise OSError("not spawned in a unit test")

    monkeypatch.setattr(childproc.os, "posix_spawn", spawn)
    assert childproc._spawn_zygote() is False
    assert seen and seen[0]["PYTHONSAFEPATH"] == "1"
    assert seen[0]["PYTHONPATH"].split(os.pathsep)[0] == childproc.package_root()


def test_no_child_imports_vtpmctl_from_the_current_directory(tmp_path: Path) -> None:
    """A planted vtpmctl package in the caller's directory is never what a child runs."""
    import subprocess
    import sys

    from vtpmctl.childproc import child_env, entry_argv

    planted = tmp_path / "vtpmctl"
    planted.mkdir()
    (planted / "__init__.py").write_text("")
    (planted / "__main__.py").write_text("import sys; print('planted'); sys.exit(7)\n")
    proc = subprocess.run(
        [*entry_argv("_daemon"), "--help"],
        env=child_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and "planted" not in proc.stdout, (proc.stdout, sys.path)


def test_the_zygote_carries_no_module_a_daemon_does_without(tmp_path: Path) -> None:
    """Every module the zygote imports is in every daemon's RSS: typing (which the
    daemon's modules use only for mypy) and argparse (a daemon parses the command line
    ``vtpmctl start`` writes itself), with what it pulls in, stay out; so do logging
    (vtpmctl.logger), dataclasses (vtpmctl.frozen), pathlib (vtpmctl.fspath), json
    (the zygote's request is childproc.ZygoteRequest) and re."""

    code = (
        "import sys\n"
        "from vtpmctl.device.server import zygote\n"
        "zygote.prepare()\n"
        "zygote.settle()\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    done = _python(code, tmp_path)
    loaded = set(done.stdout.split())
    assert {"vtpmctl.device.server.daemon", "vtpmctl.logger"} <= loaded
    assert not loaded & {"typing", "argparse", "gettext", "locale", "shutil", "cryptography"}
    assert not loaded & {"logging", "traceback", "linecache", "tokenize", "textwrap", "string"}
    assert not loaded & {"dataclasses", "inspect", "ast", "dis", "copy"}
    assert not loaded & {"pathlib", "fnmatch", "urllib.parse", "ipaddress", "json", "re"}


def test_a_forked_daemon_gets_exactly_the_starters_environment(tmp_path: Path) -> None:
    """Only the entries that differ are changed; the process's own environ follows."""
    import json

    code = (
        "import json, os, subprocess\n"
        "from vtpmctl.childproc import set_environ\n"
        "os.environ.update(KEEP='1', CHANGE='old', DROP='x')\n"
        "want = {k: v for k, v in os.environ.items() if k != 'DROP'}\n"
        "want.update(CHANGE='new', ADD='2')\n"
        "set_environ(want)\n"
        "seen = subprocess.run(['env', '-0'], capture_output=True, check=True).stdout\n"
        "c = dict(e.split('=', 1) for e in seen.decode().split('\\0') if e)\n"
        "print(json.dumps([dict(os.environ) == want, c == want]))\n"
    )
    done = _python(code, tmp_path)
    assert json.loads(done.stdout) == [True, True]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with the environment children get."""
    import sys

    from vtpmctl.childproc import child_env

    return subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
