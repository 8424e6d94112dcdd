"""Text from files never reaches the terminal raw: control characters are escaped."""

from __future__ import annotations

import pytest

from vtpmctl.cli import run
from vtpmctl.commands.output import print_rows, safe
from vtpmctl.errors import InstanceError

HOSTILE = "host\x1b]0;pwned\x07\x1b[2J\r\x9b1m\u202eevil\n2"


def test_safe_escapes_every_control_character() -> None:
    text = safe(HOSTILE)
    assert text.isprintable()
    assert text == "host\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x9b1m\\u202eevil\\x0a2"
    assert safe("plain text, é and ü stay") == "plain text, é and ü stay"


def test_rows_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    print_rows("t", [("source", HOSTILE)])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert out.count("\n") == 1


def test_error_messages_are_escaped(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def hostile(*args: object, **kwargs: object) -> int:
        raise InstanceError(f"bad field {HOSTILE}")

    monkeypatch.setattr("vtpmctl.commands.lifecycle.list_", hostile)
    assert run(["list"], fast=False) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\x9b" not in err and "\u202e" not in err
    assert err.count("\n") == 1
