"""store.access: modes as users write them, the defaults a group brings, what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vtpmctl.model import OnShutdown
from vtpmctl.store.access import Access, AccessError, parse_mode
from vtpmctl.store.instances import InstanceConfig


@pytest.mark.parametrize(("text", "mode"), [("660", 0o660), ("0660", 0o660), ("0o710", 0o710)])
def test_modes_as_users_write_them(text: str, mode: int) -> None:
    assert parse_mode(text, "--socket-mode") == mode


@pytest.mark.parametrize("text", ["", "rw", "0888", "7777", "-1"])
def test_a_mode_that_is_not_octal_is_refused(text: str) -> None:
    with pytest.raises(AccessError, match="not an octal mode"):
        parse_mode(text, "--socket-mode")


def test_a_group_brings_shared_defaults_and_none_private_ones() -> None:
    assert Access.of(None, None, None) == Access(None, 0o600, 0o700)
    assert Access.of("root", None, None) == Access("root", 0o660, 0o710)
    assert Access.of("root", "0640", "0750") == Access("root", 0o640, 0o750)
    assert Access.of("", None, None) == Access()  # an empty --group is no group


@pytest.mark.parametrize(
    ("socket_mode", "dir_mode", "needle"),
    [
        ("0460", None, "locks out the owner"),
        (None, "0610", "locks out the owner"),
        (None, "0770", "lets others write"),
        (None, "0712", "lets others write"),
    ],
)
def test_modes_that_cannot_work_are_refused(
    socket_mode: str | None, dir_mode: str | None, needle: str
) -> None:
    with pytest.raises(AccessError, match=needle):
        Access.of("root", socket_mode, dir_mode)


def test_config_keeps_its_bytes_unless_the_settings_are_used(tmp_path: Path) -> None:
    plain = InstanceConfig(name="a")
    assert set(plain.to_json()) == {
        "format_version", "name", "tpm", "transport", "encrypted", "migration_key", "ek"
    }  # fmt: skip
    shared = InstanceConfig(name="b", on_shutdown=OnShutdown.POWER_OFF)
    shared.set_access(Access.of("root", None, None))
    data = shared.to_json()
    assert (data["on_shutdown"], data["group"], data["socket_mode"], data["dir_mode"]) == (
        "power-off", "root", "0660", "0710"
    )  # fmt: skip
    back = InstanceConfig.from_json(json.loads(json.dumps(data)), tmp_path / "config.json")
    assert back == shared and back.access == Access("root", 0o660, 0o710)
