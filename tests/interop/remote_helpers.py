"""Hosts of a fleet for the remote tests: one VTPMCTL_HOME each, the CLI run in-process.

``Host.run`` runs ``vtpmctl`` in this process with the host's VTPMCTL_HOME and
an AWS environment (the S3 server's admin identity unless told otherwise),
so that two hosts can share one real S3 server without a second interpreter
per command. Daemons the host started are killed at the end (``hosts``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from instance_helpers import Home, home_at
from s3_server import S3Server

from vtpmctl.cli import run as cli_run


class Host:
    """One host: its store, and the AWS environment its commands see."""

    def __init__(self, home: Home, s3: S3Server, capsys: pytest.CaptureFixture[str]) -> None:
        self.home = home
        self.s3 = s3
        self.capsys = capsys
        self.env = s3.env()

    @property
    def path(self) -> Path:
        return self.home.path

    def run(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        with pytest.MonkeyPatch.context() as mp:
            for key in list(os.environ):
                if key.startswith("AWS_"):
                    mp.delenv(key)
            for key, value in (self.env if env is None else env).items():
                if key.startswith("AWS_"):
                    mp.setenv(key, value)
            mp.setenv("VTPMCTL_HOME", str(self.path))
            mp.delenv("NOTIFY_SOCKET", raising=False)
            self.capsys.readouterr()
            code = cli_run(list(args))
            out, err = self.capsys.readouterr()
        if check and code != 0:
            raise AssertionError(f"vtpmctl {' '.join(args)} exited {code}: {err}")
        return code, out, err

    def json(self, *args: str, check: bool = True, **kw: Any) -> dict[str, Any]:
        code, out, err = self.run(*args, "--json", check=check, **kw)
        data = json.loads(out)
        assert isinstance(data, dict) and data["format_version"] == 1, (code, out, err)
        return data


@contextlib.contextmanager
def hosts(
    tmp_path: Path, s3: S3Server, capsys: pytest.CaptureFixture[str], n: int = 2
) -> Iterator[list[Host]]:
    """``n`` hosts with stores of their own; their daemons are killed at the end."""
    with contextlib.ExitStack() as stack:
        found = [
            Host(stack.enter_context(home_at(tmp_path / f"host{i}")), s3, capsys) for i in range(n)
        ]
        yield found


def write_key(path: Path, material: bytes) -> Path:
    """A hex key file, 0600."""
    path.write_text(material.hex() + "\n")
    path.chmod(0o600)
    return path


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to show that nothing changed)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".lock"
    }
