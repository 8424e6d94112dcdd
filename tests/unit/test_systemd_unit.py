"""systemd/vtpmctl@.service runs a command line that exists."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import typer

from vtpmctl.cli import build_app

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "vtpmctl@.service"


def test_unit_runs_start_in_the_foreground_as_a_notify_service() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    service = unit["Service"]
    assert service["Type"] == "notify"
    argv = shlex.split(service["ExecStart"])
    assert argv == ["/usr/local/bin/vtpmctl", "start", "--foreground", "%i"]
    start = typer.main.get_command(build_app()).commands["start"]  # type: ignore[attr-defined]
    assert "--foreground" in {o for p in start.params for o in getattr(p, "opts", [])}
    assert service["RuntimeDirectoryPreserve"] == "yes"  # instances share /run/vtpmctl
