"""vtpmctl's command line run inside the test process, against a test's own store.

Starting an interpreter and importing typer costs most of a command's time;
running ``vtpmctl.cli.run`` in-process keeps what is tested (argument parsing,
output, exit codes, one-line errors) and drops that cost. Daemons and the
libtpms inspector still run in processes of their own.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from instance_helpers import Home, home_at

from vtpmctl.cli import run as cli_run


class Cli:
    """vtpmctl's command line, run in this process against ``home``."""

    def __init__(self, home: Home, capsys: pytest.CaptureFixture[str]) -> None:
        self.home = home
        self.capsys = capsys

    def run(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = cli_run(list(args))
        out, err = self.capsys.readouterr()
        if check and code != 0:
            raise AssertionError(f"vtpmctl {' '.join(args)} exited {code}: {err}")
        return code, out, err

    def json(self, *args: str, check: bool = True) -> dict[str, Any]:
        data = json.loads(self.run(*args, "--json", check=check)[1])
        assert isinstance(data, dict) and data["format_version"] == 1
        return data


@contextlib.contextmanager
def in_process_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Cli]:
    """A private VTPMCTL_HOME under tmp_path; daemons left running are killed at the end."""
    with home_at(tmp_path / "h") as home:
        monkeypatch.setenv("VTPMCTL_HOME", str(home.path))
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        yield Cli(home, capsys)
