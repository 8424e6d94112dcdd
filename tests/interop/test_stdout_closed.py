"""vtpmctl with its stdout closed (``>&-``): like a broken pipe, never a traceback.

A command whose output is its point (list, caps, an export to ``-``) is refused before
it does anything; a command that does something (create, start, stop) does it and
exits with its own status, its report going nowhere. A file opened meanwhile never
lands on descriptor 1.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from instance_helpers import VTPMCTL, Home, home_at


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    with home_at(tmp_path / "h") as h:
        yield h


def closed(home: Home, *args: str) -> subprocess.CompletedProcess[str]:
    """vtpmctl ARGS >&- (descriptor 1 closed, as the shell does it)."""
    return subprocess.run(
        [*VTPMCTL, *args],
        env=home.env,
        stdout=None,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.close(1),
    )


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback (most recent" not in result.stderr, result.stderr
    assert "Error:" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 1, result.stderr


def test_commands_that_do_something_do_it(home: Home) -> None:
    created = closed(home, "create", "c", "--no-ek")
    no_traceback(created)
    assert created.returncode == 0
    assert home.registry().get("c").config.tpm == "2.0"
    started = closed(home, "start", "c")
    no_traceback(started)
    assert started.returncode == 0 and home.status("c")[0] == 0
    status = closed(home, "status", "c")  # the exit code is its answer
    assert status.returncode == 0 and status.stderr == ""
    stopped = closed(home, "stop", "c")
    no_traceback(stopped)
    assert stopped.returncode == 0 and home.status("c")[0] == 3


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["list", "--json"],
        ["ek", "export", "c"],
        ["snapshot", "list", "c"],
        ["migrate", "export", "c", "-o", "-"],
        ["--version"],
    ],
)
def test_commands_whose_output_is_the_point_fail_first(home: Home, args: list[str]) -> None:
    home.run("create", "c", "--no-ek")
    before = sorted(p for p in home.path.rglob("*"))
    result = closed(home, *args)
    assert result.returncode == 1, result
    no_traceback(result)
    assert "stdout is closed" in result.stderr
    assert sorted(p for p in home.path.rglob("*")) == before
